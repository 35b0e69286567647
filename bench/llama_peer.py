"""llama.cpp's own server as `make bench`'s peer: the same SmolLM2-135M weights at f32, bf16 and the
Q4_1 file we ship, `--parallel 32` (continuous batching), measured with the same request loop as ours.

The binaries are built once from the llama.cpp sources vendored in the llama-cpp-python sdist
(bench/build_llama_server.sh, into the ignored bench/.llama/). The f32 and bf16 files are written
from the shipped Q4_1 by llama-quantize, so every precision holds the very weights ours dequantizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from chatglm4.engine.modelload import embedded_model_file  # noqa: E402

BUILD = HERE / "build_llama_server.sh"
FOLDER = HERE / ".llama"
# Our precision's name → llama-quantize's type name (None: the shipped file as it is).
PRECISIONS = {"fp32": "F32", "bf16": "BF16", "int4": None}
SLOTS = 32
SLOT_CONTEXT = 512  # per slot: the bench's prompt and 64 tokens fit many times over


def binaries() -> tuple[Path, Path]:
    """(llama-server, llama-quantize), built on first use (about 10 minutes on 2 cores)."""
    out = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    if out.returncode != 0:
        raise RuntimeError(f"building llama-server failed:\n{out.stderr[-2000:]}")
    server = Path(out.stdout.strip().splitlines()[-1])
    return server, server.with_name("llama-quantize")


def model_file(precision: str, quantize: Path) -> Path:
    """The embedded weights at `precision` as a GGUF file (written once from the shipped Q4_1)."""
    shipped = embedded_model_file()
    kind = PRECISIONS[precision]
    if kind is None:
        return shipped
    target = FOLDER / f"smollm2-135m-{kind.lower()}.gguf"
    if not target.exists():
        partial = target.with_suffix(".part")
        subprocess.run([str(quantize), "--allow-requantize", str(shipped), str(partial), kind],
                       check=True, capture_output=True)
        partial.rename(target)
    return target


def server_argv(server: Path, gguf: Path, port: int, slots: int = SLOTS, slot_context: int = SLOT_CONTEXT,
                extra: tuple[str, ...] = ("--log-disable",)) -> list[str]:
    threads = str(len(os.sched_getaffinity(0)))
    return [str(server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(slots), "-c", str(slots * slot_context), "-t", threads, "-tb", threads,
            "--no-webui", *extra]
