"""Where book embeddings live: on disk, keyed by model and content, so none is computed twice
(not at the next start, not for a book whose text did not change); in memory, one matrix per model
with a row per vector held."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Iterable

import numpy as np

from .growable import Growable

log = logging.getLogger(__name__)


def content_key(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()


class EmbeddingCache:
    """A SQLite file of (model, sha1 of the embedded text) -> float16 vector.

    Keyed by content rather than book id: an edit that changes the text misses and is embedded again,
    one that does not (or the same book in another catalogue) hits. float16 halves the file; the
    cosine ranking does not notice."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._conn:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("CREATE TABLE IF NOT EXISTS embedding (model TEXT NOT NULL, key BLOB NOT NULL, "
                               "vector BLOB NOT NULL, PRIMARY KEY (model, key)) WITHOUT ROWID")

    def get_many(self, model: str, keys: list[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                batch = keys[start:start + 500]
                marks = ",".join("?" * len(batch))
                for key, blob in self._conn.execute(
                        f"SELECT key, vector FROM embedding WHERE model = ? AND key IN ({marks})", [model, *batch]):
                    found[key] = np.frombuffer(blob, dtype=np.float16).astype(np.float32)
        return found

    def put_many(self, model: str, items: Iterable[tuple[bytes, np.ndarray]]) -> None:
        rows = [(model, key, np.asarray(vec, dtype=np.float16).tobytes()) for key, vec in items]
        with self._lock, self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO embedding (model, key, vector) VALUES (?, ?, ?)", rows)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class VectorRows:
    """One model's vectors for rows as the lexical index numbers them; rows without a vector yet are
    marked and left out of the statistics.

    The vectors are stored in the order they arrive, not at their row. While a large import's backlog
    is embedded, a book added now gets a row past every imported one and its vector at once: a matrix
    indexed by row then had to hold every row below it (1,000,000 x (384 + 512) float32 is 3.5 GB,
    written while the request waited, then 7 GB when the next book doubled it). Here memory and
    scoring follow the vectors held."""

    def __init__(self, dim: int):
        self.dim = dim
        self._matrix = Growable(np.float32, width=dim)   # slot -> vector
        self._row = Growable(np.int64)                   # slot -> its row; -1 once dropped
        self._slot = Growable(np.int32)                  # row -> its slot + 1; 0: no vector
        self._slots = 0
        self.filled = 0
        self._lock = threading.Lock()

    def put(self, rows: list[int], vectors: np.ndarray) -> None:
        """Sets the vectors of `rows` (distinct), replacing any they had."""
        at = np.asarray(rows, dtype=np.int64)
        with self._lock:
            self._slot.ensure(int(at.max()) + 1)
            slots = self._slot.data[at].astype(np.int64) - 1
            new = slots < 0
            added = int(new.sum())
            slots[new] = np.arange(self._slots, self._slots + added)
            self._slots += added
            self._matrix.ensure(self._slots)
            self._row.ensure(self._slots)
            self._matrix.data[slots] = vectors
            self._row.data[slots] = at
            self._slot.data[at] = slots + 1
            self.filled += added

    def drop(self, row: int) -> None:
        # The slot stays taken until the index is rebuilt (as the lexical index's dead rows do).
        with self._lock:
            if self.has(row):
                self._row.data[self._slot.data[row] - 1] = -1
                self._slot.data[row] = 0
                self.filled -= 1

    def has(self, row: int) -> bool:
        return row < len(self._slot.data) and bool(self._slot.data[row])

    def scores(self, query: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosine of every row 0..rows-1 with the query, mask of rows that have a vector)."""
        cos = np.zeros(rows, dtype=np.float32)
        has = np.zeros(rows, dtype=np.bool_)
        with self._lock:
            held = self._matrix.data[:self._slots] @ query
            at = self._row.data[:self._slots]
            keep = (at >= 0) & (at < rows)
            cos[at[keep]] = held[keep]
            has[at[keep]] = True
        return cos, has
