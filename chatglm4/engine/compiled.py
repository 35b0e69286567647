"""The decode step through `torch.compile` (`COMPILE=on`): the same model call, with the few
thousand small operator calls of a step (norms, rotary, attention's softmax, the residual adds)
fused by inductor into generated kernels. On a CPU a decode step of one row spends about as long
dispatching those calls as it spends reading the weights, which is where llama.cpp's server is
faster at one stream.

Only decode is compiled: prefill shapes vary with every prompt and a chunk's cost is its matrix
products. The weights are frozen into the graph (inductor's `freezing`), which lets inductor call the
oneDNN-packed linears directly. `warm_up` compiles, before the server says ready, every graph the
step needs: one for a single row (a size of 1 is always specialized), one for several rows, each with
the cache's sizes left symbolic. After it, a step that would need another graph runs eagerly
instead of compiling (`eager_on_recompile`): a compile takes minutes, and every stream would wait."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from .batchkv import BatchKV, PromptKV
from .modelload import ModelLoadError

log = logging.getLogger(__name__)

# Decode steps per warm-up stage: enough to cross a width boundary (`batchkv.ALIGN`) once.
WARM_UP_STEPS = 20
WARM_UP_PROMPT = 8


def decode_forward(forward: Callable, model: Any, cache: BatchKV, tokens: Any, device: Any) -> Any:
    """One decode step of every row of `cache` ([rows, 1] next tokens); the last position's logits."""
    cache.reserve(1)
    mask = cache.decode_mask(model.config._attn_implementation, model.dtype, device)
    out = forward(input_ids=tokens, attention_mask=mask, position_ids=cache.positions(device),
                  past_key_values=cache, use_cache=True)
    cache.lengths += 1
    return out.logits[:, -1, :]


def compile_decode(model: Any) -> Callable:
    """`model` compiled for decode steps (dynamic sizes, frozen weights); nothing is compiled until
    the first call (`warm_up`)."""
    import torch
    import torch._inductor.config as inductor

    inductor.freezing = True
    return torch.compile(model, dynamic=True)


def warm_up(model: Any, forward: Callable, device: Any) -> float:
    """Runs `forward` through the shapes serving will give it, so that every graph compiles now;
    then sets torch to run eagerly where a later step would need a new graph. Returns the seconds."""
    import torch

    started = time.monotonic()
    ids = torch.arange(100, 100 + WARM_UP_PROMPT, device=device)[None, :]
    with torch.inference_mode():
        prompt = PromptKV(WARM_UP_PROMPT)
        model(input_ids=ids, attention_mask=prompt.chunk_mask(WARM_UP_PROMPT, model.config._attn_implementation,
                                                              model.dtype, device),
              position_ids=torch.arange(WARM_UP_PROMPT, device=device)[None, :], past_key_values=prompt,
              use_cache=True)
        prompt.length = WARM_UP_PROMPT
        layers = prompt.layers()
        cache = BatchKV()
        # One row in buffers of one slot, then three rows (the buffers grow), then one row again in
        # buffers of several slots, then two: the sizes a serving batch passes through.
        try:
            for rows in (1, 3, 1, 2):
                if rows > cache.rows:
                    more = rows - cache.rows
                    cache.add([(k.expand(more, -1, -1, -1), v.expand(more, -1, -1, -1)) for k, v in layers],
                              [WARM_UP_PROMPT] * more)
                elif rows < cache.rows:
                    cache.keep(list(range(rows)))
                tokens = torch.full((rows, 1), 100, device=device)
                for _ in range(WARM_UP_STEPS):
                    decode_forward(forward, model, cache, tokens, device)
        except Exception as exc:  # inductor's and dynamo's errors share no narrower base
            raise ModelLoadError(f"the decode step does not compile here ({type(exc).__name__}: {exc}); "
                                 "COMPILE=off serves without compiling") from exc
    torch.compiler.set_stance("eager_on_recompile")
    seconds = time.monotonic() - started
    log.info("decode step compiled in %.0f s", seconds)
    return seconds
