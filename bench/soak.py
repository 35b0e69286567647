"""`make bench`'s memory check: the model server's resident memory before and after a soak of 200
concurrent clients (prompts of mixed length, replies of mixed length), and after it has sat idle.

    python bench/soak.py [--clients 200] [--rounds 2]

RSS is read from /proc for the server process; the batch cache's own buffers come from /metrics."""

from __future__ import annotations

import argparse
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import Proc, free_port  # noqa: E402

WORDS = "the library keeps its oldest maps in a cool room under the stairs and readers borrow books".split()
IDLE_S = 10


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def metric(url: str, name: str) -> float:
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def one(url: str, rng: random.Random) -> bool:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.choice((5, 40, 150, 400))))
    body = {"messages": [{"role": "user", "content": f"Summarize: {words}"}],
            "max_tokens": rng.choice((8, 32, 96)), "temperature": 0.7, "seed": rng.randrange(1 << 30),
            "stream": rng.random() < 0.5}
    try:
        with requests.post(url + "/v1/chat/completions", json=body, stream=body["stream"], timeout=900) as r:
            for _ in r.iter_content(chunk_size=None):
                pass
            return r.status_code == 200
    except requests.RequestException:
        return False


def measure(clients: int, rounds: int) -> dict:
    port = free_port()
    server = Proc([sys.executable, "LLMapis.py", "--port", str(port), "--max-batch", "32",
                   "--max-waiting", str(clients + 16), "--threads", str(clients + 64)],
                  f"http://127.0.0.1:{port}", "bench-soak.log")
    try:
        server.wait()
        rng = random.Random(7)
        for _ in range(4):  # warm: a few requests of each shape
            one(server.url, rng)
        before = rss_mib(server.p.pid)
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            seeds = [random.Random(i) for i in range(clients * rounds)]
            ok = sum(pool.map(lambda r: one(server.url, r), seeds))
        wall = time.perf_counter() - start
        after = rss_mib(server.p.pid)
        time.sleep(IDLE_S)
        idle = rss_mib(server.p.pid)
        cache = metric(server.url, "chatglm4:kv_cache_bytes") / 2**20
        return {"clients": clients, "requests": clients * rounds, "ok": ok, "wall": wall, "before": before,
                "after": after, "idle": idle, "cache": cache}
    finally:
        server.stop()


def markdown(r: dict) -> str:
    return (f"Memory under a soak (`bench/soak.py`): {r['clients']} concurrent clients, {r['requests']} requests "
            f"({r['ok']} answered) of mixed prompt and reply lengths in {r['wall']:.0f} s.\n\n"
            "| model server RSS before MiB | after the soak MiB | after 10 s idle MiB | of which batch KV cache MiB |\n"
            "| ---: | ---: | ---: | ---: |\n"
            f"| {r['before']:.0f} | {r['after']:.0f} | {r['idle']:.0f} | {r['cache']:.0f} |\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client")
    args = parser.parse_args()
    print(markdown(measure(args.clients, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
