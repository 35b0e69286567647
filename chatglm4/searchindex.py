"""The gateway's search index over the catalogue: lexical and dense retrieval fused into one score,
kept in step with the database incrementally.

Each book is a row. Its title, author and subjects are indexed lexically at once (`lexical.py`); its
embeddings arrive later from a background worker (or at once from the on-disk cache), so a large
import is searchable lexically immediately and semantically as the vectors fill in.

The index follows the database's change log (`Catalogue.changes_since`): every process's writes —
this gateway's, another replica's, SQL typed into MySQL — reach search within one poll interval; this
gateway's own writes call `refresh()` and are searchable before their request returns.

The fused score, measured on the library eval set (README, "Book search"):

    score = Σ_m w_m · z_m + coverage,   z_m = (cos_m − mean) / std over the catalogue for this request

where coverage is BM25 divided by the request's ideal BM25 (the share of the request a book covers).
Standardising each model's cosines against the catalogue makes one floor work across requests (raw
cosines of English requests sit below those of unrelated Chinese ones). A request whose best score
is under the floor is answered "not found"; otherwise the books within `margin` of the best.

An English request is translated first (`crosslingual.py`): its lexical terms are the translation's
Chinese words, authors' names written in pinyin ("Yu Hua" → yuhua) and what stayed untranslated;
the dense part is the better, book by book, of the request's own embedding and its translation's."""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .crosslingual import Dictionary, is_foreign_request, latin_words, shared_dictionary
from .embedding import Embedder
from .growable import Growable
from .lexical import LexicalIndex
from .protocol import Book
from .retrieval import author_pinyin, index_terms, stopwords, tokenize
from .vectors import EmbeddingCache, VectorRows, content_key

if TYPE_CHECKING:
    from .catalogue import Catalogue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusionSettings:
    # Weights of each embedding model's z-score; normalised over the models that loaded.
    weights: dict[str, float] = field(default_factory=lambda: {"e5": 0.75, "use": 0.25})
    coverage_weight: float = 1.0
    # None: the floor follows the catalogue's size (see `floor_for`); a number: fixed.
    floor: float | None = None
    # Books within one catalogue standard deviation of the best are kept.
    margin: float = 1.0


# Calibrated on our own held-out requests (bench/data/heldout_*.jsonl, not the public eval): the
# smallest multiple, on a 0.05 grid, at which 80% of their 24 negatives score under the floor on the
# 420-book library (bench/calibrate_floor.py).
FLOOR_SCALE = 1.25


def floor_for(books: int) -> float:
    """The fused score a best book must reach: a multiple of sqrt(2 ln n), the order of the largest
    z-score the best of n unrelated books reaches by chance, so the floor grows with the catalogue as
    chance matches do (3.2 at 25 books, 4.3 at 420, 6.6 at 1,000,000)."""
    return FLOOR_SCALE * math.sqrt(2.0 * math.log(max(books, 2)))


# The best books of a request are left out of the statistics they are measured against.
TRIM = 8


def standardise(values: np.ndarray) -> np.ndarray:
    """How far each value stands above the catalogue's unrelated books, in units of their spread.

    The mean and spread come from every book but the TRIM best: a request that many books answer
    (5 French books among 25) must not widen the spread with those very books and so hide them. On
    a large catalogue this is the plain z-score."""
    if len(values) > 2 * TRIM + 2:
        rest = np.partition(values, len(values) - TRIM - 1)[:len(values) - TRIM]
    else:
        rest = values
    return (values - rest.mean()) / (rest.std() + 1e-9)


@dataclass(frozen=True)
class Hit:
    book_id: int
    score: float


