"""Fitting a conversation into the model's context: the oldest turns go first, the newest never."""

from __future__ import annotations

from typing import Callable


class ContextOverflow(ValueError):
    """Even the newest message alone (with the system prompt) does not fit."""


def fit_conversation(messages: list[dict], encode: Callable[[list[dict]], list[int]],
                     budget: int) -> tuple[list[dict], list[int]]:
    """(kept messages, their prompt ids) with len(ids) <= budget, dropping whole turns oldest first."""
    system = [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    while True:
        ids = encode(system + rest)
        if len(ids) <= budget:
            return system + rest, ids
        if len(rest) <= 1:
            raise ContextOverflow(
                f"the newest message needs {len(ids)} prompt tokens but only {budget} are available "
                f"(context minus max_tokens); shorten it or lower max_tokens")
        # Drop the oldest message and then up to the next user message, so the kept history still
        # starts with a user turn; the newest message is never dropped.
        rest = rest[1:]
        while len(rest) > 1 and rest[0]["role"] != "user":
            rest = rest[1:]
