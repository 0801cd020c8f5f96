"""Retrieval at the paper's size: 22 adapters x 2,000 rows = 44,000 rows.

Builds a tiny base and 22 small PEFT LoRAs, writes 2,000 synthetic rows per
adapter (each adapter its own vocabulary of topics and templates), then:

* index throughput: rows/s of embedding (all-MiniLM-L6-v2, 2 cores) and of
  insertion into the embedded Chroma collection, measured apart;
* ``route`` latency per query (top-100), the embedder's load reported apart,
  median and p90 over the queries; the target is <= 50 ms at 44,000 rows;
* HNSW recall@100 against an exact numpy top-100 over the same embeddings
  (target >= 0.99);
* peak resident memory.

    python bench/retrieval.py [WORKDIR] [--adapters 22] [--rows 2000] [--queries 50]
"""

import argparse
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOPICS = [
    "astronomy",
    "baking",
    "chess",
    "diabetes",
    "elections",
    "football",
    "gardening",
    "hiking",
    "insurance",
    "jazz",
    "knitting",
    "law",
    "movies",
    "nutrition",
    "opera",
    "physics",
    "quilting",
    "robotics",
    "sailing",
    "taxes",
    "urbanism",
    "volcanoes",
]
TEMPLATES = [
    "What is the best way to learn about {a} and {b}?",
    "I read an article on {a} that mentioned {b} twice.",
    "Explain how {a} relates to {b} for a beginner.",
    "My friend asked me about {a}; I only know about {b}.",
    "Is {a} more important than {b} in {topic}?",
]


def rows_for(topic: str, n: int, rng: random.Random) -> list[str]:
    vocab = [
        f"{topic} {w}"
        for w in (
            "history",
            "basics",
            "tools",
            "rules",
            "tips",
            "experts",
            "clubs",
            "books",
            "terms",
            "events",
        )
    ]
    return [
        rng.choice(TEMPLATES).format(
            a=rng.choice(vocab), b=rng.choice(vocab), topic=topic
        )
        + f" (case {i})"
        for i in range(n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", nargs="?", type=Path, default=Path("bench/work/retrieval"))
    ap.add_argument("--adapters", type=int, default=22)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=50)
    args = ap.parse_args()

    from mergekit_tada.retrieval.index import index_library
    from mergekit_tada.retrieval.route import route
    from mergekit_tada.retrieval.store import Embedder, Store
    from mergekit_tada.toy import build_llama, build_lora

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    topics = TOPICS[: args.adapters]
    if not (work / "base").exists():
        build_llama(work / "base", layers=2, seed=0)
    entries = []
    for i, topic in enumerate(topics):
        if not (work / f"lora-{topic}").exists():
            build_lora(
                work / "base", work / f"lora-{topic}", r=2, seed=i, targets=("q_proj",)
            )
        (work / f"{topic}.txt").write_text(
            "\n".join(rows_for(topic, args.rows, rng)) + "\n"
        )
        entries.append(
            {"name": topic, "path": f"./lora-{topic}", "samples": f"./{topic}.txt"}
        )
    library = work / "library.yml"
    library.write_text(
        yaml.safe_dump(
            {"base_model": "./base", "adapters": entries, "max_rows": args.rows}
        )
    )
    db = work / "db"
    if db.exists():
        import shutil

        shutil.rmtree(db)

    t0 = time.perf_counter()
    embedder = Embedder(quiet=True)
    embedder.encode(["warm up"])
    load = time.perf_counter() - t0

    spent = {"embed": 0.0}
    real_encode = embedder.encode

    def timed_encode(texts, batch_size=64):
        start = time.perf_counter()
        out = real_encode(texts, batch_size)
        spent["embed"] += time.perf_counter() - start
        return out

    embedder.encode = timed_encode
    t0 = time.perf_counter()
    summary = index_library(library, Store(db=str(db)), embedder, quiet=True)
    total = time.perf_counter() - t0
    embedder.encode = real_encode
    rows = summary.rows
    insert = total - spent["embed"]

    # queries: unseen rows of random topics
    qrng = random.Random(1)
    queries = [
        rows_for(qrng.choice(topics), 1, qrng)[0].replace("(case 0)", "")
        for _ in range(args.queries)
    ]
    store = Store(db=str(db))
    route(queries[:1], store, embedder)  # opens the collection, warms the index
    latencies = []
    for q in queries:
        start = time.perf_counter()
        route([q], store, embedder, k=100)
        latencies.append(time.perf_counter() - start)

    # recall@100 against exact top-100 over the stored vectors
    _, collection = store.open(embedder)
    stored = collection.get(include=["embeddings"])
    ids = np.array(stored["ids"])
    vectors = np.asarray(stored["embeddings"], dtype=np.float32)
    q = embedder.encode(queries)
    found = collection.query(query_embeddings=q, n_results=100, include=[])["ids"]
    recalls = []
    for row, hnsw in zip(q, found, strict=True):
        exact = set(ids[np.argsort(-(vectors @ row), kind="stable")[:100]])
        recalls.append(len(exact & set(hnsw)) / 100)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "rows": rows,
        "adapters": len(topics),
        "embedder_load_s": round(load, 2),
        "embedding_rows_per_s": round(rows / spent["embed"], 1),
        "insertion_rows_per_s": round(rows / insert, 1),
        "route_ms_median": round(1000 * statistics.median(latencies), 1),
        "route_ms_p90": round(1000 * sorted(latencies)[int(0.9 * len(latencies))], 1),
        "recall_at_100_mean": round(float(np.mean(recalls)), 4),
        "recall_at_100_min": round(float(np.min(recalls)), 4),
        "peak_rss_mb": round(peak),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
