"""`make bench`: our model server, llama.cpp's llama-server (bench/llama_peer.py), the serial
baseline and `transformers serve --continuous-batching` on the same model, the same prompt and the
same forced number of generated tokens, in one run; ours and llama-server at float32, bf16 and int4
side by side (ours at int8 too, and at float32, bf16 and int4 with the decode step compiled, `--compile on`);
then book search and the gateway's added latency, memory before and
after a 200-client soak (bench/soak.py), and a long prompt arriving while streams decode
(bench/prefill_gap.py: chunks paced by time, of a fixed size, and off). Writes bench/results.md.

Every server runs alone (the others are stopped) so they do not share the CPU. Request loops are
bounded and everything listens on 127.0.0.1 only."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import load  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a story about a robot."}]
TOKENS = 64
LEVELS = (1, 8, 32)
TSERVE_ENV = HERE / ".tserve"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, argv: list[str], url: str, log_name: str, env: dict | None = None):
        self.url = url
        self.log = open(Path(tempfile.gettempdir()) / log_name, "w")
        self.p = subprocess.Popen(argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                  env={**os.environ, **(env or {})})

    def wait(self, path: str = "/health", timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.log.name}: exited with {self.p.returncode}")
            try:
                if requests.get(self.url + path, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.url} not ready")

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self.log.close()


def payload(extra: dict | None = None) -> dict:
    body = {"model": "bench", "messages": PROMPT, "max_tokens": TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, "min_tokens": TOKENS, **(extra or {})}
    return {k: v for k, v in body.items() if v is not None}


def requests_for(c: int, quick: bool) -> int:
    return c if quick else max(4, 2 * c)


def measure(name: str, url: str, quick: bool, levels=LEVELS, extra: dict | None = None) -> list[dict]:
    rows = []
    load.run(url + "/v1/chat/completions", payload(extra), 1, 1)  # warm-up
    for c in levels:
        s = load.run(url + "/v1/chat/completions", payload(extra), c, requests_for(c, quick))
        rows.append({"server": name, "c": c, "n": s.requests, "errors": s.errors, "tok_s": s.tok_s,
                     "tokens_per_req": s.tokens / max(1, s.requests - s.errors),
                     "p50": s.pct(s.latency, 0.5), "p95": s.pct(s.latency, 0.95),
                     "ttft50": s.pct(s.ttft, 0.5), "ttft95": s.pct(s.ttft, 0.95)})
        print(f"  {name} c={c}: {s.tok_s:.1f} tok/s, ttft p50 {rows[-1]['ttft50'] * 1000:.0f} ms", flush=True)
    return rows


def bench_ours(quick: bool) -> tuple[list[dict], dict]:
    port, gport = free_port(), free_port()
    # float32 explicitly: `auto` is bf16 on CPUs with bf16 instructions, which has a row of its own.
    ms = Proc([sys.executable, "LLMapis.py", "--port", str(port), "--max-batch", "32", "--max-waiting", "256",
               *FP32], f"http://127.0.0.1:{port}", "bench-model-server.log")
    gw = None
    try:
        ms.wait()
        rows = measure("chatglm4-web (ours)", ms.url, quick)
        short = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "stream": True}
        ttft_short = [load.one_request(ms.url + "/v1/chat/completions", short)[0] for _ in range(10)]
        db = Path(tempfile.mkdtemp()) / "bench.db"
        gw = Proc([sys.executable, "serveapi.py", "--port", str(gport), "--model-server", ms.url,
                   "--database-url", f"sqlite:///{db}"], f"http://127.0.0.1:{gport}", "bench-gateway.log")
        gw.wait()
        direct = load.timed_calls(lambda: requests.get(ms.url + "/v1/models", timeout=10), 200)
        via = load.timed_calls(lambda: requests.get(gw.url + "/v1/models", timeout=10), 200)
        search = {}
        queries = ["帮我找找有关函数求导的书", "我想学法语", "线性代数的书", "量子力学入门"]
        for c in (1, 8):
            from concurrent.futures import ThreadPoolExecutor

            def one(i: int) -> float:
                t = time.perf_counter()
                requests.post(gw.url + "/api/books/search", json={"query": queries[i % len(queries)]}, timeout=300)
                return time.perf_counter() - t

            one(0)
            with ThreadPoolExecutor(c) as pool:
                search[c] = load.median(list(pool.map(one, range(8 if c == 1 else 16))))
        extras = {"ttft_short_p50": load.median(ttft_short), "gateway_overhead_p50": load.median(via) - load.median(direct),
                  "direct_p50": load.median(direct), "via_p50": load.median(via), "search": search}
        return rows, extras
    finally:
        if gw:
            gw.stop()
        ms.stop()


# Our server at the other precisions (`DTYPE`, `QUANTIZE`), throughput only: float32 is bench_ours.
FP32 = ["--dtype", "float32"]
# "+compile": the same with the decode step compiled (`--compile on`), beside the same llama-server row.
COMPILE = ["--compile", "on"]
# fp32+compile first: it follows llama-server's float32 row, as bf16+compile and int4+compile follow
# their precision's llama-server row.
PRECISIONS = {"fp32+compile": [*FP32, *COMPILE], "bf16": ["--dtype", "bfloat16"],
              "bf16+compile": ["--dtype", "bfloat16", *COMPILE], "int8": ["--quantize", "int8"],
              "int4": ["--quantize", "int4"], "int4+compile": ["--quantize", "int4", *COMPILE]}


def bench_precisions(quick: bool, precisions: dict[str, list[str]]) -> list[dict]:
    rows = []
    for name, flags in precisions.items():
        port = free_port()
        ms = Proc([sys.executable, "LLMapis.py", "--port", str(port), "--max-batch", "32", "--max-waiting", "256",
                   *flags], f"http://127.0.0.1:{port}", f"bench-model-server-{name}.log")
        try:
            ms.wait(timeout=1800 if "--compile" in flags else 600)  # a compiled step compiles first
            rows += measure("chatglm4-web (ours)" if name == "fp32" else f"chatglm4-web (ours, {name})", ms.url, quick)
        finally:
            ms.stop()
    return rows


def bench_llama(quick: bool, precision: str) -> tuple[list[dict], str]:
    """llama.cpp's llama-server at one of the precisions ours runs at (bench/llama_peer.py)."""
    import llama_peer

    try:
        server, quantize = llama_peer.binaries()
        gguf = llama_peer.model_file(precision, quantize)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        return [], f"skipped: {exc}"
    port = free_port()
    srv = Proc(llama_peer.server_argv(server, gguf, port), f"http://127.0.0.1:{port}", f"bench-llama-{precision}.log")
    try:
        srv.wait(timeout=300)
        return measure(f"llama-server ({precision})", srv.url, quick), ""
    except (RuntimeError, TimeoutError) as exc:
        return [], f"{precision} skipped: {exc}"
    finally:
        srv.stop()


