"""Fitting a conversation into the model's context: the oldest turns go first, the newest never."""

from __future__ import annotations

from typing import Callable


class ContextOverflow(ValueError):
    """Even the newest message alone (with the system prompt) does not fit."""


def fit_conversation(messages: list[dict], encode: Callable[[list[dict]], list[int]],
                     budget: int) -> tuple[list[dict], list[int]]:
    """(kept messages, their prompt ids) with len(ids) <= budget, dropping whole turns oldest first.

    The kept history starts at a user message (or is the newest message alone). Dropping more turns
    never makes the prompt longer, so the longest history that fits is found by binary search over
    those cut points: O(log turns) encodings instead of one per dropped turn."""
    system = [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    last = len(rest) - 1
    cuts = sorted({0, last} | {i for i in range(1, last) if rest[i]["role"] == "user"})
    encoded: dict[int, list[int]] = {}

    def fits(k: int) -> bool:
        encoded[k] = encode(system + rest[cuts[k]:])
        return len(encoded[k]) <= budget

    lo, hi = 0, len(cuts) - 1
    if not fits(hi):
        raise ContextOverflow(
            f"the newest message needs {len(encoded[hi])} prompt tokens but only {budget} are available "
            f"(context minus max_tokens); shorten it or lower max_tokens")
    while lo < hi:  # invariant: cuts[hi] fits
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return system + rest[cuts[hi]:], encoded[hi]
