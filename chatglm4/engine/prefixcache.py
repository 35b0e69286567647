"""Reuse of prompt prefixes: the key/value cache of prompt beginnings already computed.

A book search prompt starts with the same instructions every time, and each turn of a conversation
starts with the previous turn's prompt. Prefixes are kept in whole blocks of BLOCK tokens, keyed by a
chain hash (block k's key covers blocks 0..k), least recently used first out, bounded by tokens."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

BLOCK = 32


def block_keys(ids: list[int]) -> list[int]:
    """Chain hashes of each whole block of `ids`: keys[k] identifies ids[:(k + 1) * BLOCK]."""
    keys, h = [], 0
    for start in range(0, len(ids) - len(ids) % BLOCK, BLOCK):
        h = hash((h, tuple(ids[start:start + BLOCK])))
        keys.append(h)
    return keys


class PrefixCache:
    """prefix → per-layer (K, V) of shape [1, heads, n, dim]; at most `max_tokens` tokens kept.

    Each stored prompt is findable at every block boundary (two book searches share only the
    instructions): the index maps each boundary's key to the entry, and a hit returns views."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.tokens = 0
        self.hit_tokens = 0
        self._entries: OrderedDict[int, tuple[int, list[tuple[Any, Any]], list[int]]] = OrderedDict()
        self._index: dict[int, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def longest(self, ids: list[int]) -> tuple[int, list[tuple[Any, Any]] | None]:
        """(n, layers) for the longest cached prefix of ids that leaves at least one token to compute."""
        if self.max_tokens <= 0:
            return 0, None
        keys = block_keys(ids[:len(ids) - 1])
        with self._lock:
            for k in range(len(keys) - 1, -1, -1):
                found = self._index.get(keys[k])
                if found is None:
                    continue
                entry_key, n = found
                _, kv, _ = self._entries[entry_key]
                self._entries.move_to_end(entry_key)
                self.hit_tokens += n
                return n, [(key[:, :, :n], value[:, :, :n]) for key, value in kv]
        return 0, None

    def store(self, ids: list[int], layers: list[tuple[Any, Any]], row: int, copy: bool = True) -> None:
        """Keeps the longest whole-block prefix of a just-prefilled prompt (row `row` of `layers`);
        copy=False when nothing else will write to `layers` (a chunked prompt's own cache)."""
        keys = block_keys(ids[:len(ids) - 1])
        n = len(keys) * BLOCK
        if not keys or n > self.max_tokens:
            return
        with self._lock:
            found = self._index.get(keys[-1])
            if found is not None and found[1] == n:
                self._entries.move_to_end(found[0])
                return
        kv = [(k[row:row + 1, :, :n], v[row:row + 1, :, :n]) for k, v in layers]
        if copy:  # a batched prefill's tensors hold every row of it: views would keep them all alive
            kv = [(k.clone(), v.clone()) for k, v in kv]
        with self._lock:
            self._entries[keys[-1]] = (n, kv, keys)
            for i, key in enumerate(keys):
                self._index[key] = (keys[-1], (i + 1) * BLOCK)
            self.tokens += n
            while self.tokens > self.max_tokens:
                evicted, (m, _, old_keys) = self._entries.popitem(last=False)
                self.tokens -= m
                for key in old_keys:
                    if self._index.get(key, (None,))[0] == evicted:
                        del self._index[key]
