"""Lexical retrieval over the book catalogue: `tokenize` turns Chinese/English text into terms (jieba
words plus CJK unigrams and bigrams, Latin/digit words, stopwords dropped), `TitleIndex` ranks titles
against a request with BM25 (bm25s) and keeps a bounded list of candidates, and `IndexCache` keeps one
index per catalogue version so a server does not re-index on every request."""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable, Iterable

if TYPE_CHECKING:
    import bm25s

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


@dataclass(frozen=True)
class Candidate:
    """One retrieved book and its BM25 score against the request."""

    id: int
    title: str
    score: float


class TitleIndex:
    """BM25 index over (id, title) pairs."""

    def __init__(self, books: Iterable[tuple[int, str]]):
        """Index the titles; an empty catalogue gives an index whose searches return []."""
        self._ids: list[int] = []
        self._titles: list[str] = []
        corpus: list[list[str]] = []
        for book_id, title in books:
            self._ids.append(int(book_id))
            self._titles.append(title)
            corpus.append(tokenize(title))
        self._bm25: bm25s.BM25 | None = None
        self._vocab: dict[str, int] = {}
        # bm25s cannot build a vocabulary out of nothing, so a catalogue without a single term
        # (empty, or titles that are all punctuation/stopwords) stays unindexed.
        if any(corpus):
            import bm25s

            # bm25s logs every index build at DEBUG on a logger of its own; keep server logs quiet.
            logging.getLogger("bm25s").setLevel(logging.WARNING)
            self._bm25 = bm25s.BM25()
            self._bm25.index(corpus, show_progress=False)
            self._vocab = self._bm25.vocab_dict
        log.debug("indexed %d titles, %d terms", len(self._ids), len(self._vocab))

    def __len__(self) -> int:
        return len(self._ids)

    def search(self, query: str, k: int) -> list[Candidate]:
        """At most k titles matching the query, best first, ties by lower id; [] when nothing matches."""
        if self._bm25 is None or k <= 0:
            return []
        # bm25s fails on tokens outside its vocabulary; "" is its own placeholder for empty docs.
        term_ids = [self._vocab[t] for t in tokenize(query) if t and t in self._vocab]
        if not term_ids:
            return []
        import numpy as np

        scores = self._bm25.get_scores_from_ids(term_ids)
        best = float(scores.max())
        if best <= 0.0:
            return []
        keep = np.flatnonzero(scores >= best * RELATIVE_FLOOR)
        keep = keep[scores[keep] > 0.0]
        ids = np.asarray(self._ids)[keep]
        order = np.lexsort((ids, -scores[keep]))[:k]
        return [Candidate(int(ids[i]), self._titles[keep[i]], float(scores[keep[i]])) for i in order]


class IndexCache:
    """Keeps one TitleIndex per catalogue fingerprint; rebuilds when the fingerprint changes. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fingerprint: Hashable | None = None
        self._index: TitleIndex | None = None

    def get(self, fingerprint: Hashable, load_books: Callable[[], Iterable[tuple[int, str]]]) -> TitleIndex:
        """The index for this fingerprint, built from load_books() only when it differs from the last one."""
        # Building under the lock means concurrent requests after a catalogue change build it once.
        with self._lock:
            if self._index is None or self._fingerprint != fingerprint:
                self._index = TitleIndex(load_books())
                self._fingerprint = fingerprint
                log.info("catalogue index rebuilt: %d titles", len(self._index))
            return self._index


def _main() -> None:
    """Print the eval: top-8 ids per query of book_queries.jsonl and whether it hits."""
    import json
    import sys

    repo = Path(__file__).resolve().parent.parent
    eval_path = Path(sys.argv[1]) if len(sys.argv) > 1 else repo.parent / "shared" / "eval" / "book_queries.jsonl"
    titles = (Path(__file__).parent / "data" / "seed_books.txt").read_text(encoding="utf-8").splitlines()
    index = TitleIndex(enumerate(titles, start=1))
    hits = total = 0
    for line in eval_path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        case = json.loads(line)
        found = index.search(case["query"], 8)
        top = [c.id for c in found]
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
