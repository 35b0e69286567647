"""Times the full-size glm-4-9b-chat-hf architecture on this machine's GPU(s), without downloading it.

    python bench/gpu_check.py [--batch 32] [--prompt-tokens 512] [--new-tokens 128] [--gpus 0]
                              [--compile eager|compiled|both]

Builds `GlmForCausalLM` from glm-4-9b-chat-hf's published configuration with random bf16 weights made
directly on the GPU(s), serves it through the model server's own engine (`LocalEngine`), and prints
the memory used per GPU, the time to first token, and the decode speed at batch 1 and at batch
`--batch` (that many concurrent requests through the engine), each next to its memory-bandwidth
floor: the bytes a decode step must read (every weight once, plus the KV cache) divided by the
device-to-device copy bandwidth measured here; by default twice, with the decode step eager and
compiled (`COMPILE=on`, `chatglm4/engine/compiled.py`). Token ids come from the small test tokenizer
(tests/tiny_glm.py): only the timing matters, and random weights write noise anyway.

Exits with a message (status 2) when no CUDA GPU is present. Writes nothing to disk."""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("gpu_check")

EXIT_NO_GPU = 2

# glm-4-9b-chat-hf's config.json. Every value below is the default of transformers' GlmConfig
# (transformers/models/glm/configuration_glm.py, 5.23.0, documented against THUDM/glm-4-9b-chat),
# and matches the published config.json of THUDM (now zai-org) / ZhipuAI glm-4-9b-chat-hf as quoted
# by third-party loaders (e.g. CogView4's GLM text encoder, GLM-4 config parsers); the stop ids are
# also GLM-4 issue #398's <|endoftext|>, <|user|>, <|observation|>.
GLM4_9B_CHAT_HF = dict(
    vocab_size=151552,               # padded embedding rows; the tokenizer has ~151343 tokens
    hidden_size=4096,
    intermediate_size=13696,
    num_hidden_layers=40,
    num_attention_heads=32,
    num_key_value_heads=2,           # grouped-query attention: 2 KV heads for 32 query heads
    head_dim=128,
    max_position_embeddings=131072,  # 128K context
    rms_norm_eps=1.5625e-07,
    attention_bias=True,             # q/k/v projections carry biases
    tie_word_embeddings=False,
    hidden_act="silu",
    # transformers 5 keeps rotary settings together: GLM-4 rotates half of each head (factor 0.5).
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    eos_token_id=[151329, 151336, 151338],
    pad_token_id=151329,
)


@dataclass
class Run:
    """One timed engine run: per-request time to first token and the decode rate of the whole batch."""

    batch: int
    ttft_s: list[float]
    decode_tokens_per_s: float
    completion_tokens: int


# ------------------------------------------------------------------ model

def glm4_config() -> Any:
    from transformers import GlmConfig

    return GlmConfig(**GLM4_9B_CHAT_HF)


def _device_for(name: str, device_map: dict[str, Any]) -> Any:
    best = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len)
    return device_map[best]


def plan_devices(model: Any, gpus: list[int], weight_bytes: int) -> dict[str, Any]:
    """{"": gpu} when the weights fit on the first GPU with room for the KV cache, else accelerate's split."""
    import torch
    from accelerate import infer_auto_device_map

    free = {i: torch.cuda.mem_get_info(i)[0] for i in gpus}
    # 15% headroom for activations, the KV cache of a 32-request batch and the allocator.
    if weight_bytes * 1.15 < free[gpus[0]]:
        return {"": gpus[0]}
    device_map = infer_auto_device_map(model, max_memory={i: int(f * 0.85) for i, f in free.items()},
                                       no_split_module_classes=list(model._no_split_modules), dtype=torch.bfloat16)
    if any(not isinstance(d, int) for d in device_map.values()):
        raise SystemExit(f"gpu_check: {weight_bytes / 2**30:.1f} GiB of bf16 weights do not fit on GPU(s) "
                         f"{gpus} ({sum(free.values()) / 2**30:.1f} GiB free)")
    return device_map


