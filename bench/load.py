"""A bounded load generator for OpenAI-compatible chat endpoints: N requests over C concurrent
clients, measuring time to first token, latency and completion tokens per request."""

from __future__ import annotations

import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests


@dataclass
class Stats:
    concurrency: int
    requests: int
    wall_s: float
    tokens: int
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def pct(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def one_request(url: str, payload: dict, timeout: float = 600) -> tuple[float, float, int]:
    """(ttft s, latency s, completion tokens) of one chat completion; streams when the server does."""
    start = time.perf_counter()
    first = None
    tokens = chunks = 0
    with requests.post(url, json=payload, stream=True, timeout=timeout) as r:
        r.raise_for_status()
        if not r.headers.get("Content-Type", "").startswith("text/event-stream"):
            body = r.json()  # a server that does not stream: the first token arrives with the last
            end = time.perf_counter()
            return end - start, end - start, body["usage"]["completion_tokens"]
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                if choice.get("delta", {}).get("content"):
                    first = first or time.perf_counter()
                    chunks += 1
    end = time.perf_counter()
    # usage when the server reports it; otherwise one content chunk per token is the best estimate
    return (first or end) - start, end - start, tokens or chunks


def run(url: str, payload: dict, concurrency: int, n_requests: int) -> Stats:
    """Sends n_requests, at most `concurrency` at a time; stops by itself."""
    stats = Stats(concurrency, n_requests, 0.0, 0)
    lock = threading.Lock()

    def worker(_: int) -> None:
        try:
            ttft, latency, tokens = one_request(url, payload)
        except (requests.RequestException, KeyError, ValueError):
            with lock:
                stats.errors += 1
            return
        with lock:
            stats.ttft.append(ttft)
            stats.latency.append(latency)
            stats.tokens += tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(n_requests)))
    stats.wall_s = time.perf_counter() - start
    return stats


def timed_calls(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
