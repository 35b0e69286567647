"""The key/value caches the scheduler hands the model: the running batch's, in which every row has
its own length, and that of one long prompt being prefilled in chunks.

The batch's cache is a set of slots allocated once and reused: per layer, K and V buffers of
[slots, kv_heads, capacity, head_dim]. Row r of the running batch lives in slot r. A decode step
writes one new position per row, at that row's length, and hands the model views of the first
`rows` slots and `width` positions (the longest row's, rounded up to `ALIGN`); a 4D mask hides each
row's unused tail. Rows join after their own
prefill (copied into free slots once) and leave when they finish (the last row moves into the hole),
so requests enter and leave between decode steps (continuous batching) without a per-step copy,
and the buffers are only reallocated when the batch needs more rows or positions than they hold. The
scheduler keeps rows × width within `max_tokens` (`KV_CACHE_TOKENS`), so the cache's memory has a
configured ceiling instead of following the allocator's fragmentation."""

from __future__ import annotations

import sys
from typing import Any

import torch

# Capacity grows in chunks of positions, so that the buffers are rarely reallocated.
CHUNK = 128
# The width the model sees is the longest row's, rounded up only to this: every row's attention reads
# the batch's width, so a width rounded up to CHUNK read up to 127 padding positions per row and
# layer (half the keys, on average, of 32 rows decoding 64 tokens after a short prompt). 16 keeps
# the mask's last dimension aligned for GPU attention kernels.
ALIGN = 16


