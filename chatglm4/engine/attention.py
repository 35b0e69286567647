"""Attention whose result for a row does not depend on what else is in the batch.

torch's fused CPU attention (SDPA's flash kernel) blocks its work by the number of keys: the same
prompt attended over 35 keys, or over 46 of which 11 are padding, rounds differently. In float32 the
difference stays below what flips a greedy choice; in bf16 it does not (a prompt prefilled beside a
longer one read differently after ~40 tokens). This implementation computes scores, softmax and the
weighted sum in float32 with plain matmuls, where masked keys contribute exact zeros wherever they
sit, so a row reads the same at any batch width. Registered with transformers as `ATTENTION`; the
engine selects it on CPU (`use_batch_invariant_attention`). Query heads are grouped onto their
key/value head without copying the cache (the repeat that grouped-query attention otherwise needs)."""

from __future__ import annotations

from typing import Any

ATTENTION = "chatglm4_invariant"
# Queries per block in a long prefill: bounds the float32 scores at heads x block x keys.
QUERY_BLOCK = 256

_registered = False


def register() -> None:
    """Makes `ATTENTION` a name transformers' models accept as their attention implementation."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION, invariant_attention)
        _registered = True


def use_batch_invariant_attention(model: Any) -> bool:
    """Switches a loaded transformers model to this attention (CPU engines); False, leaving the model
    as it is, for attention this does not compute (soft-capped scores, as Gemma 2's)."""
    if getattr(model.config, "attn_logit_softcapping", None) is not None:
        return False
    register()
    model.set_attn_implementation(ATTENTION)
    return True


def invariant_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                        scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """query [b, Hq, T, D], key/value [b, Hk, S, D], attention_mask a boolean [b or 1, 1, T, S]
    (True = attend) or None (causal, keys aligned to the end); returns [b, T, Hq, D] and no weights."""
    import torch

    b, hq, t, d = query.shape
    hk, s = key.shape[1], key.shape[2]
    groups = hq // hk
    scale = scaling if scaling is not None else d ** -0.5
    if attention_mask is None:  # the engine always passes a mask; this keeps the function usable alone
        attention_mask = (torch.arange(s, device=query.device)[None, :]
                          <= torch.arange(t, device=query.device)[:, None] + (s - t))[None, None]
    elif attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0  # an additive mask: 0 where visible
    k = key.float().transpose(2, 3)  # [b, Hk, D, S]
    v = value.float()
    # [b, Hk, groups, T, D]: the query heads that share key/value head h are rows of one matmul.
    q = query.float().reshape(b, hk, groups, t, d)
    out = torch.empty((b, hk, groups, t, d), dtype=torch.float32, device=query.device)
    for start in range(0, t, QUERY_BLOCK):
        end = min(t, start + QUERY_BLOCK)
        qb = q[:, :, :, start:end].reshape(b, hk, groups * (end - start), d)
        scores = torch.matmul(qb, k).mul_(scale).view(b, hk, groups, end - start, s)
        visible = attention_mask[:, :, None, start:end]  # [b, 1, 1, block, S]
        scores.masked_fill_(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(b, hk, groups * (end - start), s)
        out[:, :, :, start:end] = torch.matmul(probs, v).view(b, hk, groups, end - start, d)
    out = out.view(b, hq, t, d).transpose(1, 2).to(query.dtype).contiguous()
    return out, None