class _State:
    """One generation of the index: rebuilt whole (at start, after the change log was pruned past
    it, or to compact) in the background while searches use the previous one."""

    _generations = itertools.count()

    def __init__(self, embedders: list[Embedder], cursor: int):
        self.generation = next(self._generations)
        self.lex = LexicalIndex()
        self.vectors = {e.name: VectorRows(e.dim) for e in embedders}
        self.row_of: dict[int, int] = {}
        self.ids = Growable(np.int64)                # row -> book id
        # An author's name in pinyin -> the name ("yuhua" -> 余华), for translating English requests.
        self.names: dict[str, str] = {}
        self.cursor = cursor

    def remove(self, book_id: int) -> None:
        row = self.row_of.pop(book_id, None)
        if row is not None:
            self.lex.remove(row)
            for vectors in self.vectors.values():
                vectors.drop(row)

    def upsert(self, book: Book) -> int:
        """Indexes `book` (an edited one becomes a new row: its old terms and vectors go); its row."""
        self.remove(book.id)
        names = author_pinyin(book.author)
        self.names.update(names)
        row = self.lex.add(index_terms(book, names))
        self.ids.ensure(row + 1)
        self.ids.data[row] = book.id
        self.row_of[book.id] = row
        return row


class CatalogueIndex:
    """Hybrid retrieval over a catalogue, updated from its change log; thread-safe."""

    EMBED_BATCH = 32
    # Changes of at most this many books are embedded by refresh() itself.
    SYNC_EMBED_MAX = 32

    def __init__(self, catalogue: "Catalogue", embedders: list[Embedder], cache: EmbeddingCache | None = None,
                 settings: FusionSettings = FusionSettings(), poll_interval: float = 1.0,
                 dictionary: Dictionary | None | bool = True):
        self.catalogue = catalogue
        # True: the shared CC-CEDICT dictionary, loaded at the first English request; None: English
        # requests are searched untranslated.
        self._dictionary = dictionary
        self.embedders = embedders
        self.cache = cache
        self.settings = settings
        self.poll_interval = poll_interval
        self._state = _State(embedders, 0)
        # Held to change the current state and while reading it; a rebuild builds its own state
        # outside it and only swaps under it.
        self._lock = threading.RLock()
        self._sync = threading.Lock()               # one change-log reader at a time
        self._ready = threading.Event()
        self._stop = threading.Event()
        # Rows waiting for embeddings: changes (urgent) before a bulk load's backlog.
        self._urgent: deque[tuple[_State, int]] = deque()
        self._backlog: deque[tuple[_State, int]] = deque()
        self._pending_cv = threading.Condition()
        self.load_error: str | None = None
        self.loaded_in: float | None = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "CatalogueIndex":
        """Loads the catalogue in the background, then follows its changes; embeds as rows arrive."""
        self._spawn(self._load_then_follow, "search-index")
        if self._dictionary is True:  # parsed now, so the first English request does not wait for it
            self._spawn(shared_dictionary, "search-dictionary")
        if self.embedders:
            self._spawn(self._embed_worker, "search-embed")
        return self

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        self._stop.set()
        with self._pending_cv:
            self._pending_cv.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    # ------------------------------------------------------------ loading and following

    def _load_then_follow(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._ready.is_set():
                    # Idempotent; here for a database that was down when the gateway started.
                    self.catalogue.init_schema()
                    self._rebuild()
                if self.refresh():
                    self._rebuild()
            except Exception as exc:  # the database may be down: keep trying, report meanwhile
                self.load_error = str(exc) or type(exc).__name__
                log.warning("search index cannot sync with the catalogue: %s", exc)
                self._stop.wait(max(self.poll_interval, 2.0))
                continue
            self.load_error = None
            self._stop.wait(self.poll_interval)

    def _rebuild(self) -> None:
        """Indexes every book into a new state and swaps it in; changes made meanwhile are replayed
        from the cursor taken before reading."""
        started = time.monotonic()
        state = _State(self.embedders, self.catalogue.change_cursor())
        for batch in self.catalogue.iter_books():
            if self._stop.is_set():
                return
            rows = [state.upsert(book) for book in batch]
            self._queue(state, rows)
        with self._lock:
            self._state = state
        self.loaded_in = time.monotonic() - started
        self._ready.set()
        log.info("search index built: %d books in %.1f s", state.lex.live, self.loaded_in)

    def refresh(self) -> bool:
        """Applies every change logged since the last call, so they are searchable when it returns.
        True when the index must be rebuilt instead (log pruned past it, or worth compacting)."""
        if not self._ready.is_set():
            return False
        with self._sync:
            state = self._state
            while True:
                changes = self.catalogue.changes_since(state.cursor)
                if not changes.complete:
                    log.warning("change log pruned past the index's cursor: rebuilding")
                    return True
                with self._lock:
                    for book_id in changes.deleted:
                        state.remove(book_id)
                    rows = [state.upsert(book) for book in changes.upserted]
                    moved = changes.cursor != state.cursor
                    state.cursor = changes.cursor
                if rows and len(rows) <= self.SYNC_EMBED_MAX:
                    # A few changed books are embedded here and now: searchable, semantically too,
                    # when this returns (their fused score needs the vectors to clear the floor).
                    self._embed_rows(state, rows, urgent=True)
                else:
                    self._queue(state, rows, urgent=True)
                if not moved or not (changes.upserted or changes.deleted):
                    break
            return state.lex.needs_compaction()

    def _queue(self, state: _State, rows: list[int], urgent: bool = False) -> None:
        """Hands rows to the embedding worker: a bulk load's at the back, changes' at the front."""
        if self.embedders and rows:
            with self._pending_cv:
                (self._urgent if urgent else self._backlog).extend((state, r) for r in rows)
                self._pending_cv.notify()

    # ------------------------------------------------------------ embeddings

    def _embed_worker(self) -> None:
        while not self._stop.is_set():
            with self._pending_cv:
                while not (self._urgent or self._backlog) and not self._stop.is_set():
                    self._pending_cv.wait(1.0)
                # Small batches, changes first: a new book waits for at most one batch of a backlog.
                queue = self._urgent if self._urgent else self._backlog
                work = [queue.popleft() for _ in range(min(self.EMBED_BATCH, len(queue)))]
            by_state: dict[_State, list[int]] = {}
            for state, row in work:
                # Rows of a state that was replaced are dropped: its successor queued its own.
                if state.generation >= self._state.generation:
                    by_state.setdefault(state, []).append(row)
            try:
                for state, rows in by_state.items():
                    self._embed_rows(state, rows)
            except Exception as exc:  # the database or a model failed: retry these rows later
                log.warning("embedding %d books failed, retrying: %s", len(work), exc)
                with self._pending_cv:
                    self._urgent.extendleft(reversed(work))
                self._stop.wait(2.0)

    def _embed_rows(self, state: _State, rows: list[int], urgent: bool = False) -> None:
        with self._lock:
            wanted = {int(state.ids.data[r]): r for r in rows if state.row_of.get(int(state.ids.data[r])) == r}
        if not wanted:
            return
        books = self.catalogue.get_many(list(wanted))
        for embedder in self.embedders:
            vectors = state.vectors[embedder.name]
            todo = [b for b in books if not vectors.has(wanted[b.id])]
            keys = {b.id: content_key(embedder.text(b)) for b in todo}
            cached = self.cache.get_many(embedder.name, list(keys.values())) if self.cache else {}
            hit = [b for b in todo if keys[b.id] in cached]
            if hit:
                self._put(state, embedder.name, [(wanted[b.id], b.id) for b in hit],
                          np.stack([cached[keys[b.id]] for b in hit]))
            miss = [b for b in todo if keys[b.id] not in cached]
            for start in range(0, len(miss), self.EMBED_BATCH):
                if self._stop.is_set():
                    return
                part = miss[start:start + self.EMBED_BATCH]
                matrix = embedder.passages(part, urgent=urgent)
                if self.cache:
                    self.cache.put_many(embedder.name, [(keys[b.id], v) for b, v in zip(part, matrix)])
                self._put(state, embedder.name, [(wanted[b.id], b.id) for b in part], matrix)

    def _put(self, state: _State, model: str, rows_ids: list[tuple[int, int]], matrix: np.ndarray) -> None:
        with self._lock:
            # Only rows still holding that book (it may have been edited or deleted meanwhile).
            keep = [i for i, (row, book_id) in enumerate(rows_ids) if state.row_of.get(book_id) == row]
            if keep:
                state.vectors[model].put([rows_ids[i][0] for i in keep], matrix[keep])

    # ------------------------------------------------------------ search

    def search(self, query: str, k: int) -> list[Hit]:
        """At most k books answering `query`, best first; [] when none scores above the floor."""
        s = self.settings
        terms, views = self._read_request(query)
        # One embedding per model per view of the request (the request, and its translation).
        queries = {e.name: [e.query(v) for v in views] for e in self.embedders}
        with self._lock:
            state = self._state
            raw, ideal = state.lex.scores(terms)
            n = len(raw)
            if n == 0 or not state.lex.live:
                return []
            live, n_live = state.lex.live_mask(n), state.lex.live
            fused = s.coverage_weight * (raw / ideal if ideal > 0 else raw)
            total_weight = sum(s.weights.get(name, 0.0) for name in queries) or 1.0
            # Each book is judged by the view of the request that finds it closest.
            dense = np.zeros((len(views), n))
            for name, vectors in queries.items():
                weight = s.weights.get(name, 0.0) / total_weight
                for v, q in enumerate(vectors):
                    cos, has = state.vectors[name].scores(q, n)
                    has &= live
                    if has.sum() >= 2:
                        dense[v, has] += weight * standardise(cos[has])
            fused += dense.max(axis=0)
            ids = state.ids.data[:n].copy()
        fused = np.where(live, fused, -np.inf)
        top = min(k, n_live)
        best_rows = np.argpartition(-fused, top - 1)[:top]
        best_rows = best_rows[np.lexsort((ids[best_rows], -fused[best_rows]))]
        best = float(fused[best_rows[0]])
        if best < (s.floor if s.floor is not None else floor_for(n_live)):
            return []
        return [Hit(int(ids[r]), float(fused[r])) for r in best_rows if fused[r] >= best - s.margin]

    def _read_request(self, query: str) -> tuple[list[str], list[str]]:
        """(the request's lexical terms, the texts to embed for it): the request itself, and for an
        English one its translation."""
        if not is_foreign_request(query):
            return tokenize(query), [query]
        words = latin_words(query)
        # Words the catalogue itself writes in Latin letters stay as they are (Python, SQL, Linux:
        # translating "python" gives 蟒, the snake). So do authors' names in pinyin, indexed as one
        # word ("yuhua"): adjacent words that join into a term the catalogue has.
        names, used = [], set()
        state, stop = self._state, stopwords()
        lex = state.lex
        for n in (3, 2, 1):
            for i in range(len(words) - n + 1):
                span = set(range(i, i + n))
                joined = "".join(words[i:i + n])
                if not span & used and (n > 1 or joined not in stop) and lex.has(joined):
                    names.append(joined)
                    used |= span
        rest = " ".join(w for i, w in enumerate(words) if i not in used)
        dictionary = shared_dictionary() if self._dictionary is True else self._dictionary or None
        translation = dictionary.translate(rest) if dictionary else None
        known = [state.names.get(name, name) for name in names]  # yuhua -> 余华, python stays
        if translation is None or not (translation.chinese or known != names):
            return tokenize(" ".join([rest, *names])), [query]
        terms = tokenize(" ".join(translation.chinese + translation.untranslated + names))
        return terms, [query, " ".join(known + [translation.text]).strip()]

    # ------------------------------------------------------------ reporting

    def progress(self) -> dict:
        """What /health and /metrics show: books indexed, vectors filled per model, readiness."""
        state = self._state
        return {
            "ready": self.ready,
            "books": state.lex.live,
            "embedded": {name: v.filled for name, v in state.vectors.items()},
            "pending_embeddings": len(self._urgent) + len(self._backlog),
            "error": self.load_error,
        }
