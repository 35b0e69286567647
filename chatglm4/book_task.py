"""The book-search template task: narrow the catalogue, constrain the answer to candidate ids, parse."""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

from .protocol import Book, BookSearchTaskRequest


def narrow(request: BookSearchTaskRequest, limit: int) -> list[Book]:
    """The books the model may see: all of them when few, else the best lexical matches (maybe none)."""
    if len(request.books) <= limit:
        return list(request.books)
    from .retrieval import KeywordIndex

    return [hit.book for hit in KeywordIndex(request.books).search(request.query, limit)]


def ids_schema(candidate_ids: list[int]) -> dict:
    """JSON schema admitting only {"ids": [distinct candidate ids]}."""
    return {
        "type": "object",
        "properties": {
            "ids": {"type": "array", "items": {"type": "integer", "enum": candidate_ids},
                    "maxItems": len(candidate_ids)},
        },
        "required": ["ids"],
        "additionalProperties": False,
    }


def max_answer_tokens(candidate_ids: list[int]) -> int:
    """Enough tokens for the longest valid answer (every id once), with slack for the framing."""
    return 16 + sum(len(str(i)) + 2 for i in candidate_ids)


_INT = re.compile(r"-?\d+")


def parse_ids(text: str, allowed: Iterable[int]) -> list[int]:
    """Candidate ids from the model's answer, in order, once each; anything else is dropped.

    The answer is constrained, so it is normally exact JSON; a reply cut short by the token limit
    still yields the ids it completed."""
    allowed = set(allowed)
    found: list[Any]
    try:
        value = json.loads(text)
        found = value.get("ids", []) if isinstance(value, dict) else []
        if not isinstance(found, list):
            found = []
    except json.JSONDecodeError:
        body = text.split("[", 1)[1] if "[" in text else ""
        complete = body if "]" in body else body.rsplit(",", 1)[0] if "," in body else ""
        found = [int(m) for m in _INT.findall(complete.split("]", 1)[0])]
    out: list[int] = []
    for item in found:
        if isinstance(item, int) and not isinstance(item, bool) and item in allowed and item not in out:
            out.append(item)
    return out
