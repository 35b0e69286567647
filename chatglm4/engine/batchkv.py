"""The key/value cache of a running batch in which every row has its own length.

Rows join after their own prefill and leave when they finish, so requests enter and leave between
decode steps (continuous batching). Each decode step writes one new position per row, at that row's
length; a 4D mask hides the unused tail of shorter rows. Rows are copied only when the batch changes,
never on an ordinary step."""

from __future__ import annotations

from typing import Any

import torch

# Capacity grows in chunks so that appending a position rarely reallocates.
CHUNK = 128


class BatchKV:
    """Per layer K and V of shape [rows, kv_heads, capacity, head_dim]; `lengths[r]` positions are valid."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths = torch.zeros(0, dtype=torch.long)

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    # -------------------------------------------------------------- the interface the model calls

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores one new position per row (key, value: [rows, heads, 1, dim]); returns the whole cache."""
        rows = torch.arange(self.rows, device=key.device)
        pos = self.lengths.to(key.device)
        self.keys[layer_idx][rows, :, pos, :] = key[:, :, 0, :]
        self.values[layer_idx][rows, :, pos, :] = value[:, :, 0, :]
        return self.keys[layer_idx], self.values[layer_idx]

    # -------------------------------------------------------------- batch membership

    def reserve(self, extra: int = 1) -> None:
        """Makes room for `extra` more positions in the longest row."""
        need = int(self.lengths.max()) + extra if self.rows else 0
        if need <= self.capacity:
            return
        width = _round_up(need)
        self.keys = [_pad_to(k, width) for k in self.keys]
        self.values = [_pad_to(v, width) for v in self.values]

    def add(self, layers: list[tuple[torch.Tensor, torch.Tensor]], lengths: list[int]) -> None:
        """Appends rows from a prefill cache (per layer K, V [n, heads, T, dim]; row i valid up to lengths[i])."""
        width = max(self.capacity, _round_up(max(lengths) + 1))
        if self.keys and width > self.capacity:
            self.keys = [_pad_to(k, width) for k in self.keys]
            self.values = [_pad_to(v, width) for v in self.values]
        new_keys, new_values = [], []
        for k, v in layers:
            kk = k.new_zeros(len(lengths), k.shape[1], width, k.shape[3])
            vv = v.new_zeros(len(lengths), v.shape[1], width, v.shape[3])
            for i, n in enumerate(lengths):
                kk[i, :, :n] = k[i, :, :n]
                vv[i, :, :n] = v[i, :, :n]
            new_keys.append(kk)
            new_values.append(vv)
        if self.keys:
            self.keys = [torch.cat([a, b]) for a, b in zip(self.keys, new_keys)]
            self.values = [torch.cat([a, b]) for a, b in zip(self.values, new_values)]
        else:
            self.keys, self.values = new_keys, new_values
        self.lengths = torch.cat([self.lengths, torch.tensor(lengths, dtype=torch.long)])

    def keep(self, rows: list[int]) -> None:
        """Drops every row not listed (finished or cancelled sequences)."""
        if len(rows) == self.rows:
            return
        if not rows:
            self.__init__()
            return
        index = torch.tensor(rows, dtype=torch.long)
        self.keys = [k.index_select(0, index.to(k.device)) for k in self.keys]
        self.values = [v.index_select(0, index.to(v.device)) for v in self.values]
        self.lengths = self.lengths.index_select(0, index)

    # -------------------------------------------------------------- what a decode step needs

    def decode_mask(self, attn_implementation: str, dtype: torch.dtype, device: Any) -> torch.Tensor:
        """[rows, 1, 1, capacity]: each row sees its own positions plus the one being written now."""
        visible = torch.arange(self.capacity)[None, :] <= self.lengths[:, None]
        mask = visible[:, None, None, :].to(device)
        if attn_implementation == "sdpa":
            return mask  # SDPA takes a boolean mask: True = attend
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)

    def positions(self, device: Any) -> torch.Tensor:
        return self.lengths[:, None].to(device)


def _round_up(n: int) -> int:
    return ((n + CHUNK - 1) // CHUNK) * CHUNK


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[2] == width else torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[2]))