def build_random_model(config: Any, device_map: dict[str, Any] | None = None, gpus: list[int] | None = None) -> Any:
    """GlmForCausalLM with random bf16 weights created on their devices (no full copy on the CPU first)."""
    import torch
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import GlmForCausalLM

    with init_empty_weights(include_buffers=False):  # parameters on "meta": shapes only, no memory
        model = GlmForCausalLM._from_config(config, dtype=torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if device_map is None:
        device_map = plan_devices(model, gpus or [0], weight_bytes)
    torch.manual_seed(0)
    for name, param in list(model.named_parameters()):
        device = _device_for(name, device_map)
        if name.endswith("norm.weight"):
            value = torch.ones(param.shape, dtype=torch.bfloat16, device=device)
        elif name.endswith(".bias"):
            value = torch.zeros(param.shape, dtype=torch.bfloat16, device=device)
        else:  # the initializer_range of the config: activations stay finite through 40 layers
            value = torch.empty(param.shape, dtype=torch.bfloat16, device=device)
            value.normal_(0.0, config.initializer_range)
        set_module_tensor_to_device(model, name, device, value=value, dtype=torch.bfloat16)
    for name, buffer in list(model.named_buffers()):  # the rotary tables, computed at construction
        set_module_tensor_to_device(model, name, _device_for(name, device_map), value=buffer)
    if len(set(device_map.values())) > 1:
        dispatch_model(model, device_map=device_map)  # hooks that move activations between GPUs
    model.hf_device_map = device_map
    return model.eval()


def serve(model: Any, context: int, batch: int, compile_decode: bool = False) -> Any:
    """The model server's engine around `model`, with the small test tokenizer for token ids."""
    import tiny_glm
    from chatglm4.engine.scheduler import LocalEngine
    from chatglm4.engine.modelload import LoadedModel

    loaded = LoadedModel(model=model, tokenizer=tiny_glm.build_tokenizer(), name="glm-4-9b-chat-hf (random bf16)",
                         context_length=context, stop_token_ids=list(model.config.eos_token_id),
                         input_device=model.get_input_embeddings().weight.device)
    return LocalEngine(loaded, max_waiting=max(64, batch), max_batch=batch, compile_decode=compile_decode)


# ------------------------------------------------------------------ measurements

def copy_bandwidth(device: int, size_bytes: int = 1 << 30, iters: int = 20) -> float:
    """Bytes per second a device-to-device copy moves on `device` (each copy reads and writes `size_bytes`)."""
    import torch

    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.device(device):
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1000
    del src, dst
    torch.cuda.empty_cache()
    return 2 * size_bytes * iters / seconds


class TokenCounter:
    """Samples the engine's generated-token counter in the background, to read it at any past moment."""

    def __init__(self, engine: Any, every_s: float = 0.002):
        self.engine = engine
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.engine.stats().tokens_generated))
            time.sleep(every_s)

    def __enter__(self) -> "TokenCounter":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), self.engine.stats().tokens_generated))

    def at(self, moment: float) -> int:
        """Tokens generated by `moment` (the last sample taken at or before it)."""
        before = [n for t, n in self.samples if t <= moment]
        return before[-1] if before else self.samples[0][1]


