"""Token ids to text, piece by piece: never a broken multi-byte character, never a stop string."""

from __future__ import annotations

from typing import Any, Sequence

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Decodes a growing list of token ids into text deltas.

    A Chinese character can span several byte-level tokens; decoding a window that ends inside one
    yields U+FFFD, so such a delta is held back until the character is complete. The window starts a
    few tokens back because some tokenizers render a token differently at the start of a text."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text it completes ('' while a character is incomplete)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of generation, less a character left incomplete."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):].rstrip(REPLACEMENT) if len(full) > len(prefix) else ""


class StopStrings:
    """Cuts the text at the first stop string; holds back a tail that may be the start of one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        text = self.pending + piece
        if not self.stops:
            self.pending = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[:min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest
