"""Lexical retrieval over books: `tokenize` turns Chinese/English text into terms (jieba words plus CJK
unigrams and bigrams, Latin/digit words, stopwords dropped), `index_text` is what of a book is read,
and `KeywordIndex` ranks a fixed list of books against a request with BM25 (`lexical.py`) and keeps
a bounded list of candidates. The gateway's catalogue-wide, incremental index is `searchindex.py`."""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Iterable, NamedTuple

from .lexical import LexicalIndex
from .protocol import Book

log = logging.getLogger(__name__)

STOPWORDS_PATH = Path(__file__).parent / "data" / "stopwords.txt"

# A candidate must score at least this fraction of the best one. On the seed catalogue a title that
# shares only one common character with the request (数 of 代数 when the request is 函数求导) scores
# 0.09-0.24 of the best, one sharing a word or part of one (力学 of 热力学 for 量子力学, 导 of 导数
# for 求导) 0.26-0.53: the floor sits between, so the model is not shown one-character coincidences.
RELATIVE_FLOOR = 0.25

# CJK Unified Ideographs, Extension A and the compatibility block (NFKC folds most of the latter).
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# A CJK run, or a run of other letters/digits; everything else (punctuation of any width, spaces,
# symbols, '_') separates terms.
_RUNS = re.compile(rf"(?P<cjk>[{_CJK}]+)|(?P<word>(?:(?![{_CJK}])[^\W_])+)")

_jieba_lock = threading.Lock()
_jieba = None


def _segmenter():
    """The jieba module, dictionary loaded once and quietly."""
    global _jieba
    if _jieba is None:
        with _jieba_lock:
            if _jieba is None:
                import jieba

                # jieba logs "Building prefix dict..." at DEBUG/INFO on every first load.
                jieba.setLogLevel(logging.WARNING)
                jieba.initialize()
                _jieba = jieba
    return _jieba


@lru_cache(maxsize=1)
def stopwords() -> frozenset[str]:
    """The stopword set from data/stopwords.txt, lower-cased."""
    words = set()
    for line in STOPWORDS_PATH.read_text(encoding="utf-8").splitlines():
        word = line.split("#", 1)[0].strip().lower()
        if word:
            words.add(word)
    return frozenset(words)


def _is_stop(word: str, stop: frozenset[str]) -> bool:
    # A jieba word made only of stop characters (我们, 一个, 有没有) is filler even when unlisted.
    return word in stop or all(ch in stop for ch in word)


def _cjk_terms(run: str, stop: frozenset[str], out: dict[str, None]) -> None:
    """Add the terms of one CJK run to `out`: jieba words, then unigrams and bigrams of each chunk."""
    chunk: list[str] = []
    # Stop words split the run into chunks, so no n-gram spans filler: "有没有关于烹饪的书" yields
    # only 烹饪/烹/饪, never 关 or 有关 or 的书 that would match unrelated titles.
    for word in _segmenter().lcut(run):
        if _is_stop(word, stop):
            _chunk_grams("".join(chunk), stop, out)
            chunk = []
        else:
            out[word] = None
            chunk.append(word)
    _chunk_grams("".join(chunk), stop, out)


def _chunk_grams(chunk: str, stop: frozenset[str], out: dict[str, None]) -> None:
    # Unigrams let 求导 (request) meet 导数 (title); bigrams recover words jieba cut differently.
    for ch in chunk:
        if ch not in stop:
            out[ch] = None
    for i in range(len(chunk) - 1):
        bigram = chunk[i:i + 2]
        if bigram not in stop:
            out[bigram] = None


def tokenize(text: str) -> list[str]:
    """The distinct retrieval terms of a text, in first-seen order: pure and deterministic."""
    stop = stopwords()
    # NFKC folds full-width letters/digits (Ｐｙｔｈｏｎ) into ASCII before lower-casing.
    text = unicodedata.normalize("NFKC", text).lower()
    # A dict keeps insertion order: distinct terms, so a title's score does not depend on the same
    # term arriving as a jieba word and again as a bigram.
    out: dict[str, None] = {}
    for m in _RUNS.finditer(text):
        if m.group("cjk"):
            _cjk_terms(m.group("cjk"), stop, out)
        elif m.group("word") not in stop:
            out[m.group("word")] = None
    return list(out)