def timed_run(engine: Any, batch: int, prompt_tokens: int, new_tokens: int, seed: int) -> Run:
    """`batch` concurrent requests of `prompt_tokens` random ids, each decoding exactly `new_tokens`."""
    import torch

    from chatglm4.engine.sampling import SamplingParams

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 151000, (prompt_tokens,), generator=g).tolist() for _ in range(batch)]
    # ignore_eos: random weights may emit an end-of-turn id; every request must decode the same length
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ends: list[float] = [0.0] * batch
    counts: list[int] = [0] * batch

    def drain(i: int) -> None:
        counts[i] = streams[i].collect().completion_tokens
        ends[i] = time.monotonic()

    with TokenCounter(engine) as counter:
        streams = [engine.generate(p, params) for p in prompts]
        threads = [threading.Thread(target=drain, args=(i,)) for i in range(batch)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    firsts = [s.first_token_at for s in streams]
    assert all(f is not None for f in firsts), "a request produced no token"
    ttft = [f - s.submitted_at for f, s in zip(firsts, streams)]
    # Decode speed: tokens the engine produced between the moment every request had its first token
    # (all prefills done) and the moment the last request finished.
    start, stop = max(firsts), max(ends)
    decoded = counter.at(stop) - counter.at(start)
    return Run(batch, ttft, decoded / (stop - start) if stop > start else float("nan"), sum(counts))


def median_run(engine: Any, batch: int, prompt_tokens: int, new_tokens: int, repeats: int) -> Run:
    runs = [timed_run(engine, batch, prompt_tokens, new_tokens, seed) for seed in range(repeats)]
    runs.sort(key=lambda r: r.decode_tokens_per_s)
    return runs[len(runs) // 2]


# ------------------------------------------------------------------ report

def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def bytes_per_token_of_kv(config: Any) -> int:
    """KV cache bytes one token of context holds (bf16 keys and values, every layer)."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2


def step_floor_s(weight_bytes_by_gpu: dict[int, int], bandwidth: dict[int, float], kv_bytes: int) -> float:
    """Seconds a decode step needs at least: each GPU reads its weights (and its share of the KV cache).

    With accelerate's split the GPUs run one after another, so the per-GPU times add up."""
    total_weights = sum(weight_bytes_by_gpu.values())
    return sum((w + kv_bytes * w / total_weights) / bandwidth[i] for i, w in weight_bytes_by_gpu.items())


def memory_lines(gpus: list[int]) -> list[str]:
    import torch

    lines = []
    for i in gpus:
        free, total = torch.cuda.mem_get_info(i)
        lines.append(f"  GPU {i} {torch.cuda.get_device_name(i)}: allocated {gib(torch.cuda.memory_allocated(i))}, "
                     f"peak {gib(torch.cuda.max_memory_allocated(i))}, in use on the device "
                     f"{gib(total - free)} of {gib(total)}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="concurrent requests for the batched run (default 32)")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prompt length per request (default 512)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens each request decodes (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per batch size; the median is shown (default 3)")
    parser.add_argument("--compile", choices=("eager", "compiled", "both"), default="both",
                        help="the decode step eager, compiled (COMPILE=on), or each in turn (default both)")
    parser.add_argument("--gpus", help="comma-separated GPU indices to use (default: all visible)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # chatglm4, and tests/tiny_glm for the tokenizer
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}); run it on a machine with an NVIDIA GPU and a CUDA build of torch "
              "(the bf16 weights alone take 17.5 GiB)", file=sys.stderr)
        return EXIT_NO_GPU
    visible = torch.cuda.device_count()
    gpus = [int(x) for x in args.gpus.split(",")] if args.gpus else list(range(visible))
    if any(not 0 <= i < visible for i in gpus):
        print(f"gpu_check: --gpus {args.gpus}: {visible} GPU(s) are visible (indices 0-{visible - 1})",
              file=sys.stderr)
        return EXIT_NO_GPU
    config = glm4_config()
    context = args.prompt_tokens + args.new_tokens + 16

    log.info("measuring copy bandwidth on GPU(s) %s", gpus)
    bandwidth = {i: copy_bandwidth(i) for i in gpus}
    log.info("building glm-4-9b-chat-hf with random bf16 weights")
    t0 = time.monotonic()
    model = build_random_model(config, gpus=gpus)
    build_s = time.monotonic() - t0
    weights_by_gpu: dict[int, int] = {}
    embed = model.get_input_embeddings().weight
    for p in model.parameters():
        if p is embed:  # a step reads only the batch's rows of the embedding table, not all of it
            continue
        weights_by_gpu[p.device.index] = weights_by_gpu.get(p.device.index, 0) + p.numel() * p.element_size()
    n_params = sum(p.numel() for p in model.parameters())
    runs: dict[str, tuple[Run, Run]] = {}
    for step in (["eager", "compiled"] if args.compile == "both" else [args.compile]):
        t0 = time.monotonic()
        engine = serve(model, context, args.batch, compile_decode=step == "compiled")
        log.info("%s engine ready in %.0f s", step, time.monotonic() - t0)
        try:
            for batch in (1, args.batch):  # warm-up: kernels, the allocator, the engine's batch shapes
                median_run(engine, batch, 16, 4, 1)
            runs[step] = (median_run(engine, 1, args.prompt_tokens, args.new_tokens, args.repeats),
                          median_run(engine, args.batch, args.prompt_tokens, args.new_tokens, args.repeats))
        finally:
            engine.shutdown()

    kv_token = bytes_per_token_of_kv(config)
    mean_context = args.prompt_tokens + args.new_tokens / 2
    print(f"glm-4-9b-chat-hf architecture, random bf16 weights: {n_params / 1e9:.2f} B parameters, "
          f"{gib(n_params * 2)}, built in {build_s:.1f} s; torch {torch.__version__}")
    print("memory per GPU (after the runs):")
    print("\n".join(memory_lines(gpus)))
    print("copy bandwidth: " + ", ".join(f"GPU {i} {bw / 1e9:.0f} GB/s" for i, bw in bandwidth.items()))
    print(f"requests: {args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens each, greedy, "
          f"median of {args.repeats}")
    for step, pair in runs.items():
        for run in pair:
            floor = step_floor_s(weights_by_gpu, bandwidth, int(kv_token * mean_context * run.batch))
            ceiling = run.batch / floor
            ttft = sorted(run.ttft_s)
            print(f"{step} batch {run.batch:>3}: time to first token {statistics.median(ttft) * 1000:.0f} ms median, "
                  f"{ttft[-1] * 1000:.0f} ms max; decode {run.decode_tokens_per_s:.1f} tokens/s "
                  f"({run.decode_tokens_per_s / run.batch:.1f} per request); bandwidth floor {floor * 1000:.2f} ms "
                  f"per step = at most {ceiling:.0f} tokens/s; {100 * run.decode_tokens_per_s / ceiling:.0f}% of it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
