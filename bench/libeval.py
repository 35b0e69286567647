"""Book search on the library eval set (../shared/eval/library/), scored as its README defines:

- hit rate: share of requests with a non-empty `must_include_one_of` whose answer contains one of them;
- precision: share of answered books that are in `relevant` (over requests that answered something);
- rejection: share of `negative`/`adversarial` requests answered with no book... where `relevant` is
  empty (an adversarial request that also carries a real request is scored as a positive);
- grounding: answered books that are not in the catalogue, or whose title differs — must be 0.

    python bench/libeval.py [--gateway URL] [--queries FILE]

Without --gateway it starts a model server and a gateway of its own on loopback over a fresh SQLite
catalogue holding exactly the library's books (ids 1..420, as the judgments count them)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT.parent / "shared" / "eval" / "library"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def is_positive(case: dict) -> bool:
    return bool(case.get("must_include_one_of"))


def hit(case: dict, ids: list[int]) -> bool:
    """The one definition of a correct answer: a required book among the ids for a request that has
    one; no book at all for a request that nothing answers."""
    if is_positive(case):
        return bool(set(ids) & set(case["must_include_one_of"]))
    return not case.get("relevant") and ids == []


def score(cases: list[dict], answers: list[list[dict]], catalogue: dict[int, str]) -> dict:
    """Overall and per-kind scores of `answers` (each a list of {"id", "title"}) for `cases`."""
    groups: dict[str, list[tuple[dict, list[dict]]]] = defaultdict(list)
    for case, books in zip(cases, answers):
        groups[case["kind"]].append((case, books))
        groups["all"].append((case, books))
    out = {}
    for kind, pairs in groups.items():
        positives = [(c, b) for c, b in pairs if is_positive(c)]
        rejectable = [(c, b) for c, b in pairs if not c.get("relevant")]
        answered = [(c, b) for c, b in pairs if b]
        books = sum(len(b) for _, b in answered)
        relevant = sum(sum(1 for x in b if x["id"] in set(c.get("relevant", []))) for c, b in answered)
        ungrounded = sum(1 for _, b in pairs for x in b if catalogue.get(x["id"]) != x["title"])
        out[kind] = {
            "requests": len(pairs),
            "hit": _ratio(sum(hit(c, [x["id"] for x in b]) for c, b in positives), len(positives)),
            "precision": _ratio(relevant, books),
            "rejection": _ratio(sum(1 for _, b in rejectable if not b), len(rejectable)),
            "ungrounded": ungrounded,
        }
    return out


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 3) if b else None


def markdown(scores: dict) -> str:
    rows = ["| kind | requests | hit | precision | rejection | ungrounded |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    order = ["direct", "paraphrase", "english", "author", "category", "negative", "adversarial", "all"]
    for kind in sorted(scores, key=lambda k: order.index(k) if k in order else 99):
        s = scores[kind]
        cells = [_pct(s["hit"]), _pct(s["precision"]), _pct(s["rejection"])]
        rows.append(f"| {kind} | {s['requests']} | " + " | ".join(cells) + f" | {s['ungrounded']} |")
    return "\n".join(rows)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def run(gateway: str, cases: list[dict], timeout: float = 120) -> tuple[list[list[dict]], list[float]]:
    """Each case's answer from the gateway's /api/books/search, and each request's latency."""
    answers, latencies = [], []
    for case in cases:
        started = time.perf_counter()
        r = requests.post(gateway + "/api/books/search", json={"query": case["query"]}, timeout=timeout)
        latencies.append(time.perf_counter() - started)
        r.raise_for_status()
        answers.append(r.json()["books"])
    return answers, latencies


def library_catalogue() -> list[dict]:
    return read_jsonl(LIBRARY / "catalogue.jsonl")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gateway", help="a running gateway whose catalogue is exactly the library's")
    parser.add_argument("--queries", default=str(LIBRARY / "queries_public.jsonl"))
    parser.add_argument("--model-choice", choices=["on", "off"], default="on")
    args = parser.parse_args()
    cases = read_jsonl(Path(args.queries))
    books = library_catalogue()
    titles = {b["id"]: b["title"] for b in books}
    if args.gateway:
        answers, latencies = run(args.gateway, cases)
    else:
        sys.path.insert(0, str(ROOT))
        from bench.stack import library_stack

        with library_stack(books, model_choice=args.model_choice,
                           embedding_cache=str(ROOT / "data" / "embeddings.sqlite")) as url:
            answers, latencies = run(url, cases)
    scores = score(cases, answers, titles)
    print(markdown(scores))
    latencies.sort()
    print(f"\nlatency p50 {latencies[len(latencies) // 2]:.2f} s, p95 {latencies[int(len(latencies) * .95)]:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