def bench_engines(quick: bool, skip_llama: bool) -> tuple[list[dict], str]:
    """Ours at each of PRECISIONS; bf16 and int4 followed at once by llama-server at the same precision,
    so that a pair shares the machine's state of the moment (float32's pair follows bench_ours), and
    each "+compile" row right after the llama-server row it is compared with."""
    import llama_peer

    rows, notes = [], []
    for name, flags in PRECISIONS.items():
        rows += bench_precisions(quick, {name: flags})
        if name in llama_peer.PRECISIONS and not skip_llama:
            peer, note = bench_llama(quick, name)
            rows += peer
            notes += [note] if note else []
    return rows, "; ".join(dict.fromkeys(notes))


def bench_serial(quick: bool) -> tuple[list[dict], float]:
    port = free_port()
    srv = Proc([sys.executable, str(HERE / "serial_server.py"), "--port", str(port)],
               f"http://127.0.0.1:{port}", "bench-serial.log")
    try:
        srv.wait()
        reference = requests.get(srv.url + "/health", timeout=5).json()["generate_tok_s"]
        return measure("serial baseline (original demo)", srv.url, True), reference
    finally:
        srv.stop()


def bench_transformers_serve(quick: bool) -> tuple[list[dict], str]:
    exe = TSERVE_ENV / "bin" / "transformers"
    if not exe.exists():
        return [], (f"skipped: no {TSERVE_ENV.relative_to(ROOT)} environment (create it with: python3 -m venv "
                    "bench/.tserve && bench/.tserve/bin/pip install torch==2.13.0 'transformers[serving]==5.23.0' "
                    "accelerate==1.15.0 gguf==0.19.0)")
    folder = safetensors_copy()
    port = free_port()
    # Its /v1/models scans the Hugging Face cache and fails when there is none: give it an empty one.
    hub = tempfile.mkdtemp(prefix="hf-hub-")
    srv = Proc([str(exe), "serve", str(folder), "--continuous-batching", "--port", str(port),
                "--host", "127.0.0.1", "--device", "cpu"], f"http://127.0.0.1:{port}", "bench-tserve.log",
               env={"HF_HUB_CACHE": hub, "HF_HUB_OFFLINE": "1"})
    try:
        srv.wait("/v1/models", timeout=900)
        # It rejects vLLM's length-forcing fields; greedy on this prompt runs past TOKENS anyway, and
        # the table shows tokens per request so equal work can be checked.
        return measure("transformers serve --continuous-batching", srv.url, quick,
                       extra={"model": str(folder), "ignore_eos": None, "min_tokens": None}), ""
    except (RuntimeError, TimeoutError) as exc:
        return [], f"skipped: {exc}"
    finally:
        srv.stop()


