"""Book search as the gateway runs it: retrieval over the catalogue, the model's choice among the
candidates, and a last check that every answered book still exists."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .catalogue import Book, Catalogue
from .retrieval import IndexCache
from .upstream import ModelServerPool

log = logging.getLogger(__name__)

NO_MATCH = "书籍不存在"


@dataclass
class SearchResult:
    books: list[Book]
    message: str
    candidates: int


class BookSearch:
    def __init__(self, catalogue: Catalogue, pool: ModelServerPool, candidates: int = 8):
        self.catalogue = catalogue
        self.pool = pool
        self.candidates = candidates
        self.indexes = IndexCache()

    def search(self, query: str) -> SearchResult:
        """Books answering `query`, best first; only books in the catalogue at the time of the answer."""
        index = self.indexes.get(self.catalogue.fingerprint(),
                                 lambda: ((b.id, b.title) for b in self.catalogue.all()))
        hits = index.search(query, self.candidates)
        if not hits:
            return SearchResult([], NO_MATCH, 0)
        books = [{"id": c.id, "title": c.title} for c in hits]
        answer = self.pool.request("POST", "/tasks/book_search", json={"query": query, "books": books}).json()
        offered = {b["id"] for b in books}
        chosen = [i for i in answer.get("ids", []) if isinstance(i, int) and i in offered]
        # The catalogue may have changed while the model was thinking: answer only what exists now.
        found = self.catalogue.get_many(chosen)
        if not found:
            return SearchResult([], NO_MATCH, len(books))
        return SearchResult(found, f"找到 {len(found)} 本书", len(books))