def index_text(book: Book) -> str:
    """What lexical retrieval reads of a book: its title, author and subjects."""
    return " ".join([book.title, book.author or "", " ".join(book.subjects)])


# "[日] 村上春树", "常庚哲, 史济怀", "（清）曹雪芹": nationality or dynasty marks, then names.
_AUTHOR_MARK = re.compile(r"[\[［(（][^\]］)）]*[\]］)）]")
_AUTHOR_SEPARATORS = re.compile(r"[,，、;；/\s]+")
_HAN_NAME = re.compile(rf"[{_CJK}]{{2,4}}")


def author_pinyin(author: str | None) -> dict[str, str]:
    """Each Chinese author name in pinyin, written as English text writes it, one word per order,
    family name first and last (余华 -> yuhua, huayu), mapped to the name: so "novels by Yu Hua" or
    "Cixin Liu" find the books. Names of other scripts (村上春树 has a dictionary entry) are left to
    translation."""
    if not author or "·" in author:  # 乔治·B. 托马斯: a foreign name written in characters
        return {}
    out: dict[str, str] = {}
    for name in _AUTHOR_SEPARATORS.split(_AUTHOR_MARK.sub(" ", author)):
        if _HAN_NAME.fullmatch(name):
            for spelling in _name_pinyin(name):
                out[spelling] = name
    return out


@lru_cache(maxsize=65536)
def _name_pinyin(name: str) -> tuple[str, str]:
    # Cached: a catalogue names the same authors again and again, and pypinyin costs ~50 us a name.
    from pypinyin import lazy_pinyin

    syllables = lazy_pinyin(name)
    return "".join(syllables), "".join(syllables[1:] + syllables[:1])


def index_terms(book: Book, names: dict[str, str] | None = None) -> list[str]:
    """A book's lexical terms: those of `index_text`, and its authors' names in pinyin (`names`, when
    the caller has already read them with `author_pinyin`)."""
    names = author_pinyin(book.author) if names is None else names
    return list(dict.fromkeys(tokenize(index_text(book)) + list(names)))


class Scored(NamedTuple):
    """One retrieved book and its BM25 score against the request."""

    book: Book
    score: float


class KeywordIndex:
    """BM25 over a fixed list of books (title, author, subjects), keeping the books that score at
    least RELATIVE_FLOOR of the best: what the model server uses to narrow a large list it is handed."""

    def __init__(self, books: Iterable[Book]):
        self._books: list[Book] = []
        self._index = LexicalIndex()
        for book in books:
            self._books.append(book)
            self._index.add(index_terms(book))

    def __len__(self) -> int:
        return len(self._books)

    def search(self, query: str, k: int) -> list[Scored]:
        """At most k books matching the query, best first, ties by lower id; [] when nothing matches."""
        if not self._books or k <= 0:
            return []
        import numpy as np

        scores, _ = self._index.scores(tokenize(query))
        best = float(scores.max())
        if best <= 0.0:
            return []
        keep = np.flatnonzero(scores >= best * RELATIVE_FLOOR)
        ids = np.asarray([self._books[i].id for i in keep], dtype=np.int64)
        order = np.lexsort((ids, -scores[keep]))[:k]
        return [Scored(self._books[keep[i]], float(scores[keep[i]])) for i in order]


def _main() -> None:
    """Print the eval: top-8 ids per query of book_queries.jsonl and whether it hits."""
    import json
    import sys

    repo = Path(__file__).resolve().parent.parent
    eval_path = Path(sys.argv[1]) if len(sys.argv) > 1 else repo.parent / "shared" / "eval" / "book_queries.jsonl"
    titles = (Path(__file__).parent / "data" / "seed_books.txt").read_text(encoding="utf-8").splitlines()
    index = KeywordIndex(Book(id=i, title=t) for i, t in enumerate(titles, start=1))
    hits = total = 0
    for line in eval_path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        case = json.loads(line)
        found = index.search(case["query"], 8)
        top = [c.book.id for c in found]
        if case.get("must_include_one_of"):
            ok = bool(set(top) & set(case["must_include_one_of"]))
        else:
            ok = not top
        hits += ok
        total += 1
        print(f"{case['query']}\t{top}\t{'hit' if ok else 'MISS'}\t{[round(c.score, 2) for c in found]}")
    print(f"hit rate: {hits}/{total}")


if __name__ == "__main__":
    _main()
