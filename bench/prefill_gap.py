"""`make bench`'s long-prompt scenario: 4 streams are decoding when a ~3,184-token prompt arrives.

Without chunked prefill the engine computes that prompt in one forward before its next decode step,
so every decoding stream pauses for the whole prefill. For each setting of PREFILL_CHUNK_TOKENS (0 =
off) and PREFILL_CHUNK_SECONDS (0 = chunks of a fixed size) a fresh model server is started and this
reports the decoding streams' longest and p99 pause between tokens from the long prompt's arrival
until 1 s after its first token, their median pause before it arrived, and the long prompt's own time
to first token.

    python bench/prefill_gap.py [--settings 64:0.25,64:0,0:0] [--trials 2]

Pauses are measured at the client, between server-sent events carrying text."""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from chatglm4.config import ModelServerConfig  # noqa: E402
from run import Proc, free_port  # noqa: E402

STREAMS = 4
LONG_TOKENS = 3184
# Sentences without digits tokenize the same wherever they stand, so the prompt's length is linear
# in their number and two short calibration requests find it.
SENTENCES = ["The library keeps its oldest maps in a cool room under the stairs.",
             "Readers may borrow three books at a time and renew them twice.",
             "A quiet reading hall faces the garden on the eastern side.",
             "Students often ask where the mathematics shelves have moved."]
AFTER_FIRST_TOKEN_S = 1.0
# Enough for the decoding streams to outlast the long prompt's prefill (they are stopped after it).
DECODE_TOKENS = 4096


def chat(url: str, content: str, max_tokens: int, stream: bool, **extra) -> requests.Response:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "stream": stream, **extra}
    return requests.post(url + "/v1/chat/completions", json=body, stream=stream, timeout=600)


def events(response: requests.Response):
    """(perf_counter(), chunk) of each server-sent chunk."""
    for line in response.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            yield time.perf_counter(), json.loads(line[6:])


def has_text(chunk: dict) -> bool:
    return any(c.get("delta", {}).get("content") for c in chunk.get("choices") or [])


def long_prompt(url: str, tokens: int) -> str:
    """A prompt of about `tokens` tokens, starting with a nonce so no prefix of it is cached."""
    def body(n: int) -> str:
        # Twelve digits: the same number of tokens whatever the nonce.
        return f"Request {random.randrange(10 ** 11, 10 ** 12)}. " + " ".join(
            SENTENCES[i % len(SENTENCES)] for i in range(n))

    def prompt_tokens(n: int) -> int:
        with chat(url, body(n), 1, False) as r:
            r.raise_for_status()
            return r.json()["usage"]["prompt_tokens"]

    a, b = prompt_tokens(8), prompt_tokens(16)
    return body(round(8 + (tokens - a) * 8 / (b - a)))


class Decoder(threading.Thread):
    """One stream decoding until told to stop, recording when each piece of text arrives."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.times: list[float] = []
        self.stop = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self._decode()
        except (requests.RequestException, ValueError) as exc:
            self.error = exc

    def _decode(self) -> None:
        with chat(self.url, "Tell me a long story about a lighthouse keeper.", DECODE_TOKENS, True,
                  ignore_eos=True) as r:
            r.raise_for_status()
            for t, chunk in events(r):
                if has_text(chunk):
                    self.times.append(t)
                if self.stop.is_set():
                    return  # closing the response cancels the generation


def cpu_stall_us() -> int | None:
    """Microseconds some task waited for a CPU since boot (Linux pressure stall information)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def trial(url: str) -> dict:
    """One long prompt arriving while STREAMS streams decode."""
    content = long_prompt(url, LONG_TOKENS)
    decoders = [Decoder(url) for _ in range(STREAMS)]
    for d in decoders:
        d.start()
    deadline = time.monotonic() + 120
    while min(len(d.times) for d in decoders) < 16:  # all decoding, past their own prefill
        if time.monotonic() > deadline or not all(d.is_alive() for d in decoders):
            raise RuntimeError(f"the decoding streams did not start: {[d.error for d in decoders]}")
        time.sleep(0.05)
    sent, stall = time.perf_counter(), cpu_stall_us()
    first, prompt_tokens = None, 0
    with chat(url, content, 8, True, stream_options={"include_usage": True}) as r:
        for t, chunk in events(r):
            if first is None and has_text(chunk):
                first = t
            prompt_tokens = (chunk.get("usage") or {}).get("prompt_tokens", prompt_tokens)
    if first is None:
        raise RuntimeError("the long prompt got no text")
    time.sleep(max(0.0, first + AFTER_FIRST_TOKEN_S - time.perf_counter()))
    # On a shared machine other processes' work shows here: the share of the time something waited.
    contention = (cpu_stall_us() - stall) / 1e6 / (time.perf_counter() - sent) if stall is not None else float("nan")
    for d in decoders:
        d.stop.set()
    for d in decoders:
        d.join(timeout=60)
        if d.error is not None or len(d.times) >= DECODE_TOKENS:
            raise RuntimeError(f"a decoding stream ended early: {d.error}")
    during, before = [], []
    end = first + AFTER_FIRST_TOKEN_S
    for d in decoders:
        for a, b in zip(d.times, d.times[1:]):
            # Every pause that overlaps the window: the one spanning a whole prefill ends with the
            # first decode step after it, which can itself end past the window.
            if b > sent and a < end:
                during.append(b - a)
            elif b <= sent:
                before.append(b - a)
    return {"prompt_tokens": prompt_tokens, "ttft": first - sent, "max_gap": max(during),
            "p99_gap": percentile(during, 0.99), "p50_gap": percentile(during, 0.5),
            "before_p50": percentile(before, 0.5), "contention": contention}


