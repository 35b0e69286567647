"""Per-request sampling parameters and the choice of the next token from logits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False          # vLLM extension: generate exactly max_tokens
    min_tokens: int = 0               # vLLM extension: no end-of-turn before this many tokens
    grammar: Any = None               # a compiled xgrammar grammar, or None
    presence_penalty: float = 0.0     # OpenAI's, and the rest: see logits.py
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0   # 1 = off
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None       # None: none; k: the chosen token's and the k most likely tokens'


def next_token(logits: Any, params: SamplingParams, generator: Any) -> int:
    """Temperature + nucleus sampling (the scheduler decodes greedy rows itself). logits: [vocab] float32."""
    import torch

    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        sorted_probs[(cumulative - sorted_probs) > params.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
