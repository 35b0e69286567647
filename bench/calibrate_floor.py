"""Calibrates the book-search floor on our own held-out requests (bench/data/heldout_*.jsonl, written
and judged before any result was seen; not the public eval) and shows every set's scores per floor.

    python bench/calibrate_floor.py

Retrieval only (no model): builds the hybrid index over the library's 420 books, takes each request's
best fused score, and prints the smallest FLOOR_SCALE (0.05 grid) at which 80% of the held-out
negatives fall under the floor, then hit / precision / rejection per set for a range of scales."""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench import libeval  # noqa: E402
from chatglm4 import embedding  # noqa: E402
from chatglm4.catalogue import Catalogue  # noqa: E402
from chatglm4.protocol import NewBook  # noqa: E402
from chatglm4.searchindex import CatalogueIndex, FusionSettings  # noqa: E402
from chatglm4.vectors import EmbeddingCache  # noqa: E402

SETS = {"heldout_1": HERE / "data" / "heldout_1.jsonl", "heldout_2": HERE / "data" / "heldout_2.jsonl",
        "public": libeval.LIBRARY / "queries_public.jsonl"}
CALIBRATION = ("heldout_1", "heldout_2")


def main() -> int:
    books = libeval.library_catalogue()
    titles = {b["id"]: b["title"] for b in books}
    with tempfile.TemporaryDirectory() as tmp:
        catalogue = Catalogue(f"sqlite:///{tmp}/library.db", seed_titles=[])
        catalogue.init_schema()
        catalogue.add_books([NewBook.model_validate({k: v for k, v in b.items() if k != "id"}) for b in books])
        # Floor off: every request's candidates come back with their scores.
        index = CatalogueIndex(catalogue, embedding.load(["e5", "use"]),
                               EmbeddingCache(HERE.parent / "data" / "embeddings.sqlite"),
                               FusionSettings(floor=-math.inf), poll_interval=60).start()
        index.wait_ready(600)
        while min(index.progress()["embedded"].values()) < len(books):
            time.sleep(0.5)
        results = {name: [(c, index.search(c["query"], 8)) for c in libeval.read_jsonl(path)]
                   for name, path in SETS.items()}
        index.close()
    unit = math.sqrt(2 * math.log(len(books)))
    negatives = sorted(hits[0].score if hits else -math.inf
                       for name in CALIBRATION for case, hits in results[name] if not case.get("relevant"))
    need = math.ceil(0.8 * len(negatives))
    scale = math.ceil(negatives[need - 1] / unit / 0.05) * 0.05 if need else 1.0
    print(f"{len(negatives)} held-out negatives; best scores {[round(x, 2) for x in negatives]}")
    print(f"calibrated FLOOR_SCALE = {scale:.2f} (floor {scale * unit:.2f} at {len(books)} books)\n")
    for step in range(-4, 5):
        s = round(scale + 0.05 * step, 2)
        cells = []
        for name, pairs in results.items():
            answers = [[{"id": h.book_id, "title": titles[h.book_id]} for h in hits]
                       if hits and hits[0].score >= s * unit else [] for _, hits in pairs]
            r = libeval.score([c for c, _ in pairs], answers, titles)["all"]
            cells.append(f"{name} {r['hit']:.2f}/{r['precision']:.2f}/{r['rejection']:.2f}")
        print(f"scale {s:.2f}: " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
