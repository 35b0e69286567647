"""`make bench`'s catalogue section: book search at scale.

Generates N synthetic books (default 1,000,000), imports them with `python serveapi.py import`, starts
a gateway over that catalogue and measures: import time, rows/s and peak RSS; time until the search
index has every book (lexically); search latency p50/p95; time from POST /api/books to searchable;
time until a row inserted by SQL straight into the database is found; gateway RSS; and how fast
embeddings fill in the background (books/s per model, extrapolated to the whole catalogue).

    python bench/catalogue.py [--rows 1000000]

Search here is retrieval only (SEARCH_MODEL_CHOICE=off, no model server needed), so the numbers are
the index's; with the model's choice on, add one short constrained generation per search."""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from run import Proc, free_port  # noqa: E402

# Parts for plausible, varied titles: topic words x kinds of book x numbering.
TOPICS = ["线性代数", "微积分", "概率论", "数据库", "操作系统", "机器学习", "中国古代史", "欧洲中世纪", "有机化学",
          "量子力学", "宏观经济学", "刑法", "民法典", "心理学", "社会学", "建筑设计", "园林", "烹饪", "摄影", "天文学",
          "植物学", "动物行为", "航海", "登山", "围棋", "书法", "国画", "钢琴", "吉他", "舞蹈", "法语", "日语", "德语",
          "西班牙语", "编程", "网络安全", "密码学", "电子电路", "机械制造", "材料科学"]
KINDS = ["入门", "教程", "精解", "导论", "实战", "手册", "原理", "简史", "十讲", "百问", "研究", "案例集"]
SURNAMES = list("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘")


def generate(path: Path, rows: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(rows):
            topic = rng.choice(TOPICS)
            title = f"{topic}{rng.choice(KINDS)}（第{i % 97 + 1}版）第{i}号"
            author = rng.choice(SURNAMES) + rng.choice(SURNAMES) + rng.choice("明华强伟芳娜敏静丽军")
            fh.write(json.dumps({"title": title, "author": author, "subjects": [topic, rng.choice(TOPICS)],
                                 "year": 1950 + i % 75}, ensure_ascii=False) + "\n")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def search(url: str, query: str) -> list[int]:
    r = requests.post(url + "/api/books/search", json={"query": query}, timeout=120)
    r.raise_for_status()
    return [b["id"] for b in r.json()["books"]]


def until(predicate, timeout: float, step: float = 0.05) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(step)
    return float("inf")


def bench(rows: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-catalogue-"))
    data, db = tmp / "books.jsonl", tmp / "catalogue.db"
    url_db = f"sqlite:///{db}"
    generate(data, rows)
    started = time.monotonic()
    subprocess.run([sys.executable, "serveapi.py", "import", str(data), "--database-url", url_db], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    imported = time.monotonic() - started
    import_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out = {"rows": rows, "import_s": imported, "import_rows_s": rows / imported, "import_peak_rss_mb": import_rss}

    port = free_port()
    env = {"SEARCH_MODEL_CHOICE": "off", "EMBEDDING_CACHE": str(tmp / "embeddings.sqlite"),
           "MODEL_SERVER_URL": "http://127.0.0.1:9"}  # no model server: search does not need one here
    gw = Proc([sys.executable, "serveapi.py", "--port", str(port), "--database-url", url_db],
              f"http://127.0.0.1:{port}", "bench-catalogue-gateway.log", env=env)
    try:
        started = time.monotonic()

        def progress() -> dict:
            try:
                return requests.get(gw.url + "/health", timeout=10).json()["search"]
            except (requests.RequestException, ValueError, KeyError):
                return {}

        out["index_ready_s"] = until(lambda: progress().get("ready"), timeout=3600, step=1.0)
        out["gateway_rss_mb"] = rss_mb(gw.p.pid)
        embedded_at_ready = progress().get("embedded", {})
        ready_at = time.monotonic()

        rng = random.Random(2)
        queries = [f"{rng.choice(TOPICS)}{rng.choice(KINDS)}" for _ in range(40)] + \
                  [f"有没有关于{rng.choice(TOPICS)}的书" for _ in range(20)]
        latencies = []
        for q in queries:
            t = time.perf_counter()
            search(gw.url, q)
            latencies.append(time.perf_counter() - t)
        out["search_p50_s"], out["search_p95_s"] = pct(latencies, 0.5), pct(latencies, 0.95)

        t = time.monotonic()
        r = requests.post(gw.url + "/api/books", json={"books": [{"title": "潜水员的深海日记", "subjects": ["潜水"]}]},
                          timeout=60)
        new_id = r.json()["books"][0]["id"]
        out["post_to_searchable_s"] = (time.monotonic() - t) + until(
            lambda: new_id in search(gw.url, "潜水员的深海日记"), timeout=60)

        t = time.monotonic()
        with sqlite3.connect(db) as conn:
            sql_id = conn.execute("INSERT INTO book (title) VALUES ('极地科考船上的一年')").lastrowid
        out["sql_insert_seen_s"] = (time.monotonic() - t) + until(
            lambda: sql_id in search(gw.url, "极地科考船上的一年"), timeout=60)

        # Embedding fill rate since the index was ready (the worker starts with the first books).
        time.sleep(30)
        now = progress().get("embedded", {})
        elapsed = time.monotonic() - ready_at
        out["embedded"] = now
        out["embed_rate"] = {m: (now.get(m, 0) - embedded_at_ready.get(m, 0)) / elapsed for m in now}
        out["gateway_rss_end_mb"] = rss_mb(gw.p.pid)
    finally:
        gw.stop()
    return out


def markdown(r: dict) -> str:
    rate = ", ".join(f"{m} {v:.1f} books/s (whole catalogue ≈ {r['rows'] / v / 3600:.1f} h)" if v > 0 else f"{m} —"
                     for m, v in r["embed_rate"].items())
    lines = [f"Catalogue of {r['rows']:,} generated books (SQLite), retrieval only:", "",
             "| measure | value | goal |", "| --- | --- | --- |",
             f"| import (`serveapi.py import`) | {r['import_s']:.0f} s, {r['import_rows_s']:,.0f} rows/s, "
             f"peak RSS {r['import_peak_rss_mb']:.0f} MB | |",
             f"| search index has every book (lexical) | {r['index_ready_s']:.0f} s after start | |",
             f"| search latency p50 / p95 | {r['search_p50_s'] * 1000:.0f} / {r['search_p95_s'] * 1000:.0f} ms | |",
             f"| POST /api/books → searchable | {r['post_to_searchable_s']:.2f} s | ≤ 1 s |",
             f"| row inserted by SQL → searchable | {r['sql_insert_seen_s']:.2f} s | ≤ 10 s |",
             f"| gateway RSS | {r['gateway_rss_mb']:.0f} MB at index ready, {r['gateway_rss_end_mb']:.0f} MB at the end | |",
             f"| embeddings filling in the background | {rate} | |"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    os.chdir(ROOT)
    result = bench(args.rows)
    text = markdown(result)
    print(json.dumps(result, indent=1))
    print(text)
    (HERE / "results-catalogue.md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
