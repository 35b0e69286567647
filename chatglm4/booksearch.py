"""Book search as the gateway runs it: retrieval over the catalogue, the model's choice among the
candidates, and a last check that every answered book still exists."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydantic import ValidationError

from .catalogue import Catalogue
from .protocol import Book, BookSearchTaskRequest, BookSearchTaskResponse
from .searchindex import CatalogueIndex
from .errors import Unavailable
from .upstream import ModelServerPool, UpstreamError

log = logging.getLogger(__name__)

NO_MATCH = "书籍不存在"


@dataclass
class SearchResult:
    books: list[Book]
    message: str
    candidates: int


class BookSearch:
    """Retrieval (the hybrid index) narrows the catalogue; the model chooses among the candidates,
    shown with author and subjects; the catalogue confirms what exists."""

    # How long a search waits for the index's first build before answering 503.
    READY_WAIT_S = 30.0

    def __init__(self, catalogue: Catalogue, pool: ModelServerPool, index: CatalogueIndex, candidates: int = 8,
                 model_choice: bool = True):
        self.catalogue = catalogue
        self.pool = pool
        self.index = index
        self.candidates = candidates
        self.model_choice = model_choice

    def refresh(self) -> None:
        """Makes this process's own catalogue writes searchable before its request returns."""
        self.index.refresh()

    def search(self, query: str) -> SearchResult:
        """Books answering `query`, best first; only books in the catalogue at the time of the answer."""
        if not self.index.wait_ready(self.READY_WAIT_S):
            raise Unavailable("the search index is still being built; retry shortly", retry_after=5,
                              code="index_loading")
        hits = self.index.search(query, self.candidates)
        books = self.catalogue.get_many(h.book_id for h in hits)
        if not books:
            return SearchResult([], NO_MATCH, 0)
        if not self.model_choice:
            return SearchResult(books, f"找到 {len(books)} 本书", len(books))
        task = BookSearchTaskRequest(query=query, books=books)
        raw = self.pool.request("POST", "/tasks/book_search", json=task.model_dump(exclude_defaults=True))
        try:
            answer = BookSearchTaskResponse.model_validate_json(raw.content)
        except ValidationError as exc:
            log.error("model server answered book_search with an unexpected shape: %s", exc)
            raise UpstreamError(502, "the model server's answer was malformed", "upstream_error") from None
        offered = {b.id for b in books}
        chosen = [i for i in answer.ids if i in offered]
        # The catalogue may have changed while the model was thinking: answer only what exists now.
        found = self.catalogue.get_many(chosen)
        if not found:
            return SearchResult([], NO_MATCH, len(books))
        return SearchResult(found, f"找到 {len(found)} 本书", len(books))