def safetensors_copy() -> Path:
    """The embedded model saved as a plain transformers folder (once): `transformers serve` cannot
    load a local GGUF (its config has no architectures). Same weights, already dequantized."""
    folder = HERE / ".tserve-model"
    if not (folder / "config.json").exists():
        from chatglm4.engine import modelload

        # float32 and unpacked: the weights as the file holds them, in plain nn.Linear layers to save.
        loaded = modelload.load(None, dtype="float32", pack_cpu=False)
        config = loaded.model.config
        if hasattr(config, "quantization_config"):  # GGUF-loaded models refuse to save as themselves
            del config.quantization_config
        plain = type(loaded.model)(config)
        plain.load_state_dict(loaded.model.state_dict())
        plain.generation_config = loaded.model.generation_config
        plain.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
    return folder


def machine() -> str:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB memory, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads, Python {platform.python_version()}")


def precision_of(server: str) -> str | None:
    """"chatglm4-web (ours, bf16)" → bf16; our float32 row has no suffix; peers' names end likewise."""
    if server == "chatglm4-web (ours)":
        return "fp32"
    if server.startswith(("chatglm4-web (ours, ", "llama-server (")):
        return server.rsplit(" ", 1)[-1].strip("()")
    return None


def base(precision: str) -> str:
    """The precision a variant of ours runs at: "bf16+compile" → bf16."""
    return precision.split("+")[0]


