"""Per-request changes to a sequence's next-token logits before the grammar mask and sampling, and
the log-probabilities a request asks to see.

- `presence_penalty` / `frequency_penalty` (OpenAI): minus p for every token already generated,
  minus f times how often it was;
- `repetition_penalty` (the GLM and transformers demos' definition): a token already in the prompt
  or the reply has its logit divided by r when positive, multiplied by r when negative;
- `logit_bias` (OpenAI): added to the named tokens' logits.

Rows without any of these skip this module entirely, so the common case costs nothing."""

from __future__ import annotations

from typing import Any

from .sampling import SamplingParams


def needs_adjusting(params: SamplingParams) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
                or params.logit_bias)


class LogitsAdjuster:
    """One sequence's penalties and biases; `observe` each token it generates."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int]):
        self.params = params
        self._prompt_ids = prompt_ids
        self._counts: Any = None   # [vocab] float32: times each token was generated
        self._seen: Any = None     # [vocab] bool: in the prompt or generated (repetition penalty)

    def _allocate(self, vocab: int) -> None:
        import torch

        self._counts = torch.zeros(vocab, dtype=torch.float32)
        self._seen = torch.zeros(vocab, dtype=torch.bool)
        if self.params.repetition_penalty != 1.0:
            ids = torch.tensor([t for t in self._prompt_ids if 0 <= t < vocab], dtype=torch.long)
            self._seen[ids] = True

    def apply(self, row: Any) -> None:
        """Adjusts one row of logits ([vocab] float32) in place."""
        import torch

        if self._counts is None:
            self._allocate(row.shape[0])
        p = self.params
        if p.repetition_penalty != 1.0:
            picked = row[self._seen]
            row[self._seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if p.frequency_penalty:
            row -= p.frequency_penalty * self._counts
        if p.presence_penalty:
            row -= p.presence_penalty * (self._counts > 0).float()
        for token, bias in p.logit_bias.items():
            if 0 <= token < row.shape[0]:  # ids past this model's vocabulary name no token: nothing to bias
                row[token] += bias

    def observe(self, token: int) -> None:
        if self._counts is not None and 0 <= token < self._counts.shape[0]:
            self._counts[token] += 1
            self._seen[token] = True


def top_logprobs(row: Any, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """(log-probability of `token`, the k most likely tokens with theirs) under the distribution the
    token was drawn from (after penalties, biases and the grammar; before temperature)."""
    import torch

    logprobs = torch.log_softmax(row, dim=-1)
    chosen = float(logprobs[token])
    if k <= 0:
        return chosen, []
    values, ids = torch.topk(logprobs, k)
    return chosen, [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist())]
