"""Sampling defaults for what a request leaves unset, as vLLM takes them: from the model's own
generation_config.json (GLM-4 ships a temperature and top_p), else ours.

The embedded SmolLM2-135M-Instruct has no generation_config (a GGUF file). Measured here on "你好":
its first token is "Hello" (p 0.10) or the first byte of an emoji (p 0.08), and a reply that starts
with an emoji runs on in emoji to max_tokens. Sampled at its model card's temperature 0.2 (top_p
0.9, repetition penalty 1.1) that happened to 4 of 8 seeds; greedy with the same penalty it answers
"Hello there! ..." in 28 tokens and stops. So it decodes greedily unless a request asks otherwise."""

from __future__ import annotations

from typing import Any

BUILT_IN = {"temperature": 0.7, "top_p": 1.0, "repetition_penalty": 1.0}
EMBEDDED = {"temperature": 0.0, "top_p": 0.9, "repetition_penalty": 1.1}
KEYS = tuple(BUILT_IN)


def from_model(model: Any, embedded: bool) -> dict[str, float]:
    """The sampling values the model declares (only those it sets)."""
    if embedded:
        return dict(EMBEDDED)
    config = getattr(model, "generation_config", None)
    declared = config.to_diff_dict() if config is not None else {}
    return {k: float(declared[k]) for k in KEYS if isinstance(declared.get(k), (int, float))}