def side_by_side(rows: list[dict]) -> list[str]:
    """Ours beside llama-server at each precision both ran: tok/s at each concurrency."""
    ours = {(precision_of(r["server"]), r["c"]): r for r in rows if r["server"].startswith("chatglm4-web")}
    peer = {(precision_of(r["server"]), r["c"]): r for r in rows if r["server"].startswith("llama-server")}
    keys = [(p, c) for p, c in ours if (base(p), c) in peer]
    if not keys:
        return []
    lines = ["", "Ours beside llama.cpp's llama-server (`--parallel 32`) on the same weights at the same precision "
             "(int4: ours quantizes the dequantized weights with torch's int4 kernel, llama-server runs the shipped Q4_1 file):",
             "", "| precision | concurrency | ours tok/s | llama-server tok/s | ours / llama-server | ours p95 TTFT ms | llama-server p95 TTFT ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p, c in keys:
        a, b = ours[(p, c)], peer[(base(p), c)]
        lines.append(f"| {p} | {c} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | {a['tok_s'] / b['tok_s']:.2f} "
                     f"| {a['ttft95'] * 1000:.0f} | {b['ttft95'] * 1000:.0f} |")
    return lines


def write(rows: list[dict], extras: dict, reference: float, tserve_note: str, llama_note: str = "") -> str:
    ms = lambda s: f"{s * 1000:.0f}"  # noqa: E731
    lines = [f"Benchmark run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}.",
             "",
             f"Model: embedded SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32 on CPU). Prompt: "
             f"\"{PROMPT[0]['content']}\"; every request generates exactly {TOKENS} tokens (`ignore_eos`/`min_tokens`), "
             "greedy. Throughput = completion tokens of all requests / wall time.",
             "",
             "| server | concurrency | requests | tokens/request | tok/s | p50 latency s | p95 latency s | p50 TTFT ms | p95 TTFT ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['c']} | {r['n']}{' (' + str(r['errors']) + ' failed)' if r['errors'] else ''} "
                     f"| {r['tokens_per_req']:.0f} | {r['tok_s']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} | {ms(r['ttft50'])} | {ms(r['ttft95'])} |")
    if tserve_note:
        lines += ["", f"transformers serve: {tserve_note}"]
    if llama_note:
        lines += ["", f"llama-server: {llama_note}"]
    lines += side_by_side(rows)
    ours = {r["c"]: r for r in rows if r["server"] == "chatglm4-web (ours)"}
    serial = {r["c"]: r for r in rows if r["server"].startswith("serial")}
    peer = {r["c"]: r for r in rows if r["server"].startswith("transformers")}
    lines += ["", "| goal | measured | met |", "| --- | --- | --- |"]

    def goal(text: str, value: str, ok: bool | None) -> None:
        lines.append(f"| {text} | {value} | {'yes' if ok else 'no' if ok is not None else 'n/a'} |")

    if 32 in ours and 32 in serial:
        x = ours[32]["tok_s"] / serial[32]["tok_s"]
        goal("c=32 throughput ≥ 10x serial baseline", f"{x:.1f}x", x >= 10)
    if 32 in ours and 32 in peer:
        x = ours[32]["tok_s"] / peer[32]["tok_s"]
        goal("c=32 throughput ≥ 1.5x transformers serve", f"{x:.2f}x", x >= 1.5)
    for r in rows:  # float32 and bf16 (`DTYPE=auto` on CPUs with bf16 instructions)
        if r["c"] == 32 and precision_of(r["server"]) in ("fp32", "bf16") and r["server"].startswith("chatglm4-web"):
            goal(f"c=32 p95 TTFT < 1 s ({precision_of(r['server'])})", f"{r['ttft95']:.2f} s", r["ttft95"] < 1.0)
    by_precision = {(precision_of(r["server"]), r["server"].startswith("llama"), r["c"]): r["tok_s"] for r in rows
                    if precision_of(r["server"]) is not None}
    for (p, is_peer, c), peer_tok_s in sorted(by_precision.items()):
        mine = by_precision.get((p, False, c))
        if is_peer and c in (1, 32) and mine is not None:
            goal(f"{p} c={c}: ours ≥ llama-server", f"{mine:.1f} vs {peer_tok_s:.1f} tok/s", mine >= peer_tok_s)
    if 1 in ours and reference:
        ratio = ours[1]["tok_s"] / reference
        goal("c=1 within 10% of in-process model.generate (fp32)", f"{ours[1]['tok_s']:.1f} vs {reference:.1f} tok/s "
             f"({ratio * 100:.0f}%)", ratio >= 0.9)
    if not extras:  # --engine-only
        return "\n".join(lines) + "\n"
    goal("c=1 TTFT p50 < 150 ms (short prompt, 1 token)", f"{ms(extras['ttft_short_p50'])} ms",
         extras["ttft_short_p50"] < 0.15)
    goal("gateway overhead p50 < 3 ms (GET /v1/models via gateway − direct)",
         f"{extras['gateway_overhead_p50'] * 1000:.2f} ms ({ms(extras['via_p50'])} vs {ms(extras['direct_p50'])} ms)",
         extras["gateway_overhead_p50"] < 0.003)
    lines += ["", "Book search through the gateway (seed catalogue, retrieval + constrained choice among ≤ 8 candidates): "
              + ", ".join(f"p50 {v:.2f} s at concurrency {c}" for c, v in extras["search"].items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one request per client at each level")
    parser.add_argument("--skip-peer", action="store_true", help="skip transformers serve")
    parser.add_argument("--skip-llama", action="store_true", help="skip llama.cpp's llama-server (and its build)")
    parser.add_argument("--engine-only", action="store_true",
                        help="throughput at each precision, ours and llama-server's, and the soak; nothing else")
    args = parser.parse_args()
    print("machine:", machine(), flush=True)
    extras: dict = {}
    if args.engine_only:
        rows = bench_precisions(args.quick, {"fp32": FP32})
    else:
        rows, extras = bench_ours(args.quick)
    llama_rows, llama_note = ([], "skipped (--skip-llama)") if args.skip_llama else bench_llama(args.quick, "fp32")
    more, note = bench_engines(args.quick, args.skip_llama)
    rows += llama_rows + more
    llama_note = "; ".join(n for n in (llama_note, note) if n)
    import prefill_gap  # here: they import this module's Proc
    import soak

    soak_row = soak.measure(200, 1 if args.quick else 2)
    gap_rows, serial_rows, peer_rows, reference, note = [], [], [], 0.0, "skipped (--engine-only)"
    if not args.engine_only:
        gap_rows = prefill_gap.measure(prefill_gap.default_settings(), 1 if args.quick else 2)
        serial_rows, reference = bench_serial(args.quick)
        peer_rows, note = ([], "skipped (--skip-peer)") if args.skip_peer else bench_transformers_serve(args.quick)
    # The measurements first, as they are: a failure while writing the tables loses nothing.
    raw = {"rows": rows + serial_rows + peer_rows, "extras": extras, "reference": reference, "notes": [note, llama_note],
           "soak": soak_row, "prefill_gap": gap_rows}
    (HERE / "results.json").write_text(json.dumps(raw, indent=1, default=str), encoding="utf-8")
    text = (write(rows + serial_rows + peer_rows, extras, reference, note, llama_note)
            + "\n" + soak.markdown(soak_row) + ("\n" + prefill_gap.markdown(gap_rows) if gap_rows else ""))
    (HERE / "results.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
