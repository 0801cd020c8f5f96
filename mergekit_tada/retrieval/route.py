"""Route a new task's inputs to adapter weights (algorithms.md section 5, step 2).

Per query: its top-k neighbours (k = 100) in the collection, similarity
1 - cosine distance; per adapter, the sum of its neighbours' similarities
(``weighting="sum"``; negative similarities count as 0) or their number
(``"count"``, the paper's label-frequency variant), normalised to a
distribution. Several queries (a new task's examples): the mean of their
distributions. Then the nucleus: the smallest set of adapters, strongest first
(ties by name), whose mass reaches p (0.9), at most ``max_adapters``,
renormalised. Each query's own distribution and nucleus are reported too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mergekit_tada.errors import TadaError
from mergekit_tada.retrieval.store import (
    Embedder,
    Store,
    check_complete,
    library_state,
)

WEIGHTINGS = ("sum", "count")


@dataclass
class Routing:
    weights: dict[str, float]  # the nucleus, renormalised (the merge weights)
    distribution: dict[str, float]  # mean over queries, before the nucleus
    queries: list[dict] = field(default_factory=list)  # per query details
    adapters: dict[str, str] = field(default_factory=dict)  # name -> adapter path
    # name -> sha256 of adapter_model.safetensors when indexed (compose checks it)
    adapter_hashes: dict[str, str] = field(default_factory=dict)
    base_model: str = ""
    settings: dict = field(default_factory=dict)


def aggregate(
    names: list[str], similarities: list[float], weighting: str
) -> dict[str, float]:
    """One query's distribution over adapters from its neighbours."""
    scores: dict[str, float] = {}
    for name, sim in zip(names, similarities, strict=True):
        value = 1.0 if weighting == "count" else max(sim, 0.0)
        scores[name] = scores.get(name, 0.0) + value
    total = sum(scores.values())
    if total <= 0:  # every neighbour dissimilar: fall back to counts
        return aggregate(names, similarities, "count")
    return {n: s / total for n, s in sorted(scores.items())}


def nucleus(
    distribution: dict[str, float], p: float, max_adapters: int | None
) -> dict[str, float]:
    """The smallest strongest-first set reaching mass p (capped), renormalised."""
    ranked = sorted(distribution.items(), key=lambda kv: (-kv[1], kv[0]))
    kept, mass = [], 0.0
    for name, weight in ranked:
        if weight <= 0:
            break
        kept.append((name, weight))
        mass += weight
        if mass >= p - 1e-12 or (max_adapters and len(kept) >= max_adapters):
            break
    total = sum(w for _, w in kept)
    return {name: w / total for name, w in kept}


def route(
    queries: list[str],
    store: Store,
    embedder: Embedder | None = None,
    k: int = 100,
    weighting: str = "sum",
    p: float = 0.9,
    max_adapters: int | None = None,
) -> Routing:
    """Adapter weights for the queries (see the module docstring)."""
    if not queries:
        raise TadaError("route: no queries given")
    empty = [i for i, q in enumerate(queries, 1) if not q.strip()]
    if empty:
        raise TadaError(
            f"route: query {empty[0]} is empty ({len(empty)} empty of {len(queries)}); "
            "give the new task's inputs as text"
        )
    if weighting not in WEIGHTINGS:
        raise TadaError(f"route: weighting must be one of {', '.join(WEIGHTINGS)}")
    if not 0 < p <= 1:
        raise TadaError(f"route: p must be in (0, 1] (got {p})")
    if k < 1 or (max_adapters is not None and max_adapters < 1):
        raise TadaError("route: k and max_adapters must be >= 1")
    embedder = embedder or Embedder(quiet=True)
    _, collection = store.open(embedder)
    check_complete(collection, store)
    count = collection.count()
    if count == 0:
        raise TadaError(
            f"adapter library {store.where} is empty: index a library first"
        )
    vectors = embedder.encode(queries)
    found = collection.query(
        query_embeddings=vectors,
        n_results=min(k, count),
        include=["metadatas", "distances"],
    )
    per_query, distributions = [], []
    for text, metas, distances in zip(
        queries, found["metadatas"], found["distances"], strict=True
    ):
        names = [m["adapter"] for m in metas]
        sims = [1.0 - float(d) for d in distances]
        dist = aggregate(names, sims, weighting)
        distributions.append(dist)
        neighbours: dict[str, dict] = {}
        for name, sim in zip(names, sims, strict=True):
            entry = neighbours.setdefault(name, {"count": 0, "similarity_sum": 0.0})
            entry["count"] += 1
            entry["similarity_sum"] += sim
        per_query.append(
            {
                "query": text,
                "neighbours": neighbours,
                "top_similarity": max(sims),
                "distribution": dist,
                "nucleus": nucleus(dist, p, max_adapters),
            }
        )
    names = sorted({n for d in distributions for n in d})
    mean = {n: float(np.mean([d.get(n, 0.0) for d in distributions])) for n in names}
    state = library_state(collection)
    return Routing(
        weights=nucleus(mean, p, max_adapters),
        distribution=mean,
        queries=per_query,
        adapters={n: s["path"] for n, s in sorted(state.items())},
        adapter_hashes={
            n: s["sha256"] for n, s in sorted(state.items()) if s.get("sha256")
        },
        base_model=(collection.metadata or {}).get("base_model", ""),
        settings={
            "k": k,
            "weighting": weighting,
            "p": p,
            "max_adapters": max_adapters,
            "embedder": embedder.identity,
            "store": store.where,
            "collection": store.collection,
        },
    )