class BatchKV:
    """Per layer K and V buffers of [slots, kv_heads, capacity, head_dim]; `lengths[r]` positions of
    slot r are valid for each of the `rows` running rows; the model sees `width` positions."""

    def __init__(self, max_slots: int = 0, max_tokens: int = 0) -> None:
        # Allocation bounds: slots (0 = as many as asked for) and slots × capacity (0 = none). The
        # scheduler admits no more rows than the token bound holds at their widest.
        self.max_slots = max_slots
        self.max_tokens = max_tokens
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths = torch.zeros(0, dtype=torch.long)
        self.width = 0
        self.reallocations = 0  # times the buffers grew (a warm server stops growing)

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def nbytes(self) -> int:
        """Bytes held by the buffers (all slots, whether in use or not)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # -------------------------------------------------------------- the interface the model calls

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores one new position per row (key, value: [rows, heads, 1, dim]); returns the rows' views."""
        rows = torch.arange(self.rows, device=key.device)
        pos = self.lengths.to(key.device)
        self.keys[layer_idx][rows, :, pos, :] = key[:, :, 0, :]
        self.values[layer_idx][rows, :, pos, :] = value[:, :, 0, :]
        return self._view(self.keys[layer_idx]), self._view(self.values[layer_idx])

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        return t[:self.rows, :, :self.width]

    # -------------------------------------------------------------- batch membership

    def reserve(self, extra: int = 1) -> None:
        """Makes room for `extra` more positions in the longest row."""
        if self.rows:
            self._widen(int(self.lengths.max()) + extra)

    def add(self, layers: list[tuple[torch.Tensor, torch.Tensor]], lengths: list[int]) -> None:
        """Copies rows from a prefill cache (per layer K, V [n, heads, T, dim]; row i valid up to
        lengths[i]) into the next free slots."""
        old = self.rows
        self._grow(old + len(lengths), round_up(max(lengths) + 1), len(layers), layers[0][0])
        for layer, (k, v) in enumerate(layers):
            for i, n in enumerate(lengths):
                self.keys[layer][old + i, :, :n] = k[i, :, :n]
                self.values[layer][old + i, :, :n] = v[i, :, :n]
        self.lengths = torch.cat([self.lengths, torch.tensor(lengths, dtype=torch.long)])
        self.width = max(self.width, align(max(lengths) + 1))

    def make_room(self, rows: int, positions: int) -> bool:
        """Grows the buffers now if they cannot hold `rows` rows of `positions` positions (for a long
        prompt that will join later: growing is then a step's work of its own instead of part of the
        step that joins it); True if they grew. The views the model sees keep their width."""
        if not self.keys:
            return False
        before = self.reallocations
        self._grow(rows, round_up(positions), len(self.keys), self.keys[0])
        return self.reallocations != before

    def keep(self, rows: list[int]) -> list[int]:
        """Drops every row not listed (finished or cancelled sequences). Each hole is filled by moving
        the last kept row into it, so the order changes: returns, for each slot now, its old row."""
        keep = set(rows)
        occupant = list(range(self.rows))
        i, j = 0, self.rows - 1
        while i <= j:
            if occupant[i] in keep:
                i += 1
            elif occupant[j] not in keep:
                j -= 1
            else:  # a kept row at the end fills the hole at i: one row's positions per layer
                n = int(self.lengths[occupant[j]])
                for t in self.keys + self.values:
                    t[i, :, :n].copy_(t[j, :, :n])
                occupant[i] = occupant[j]
                i += 1
                j -= 1
        order = occupant[:len(keep)]
        self.lengths = self.lengths[torch.tensor(order, dtype=torch.long)]
        # The views narrow to the rows that stay: once a long prompt's row leaves, the others' decode
        # steps stop reading its width (with one 3,000-token row gone, 4 short rows decode in 0.16 s, not 0.3 s).
        # The positions in use; the next step's reserve() makes room for the one it writes (here, one
        # more could pass the buffers' capacity without growing them).
        self.width = align(int(self.lengths.max())) if order else 0
        return order

    def _widen(self, need: int) -> None:
        self._grow(self.rows, round_up(need), len(self.keys), self.keys[0])  # if the buffers lack room
        if need > self.width:
            self.width = align(need)

    def _grow(self, slots: int, width: int, layers: int, like: torch.Tensor) -> None:
        """Reallocates the buffers when `slots` rows or `width` positions do not fit, keeping the rows
        in use. Slots double (up to what is asked), so a batch filling up reallocates a few times;
        slots × capacity stays within `max_tokens`."""
        if slots <= self.slots and width <= self.capacity:
            return
        width = max(width, self.width)
        budget = self.max_tokens or sys.maxsize
        # Doubling pays when the batch fills up; when a long row makes it wider, spare slots at the new
        # width would cost as much to zero as the rows in use (joining a 3,200-token prompt beside 4
        # short rows: 0.71 s with 8 slots).
        more = min(2 * self.slots, self.max_slots or sys.maxsize, budget // width) if width <= self.capacity else 0
        new_slots = max(slots, more)
        # Only as wide as the rows need now: a long row that has left leaves no wide buffers behind.
        shape = (new_slots, like.shape[1], width, like.shape[3])
        rows, valid = self.rows, self.width
        old = self.keys + self.values
        # Zeros, not empty: masked positions still enter attention (as 0 × V), and NaN there would spread.
        fresh = [like.new_zeros(shape) for _ in range(2 * layers)]
        if rows:
            for new_t, old_t in zip(fresh, old):
                new_t[:rows, :, :valid] = old_t[:rows, :, :valid]
        self.keys, self.values = fresh[:layers], fresh[layers:]
        self.reallocations += 1

    # -------------------------------------------------------------- what a decode step needs

    def decode_mask(self, attn_implementation: str, dtype: torch.dtype, device: Any) -> torch.Tensor:
        """[rows, 1, 1, width]: each row sees its own positions plus the one being written now."""
        visible = torch.arange(self.width)[None, :] <= self.lengths[:, None]
        return _attention_mask(visible[:, None, None, :], attn_implementation, dtype, device)

    def positions(self, device: Any) -> torch.Tensor:
        return self.lengths[:, None].to(device)


class PromptKV:
    """The cache of one prompt prefilled a chunk at a time: per layer K and V [1, kv_heads, prompt
    length, head_dim], allocated once and written in place, `length` positions valid.

    Between chunks the prompt's partial cache waits here while the batch decodes; a DynamicCache would
    copy the whole past on every chunk, which on a long prompt costs as much as a decode step."""

    def __init__(self, total: int, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.total = total
        self.length = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for k, v in prefix or []:  # a cached prefix ([1, heads, n, dim] per layer) seeds the cache
            self.keys.append(_pad_to(k, total).clone())
            self.values.append(_pad_to(v, total).clone())
            self.length = k.shape[2]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores a chunk (key, value: [1, heads, t, dim]) after the valid positions; returns them all."""
        if layer_idx == len(self.keys):  # the first chunk allocates, layer by layer
            self.keys.append(key.new_zeros(1, key.shape[1], self.total, key.shape[3]))
            self.values.append(value.new_zeros(1, value.shape[1], self.total, value.shape[3]))
        end = self.length + key.shape[2]
        self.keys[layer_idx][:, :, self.length:end] = key
        self.values[layer_idx][:, :, self.length:end] = value
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def chunk_mask(self, t: int, attn_implementation: str, dtype: torch.dtype, device: Any) -> torch.Tensor:
        """[1, 1, t, length + t]: the chunk's token i sees the cached positions and chunk tokens up to i."""
        return prefill_mask([self.length + t], self.length, t, attn_implementation, dtype, device)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K, V) of the valid positions, [1, heads, length, dim] (views)."""
        return [(k[:, :, :self.length], v[:, :, :self.length]) for k, v in zip(self.keys, self.values)]


def prefill_mask(lengths: list[int], cached: int, width: int, attn_implementation: str, dtype: torch.dtype,
                 device: Any) -> torch.Tensor:
    """[rows, 1, width, cached + width] for prompts right-padded to `width` new tokens after `cached`
    cached ones: token i of row r sees positions up to its own and below the row's length.

    Always a 4D mask, even for one unpadded prompt: given none, transformers runs attention's causal
    kernel, whose rounding differs from the masked one a padded batch needs, and in bf16 that was
    enough for a prompt's greedy text to depend on whether it was prefilled alone or with others."""
    keys = torch.arange(cached + width)[None, None, :]
    queries = cached + torch.arange(width)[None, :, None]
    visible = (keys <= queries) & (keys < torch.tensor(lengths)[:, None, None])
    return _attention_mask(visible[:, None], attn_implementation, dtype, device)


def _attention_mask(visible: torch.Tensor, attn_implementation: str, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """A boolean 4D visibility mask in the form the model's attention takes."""
    from .attention import ATTENTION

    mask = visible.to(device)
    if attn_implementation in ("sdpa", ATTENTION):
        return mask  # a boolean mask: True = attend
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)


def round_up(n: int) -> int:
    """Positions the buffers hold for a row of n tokens (their capacity grows in CHUNKs)."""
    return ((n + CHUNK - 1) // CHUNK) * CHUNK


def align(n: int) -> int:
    """The width the model sees for a longest row of n positions."""
    return ((n + ALIGN - 1) // ALIGN) * ALIGN


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[2] == width else torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[2]))