def calm_trial(url: str, max_contention: float, attempts: int = 4) -> dict:
    """A trial, repeated while other processes took the CPU during it (the calmest of `attempts`)."""
    results = []
    while len(results) < attempts:
        results.append(trial(url))
        if not results[-1]["contention"] > max_contention:  # NaN (no pressure information): accept
            break
        print(f"  (CPU contention {results[-1]['contention']:.0%}: again)", flush=True)
    return min(results, key=lambda r: r["contention"] if r["contention"] == r["contention"] else 0.0)


def default_settings() -> list[tuple[int, float]]:
    """The defaults (chunks paced by time), the same chunks at a fixed size, and chunking off."""
    tokens, seconds = ModelServerConfig.prefill_chunk_tokens, ModelServerConfig.prefill_chunk_seconds
    return [(tokens, seconds), (tokens, 0.0), (0, 0.0)]


def parse_settings(text: str) -> list[tuple[int, float]]:
    """'64:0.25,64:0,0' -> [(64, 0.25), (64, 0.0), (0, 0.0)]"""
    out = []
    for item in text.split(","):
        tokens, _, seconds = item.partition(":")
        out.append((int(tokens), float(seconds or 0)))
    return out


def measure(settings: list[tuple[int, float]], trials: int, max_contention: float = 0.15) -> list[dict]:
    """For each (PREFILL_CHUNK_TOKENS, PREFILL_CHUNK_SECONDS), a fresh model server and `trials` long
    prompts; the worst trial's pauses."""
    rows = []
    for chunk, seconds in settings:
        port = free_port()
        server = Proc([sys.executable, "LLMapis.py", "--port", str(port), "--prefill-chunk-tokens", str(chunk),
                       "--prefill-chunk-seconds", str(seconds)],
                      f"http://127.0.0.1:{port}", "bench-prefill-gap.log")
        try:
            server.wait()
            results = [calm_trial(server.url, max_contention) for _ in range(trials)]
        finally:
            server.stop()
        row = {"chunk": chunk, "chunk_seconds": seconds, **max(results, key=lambda r: r["max_gap"]),
               "ttft": sorted(r["ttft"] for r in results)[len(results) // 2]}
        rows.append(row)
        print(f"  prefill chunk {label(row)}: max gap {row['max_gap']:.2f} s, p99 {row['p99_gap']:.2f} s, "
              f"long prompt TTFT {row['ttft']:.2f} s, CPU contention {row['contention']:.0%}", flush=True)
    return rows


def label(row: dict) -> str:
    if not row["chunk"]:
        return "off"
    seconds = row.get("chunk_seconds") or 0
    return f"{row['chunk']} tokens" + (f", paced to {seconds:g} s" if seconds else ", fixed")


def markdown(rows: list[dict]) -> str:
    lines = [f"Long prompt while {STREAMS} streams decode (`bench/prefill_gap.py`): a ~{LONG_TOKENS:,}-token "
             f"prompt arrives while {STREAMS} greedy streams decode; their pauses between tokens from its arrival "
             f"until {AFTER_FIRST_TOKEN_S:.0f} s after its first token (worst trial), and its time to first token "
             "(median trial).",
             "",
             "| chunked prefill | prompt tokens | max pause s | p99 pause s | median pause s "
             "| median pause before s | long prompt TTFT s | CPU contention |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {label(r)} | {r['prompt_tokens']} | {r['max_gap']:.2f} | {r['p99_gap']:.2f} "
                     f"| {r['p50_gap']:.2f} | {r['before_p50']:.2f} | {r['ttft']:.1f} | {r['contention']:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", type=parse_settings, default=default_settings(),
                        help="TOKENS:SECONDS pairs of PREFILL_CHUNK_TOKENS and PREFILL_CHUNK_SECONDS to compare "
                             "(0 tokens = off, 0 seconds = fixed size); default: the defaults, fixed size, off")
    parser.add_argument("--trials", type=int, default=2, help="long prompts per setting")
    parser.add_argument("--max-contention", type=float, default=0.15,
                        help="repeat a trial (up to 4 times) when something waited for a CPU longer than this share of it")
    args = parser.parse_args()
    print(markdown(measure(args.settings, args.trials, args.max_contention)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
