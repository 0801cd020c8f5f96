"""Retrieval composition in a controlled world: six adapters, an unseen combination.

The world of world.py (a tiny Llama pre-trained on facts about general
entities) gets a library of six LoRAs on one base:

- three *formats* (skills), trained on general entities with replay:
  ``repeat : the color of g3 is`` -> ``red red``,
  ``who : the color of g3 is`` -> ``red g3``,
  ``what : the color of g3 is`` -> ``red color``;
- three *domains* (knowledge): declarative facts about three disjoint sets of
  new entities.

Each adapter's training inputs (prompts for the formats, sentences for the
domains) are its samples in the library (MiniLM embeddings, Chroma). A new
task is a set of prompts; its held-out examples are used as the queries:

- single skills: a format on held-out general entities, and declarative
  completions of each domain's facts;
- the unseen combinations: a format asked about a domain's entities (no
  adapter saw both; 9 of them).

Reported per new task: routing accuracy (the right adapter on top, per query;
for combinations, both right adapters in the nucleus), and exact match of the
composed merge (task arithmetic with the retrieved weights, which sum to 1,
and the same weights times the number of selected adapters) against the
uniform merge of all six (1/6 each and 1 each), the single best adapter, the
oracle adapter (the right format adapter for a combination) and, for
combinations, the oracle pair (format + domain at 1/1).

    .venv/bin/python bench/composition/retrieval.py [--seed 0]

The world is built once under bench/work/composition/retrieval-seed-N (about
12 minutes on 2 cores). Writes docs/retrieval-quality.md and .json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from mergekit_tada.methods.registry import FAMILY, get

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from world import World, WorldSpec, score, train_base, train_lora  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "bench" / "work" / "composition"
DOCS = REPO / "docs"
FORMATS = {
    "repeat": lambda e, a, v: f"{v} {v}",
    "who": lambda e, a, v: f"{v} {e}",
    "what": lambda e, a, v: f"{v} {a}",
}
DOMAINS = ("d-a", "d-b", "d-c")


class LibraryWorld(World):
    """world.py's world with three domains of new entities and three formats."""

    def vocabulary(self) -> list[str]:
        return [*super().vocabulary(), "who", "what"]

    def domains(self) -> dict[str, list[str]]:
        third = len(self.domain) // 3
        return {
            name: self.domain[i * third : (i + 1) * third]
            for i, name in enumerate(DOMAINS)
        }

    def format_prompt(self, fmt: str, e: str, a: str) -> str:
        return f"{fmt} : the {a} of {e} is"

    def format_corpus(self, fmt: str) -> list[tuple[str, str]]:
        """Loss on the response; its first word (the value) is in the prompt."""
        rows = []
        for e in self.task_entities:
            for a, v in self.facts[e].items():
                first, second = FORMATS[fmt](e, a, v).split()
                rows.append((f"{self.format_prompt(fmt, e, a)} {first}", f"{second} ."))
        return rows

    def domain_rows(self, name: str) -> list[tuple[str, str]]:
        return [("", t) for t in self._declarative(self.domains()[name])]

    def samples(self, adapter: str) -> list[str]:
        """The adapter's training inputs, as the library stores them."""
        if adapter in FORMATS:
            return [p for p, _ in self.format_corpus(adapter)]
        return [t for _, t in self.domain_rows(adapter)]

    def new_tasks(self) -> dict[str, dict]:
        """name -> {pairs: [(prompt, answer)], right: [adapters]}."""
        tasks = {}
        for fmt, answer in FORMATS.items():
            tasks[f"{fmt} (general)"] = {
                "pairs": [
                    (self.format_prompt(fmt, e, a), answer(e, a, v))
                    for e in self.held_out
                    for a, v in self.facts[e].items()
                ],
                "right": [fmt],
            }
        for name, entities in self.domains().items():
            tasks[f"{name} facts"] = {
                "pairs": [
                    (f"the {a} of {e} is", v)
                    for e in entities
                    for a, v in self.facts[e].items()
                ],
                "right": [name],
            }
            for fmt, answer in FORMATS.items():
                tasks[f"{fmt} x {name}"] = {
                    "pairs": [
                        (self.format_prompt(fmt, e, a), answer(e, a, v))
                        for e in entities
                        for a, v in self.facts[e].items()
                    ],
                    "right": [fmt, name],
                }
        return tasks


def build_library(world: LibraryWorld, root: Path, log=print) -> None:
    """Train the base and the six adapters; write samples and library.yml."""
    loss, seconds = train_base(world, root)
    log(f"  base: loss {loss:.3f} in {seconds:.0f} s")
    corpora = {fmt: world.format_corpus(fmt) for fmt in FORMATS} | {
        name: world.domain_rows(name) for name in DOMAINS
    }
    entries = []
    for i, (name, corpus) in enumerate(corpora.items()):
        loss, seconds, _ = train_lora(
            root, world.spec, name, world.with_replay(corpus), i, world.spec.lora_steps
        )
        log(f"  {name} LoRA: loss {loss:.3f} in {seconds:.0f} s")
        (root / f"{name}.txt").write_text("\n".join(world.samples(name)) + "\n")
        entries.append(
            {"name": name, "path": f"./lora-{name}", "samples": f"./{name}.txt"}
        )
    (root / "library.yml").write_text(
        json.dumps({"base_model": "./base", "adapters": entries}, indent=1)
    )


def inputs_of(method: str, names: list[str]) -> dict | None:
    """Per-adapter parameters: density 0.5 where the method takes one."""
    spec = get(method).spec
    if any(p.name == "density" for p in spec.input_parameters):
        return {n: {"weight": 1.0, "density": 0.5} for n in names}
    return None


def evaluate(root: Path, world: LibraryWorld, log=print) -> dict:
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    import mergekit_tada
    from mergekit_tada.retrieval.index import index_library
    from mergekit_tada.retrieval.route import route
    from mergekit_tada.retrieval.store import Embedder, Store

    tok = AutoTokenizer.from_pretrained(str(root / "base"))
    names = [*FORMATS, *DOMAINS]
    embedder = Embedder(quiet=True)
    store = Store(db=str(root / "db"))
    index_library(root / "library.yml", store, embedder, quiet=True)
    merges = root / "merges"
    shutil.rmtree(merges, ignore_errors=True)

    def base_model():
        return LlamaForCausalLM.from_pretrained(
            str(root / "base"), dtype=torch.float32
        ).eval()

    def merged(
        weights: dict[str, float],
        tag: str,
        method: str = "lora_task_arithmetic",
        params=None,
        per_model=None,
    ):
        weights = {n: w for n, w in weights.items() if w > 0}
        if len(weights) == 1:  # one adapter: itself, scaled
            ((name, w),) = weights.items()
            weights = {name: w, next(n for n in names if n != name): 0.0}
        config = {
            "merge_method": method,
            "base_model": str(root / "base"),
            "models": [
                {
                    "model": f"{root / 'base'}+{root / f'lora-{n}'}",
                    "parameters": (per_model or {}).get(n, {"weight": w}),
                }
                for n, w in weights.items()
            ],
            "parameters": params if params is not None else {"lossless": True},
            "dtype": "float32",
        }
        out = merges / tag
        mergekit_tada.merge(config, out, adapter_only=True, quiet=True)
        return PeftModel.from_pretrained(base_model(), str(out / "adapter")).eval()

    singles = {
        n: PeftModel.from_pretrained(base_model(), str(root / f"lora-{n}")).eval()
        for n in names
    }
    uniform_avg = merged(dict.fromkeys(names, 1 / len(names)), "uniform-avg")
    uniform_sum = merged(dict.fromkeys(names, 1.0), "uniform-sum")
    # the whole library merged by each method (TARA: each adapter's samples
    # as its unlabeled data); no routing
    every = dict.fromkeys(names, 1.0)
    rank = {"rank": 48}  # the sum of the six input ranks
    library_merges = {
        "task arithmetic 1 each": uniform_sum,
        "task arithmetic 1/6": uniform_avg,
    }
    timings = {}
    for label, method, params, per_model in (
        *(  # every fusion rule; task arithmetic is the two uniform merges above
            (m, m, rank, inputs_of(m, names))
            for m in FAMILY
            if m != "lora_task_arithmetic"
        ),
        *(
            (
                f"tara-{v.upper()} ({o})",
                "tara",
                {"variant": v, "objective": o, "cache_dir": str(root / "cache")},
                {n: {"data": str(root / f"{n}.txt")} for n in names},
            )
            for v in ("a", "b")
            for o in ("stch", "linear")
        ),
    ):
        t0 = time.perf_counter()
        library_merges[label] = merged(
            every, f"library-{label}", method, params, per_model
        )
        timings[label] = round(time.perf_counter() - t0, 1)
        log(f"  library merge {label}: {timings[label]} s")
    results = {}
    for task, spec in world.new_tasks().items():
        pairs, right = spec["pairs"], spec["right"]
        queries = [p for p, _ in pairs]
        routing = route(queries, store, embedder, k=100)
        top1 = [
            max(q["distribution"], key=q["distribution"].get) for q in routing.queries
        ]
        row = {
            "right": right,
            "weights": routing.weights,
            "routing_top1_right": 100 * statistics.mean(t in right for t in top1),
            "nucleus_has_all_right": all(r in routing.weights for r in right),
        }
        tag = task.replace(" ", "_")
        composed = merged(routing.weights, f"composed-{tag}")
        n_sel = len(routing.weights)
        scaled = merged(
            {n: w * n_sel for n, w in routing.weights.items()}, f"scaled-{tag}"
        )
        single_scores = {n: score(m, tok, pairs) for n, m in singles.items()}
        row["scores"] = {
            "composed (retrieved weights)": score(composed, tok, pairs),
            "composed x n selected": score(scaled, tok, pairs),
            "uniform 1/6": score(uniform_avg, tok, pairs),
            "uniform 1 each": score(uniform_sum, tok, pairs),
            "single best adapter": max(single_scores.values()),
            "oracle adapter": single_scores[right[0]],
        }
        if len(right) == 2:
            pair = merged(dict.fromkeys(right, 1.0), f"oracle-pair-{tag}")
            row["scores"]["oracle pair 1/1"] = score(pair, tok, pairs)
        row["single_scores"] = single_scores
        row["library_merges"] = {
            label: score(model, tok, pairs) for label, model in library_merges.items()
        }
        results[task] = row
        log(
            f"  {task:18s} top1 {row['routing_top1_right']:5.1f}  "
            + "  ".join(f"{k} {v:5.1f}" for k, v in row["scores"].items())
        )
    return {"tasks": results, "library_merge_seconds": timings}


def write_docs(seed: int, evaluated: dict, seconds: float) -> None:
    DOCS.mkdir(exist_ok=True)
    (DOCS / "retrieval-quality.json").write_text(json.dumps(evaluated, indent=1) + "\n")
    results = evaluated["tasks"]
    columns = list(next(iter(results.values()))["scores"])
    lines = [
        "# Retrieval composition in a controlled world (bench/composition/retrieval.py)",
        "",
        f"Seed {seed}, one world, {seconds:.0f} s of scoring. Exact match (%) of the "
        "answer; routing: the share of queries whose top adapter is a right one, and "
        "whether the nucleus (p = 0.9) holds every right adapter. Weights are the "
        "retrieved ones (mean over the task's held-out prompts, k = 100).",
        "",
        "| new task | right | top-1 right | nucleus ok | weights | "
        + " | ".join(columns)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(columns),
    ]
    for task, row in results.items():
        weights = ", ".join(f"{n} {w:.2f}" for n, w in row["weights"].items())
        scores = " | ".join(
            f"{row['scores'][c]:.1f}" if c in row["scores"] else "–" for c in columns
        )
        lines.append(
            f"| {task} | {' + '.join(row['right'])} | {row['routing_top1_right']:.0f} % | "
            f"{'yes' if row['nucleus_has_all_right'] else 'no'} | {weights} | {scores} |"
        )
    methods = list(next(iter(results.values()))["library_merges"])
    lines += [
        "",
        "## The whole library merged, by method (no routing)",
        "",
        "All six adapters in one merge (TARA: each adapter's samples as its "
        "unlabeled data, 500 steps, batch 16; TIES/KnOTS density 0.5; rank 48 "
        "where the method truncates). Merge seconds (TARA: with training): "
        + ", ".join(f"{k} {v}" for k, v in evaluated["library_merge_seconds"].items())
        + ".",
        "",
        "| new task | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for task, row in results.items():
        lines.append(
            f"| {task} | "
            + " | ".join(f"{row['library_merges'][m]:.1f}" for m in methods)
            + " |"
        )
    means = {
        m: statistics.mean(r["library_merges"][m] for r in results.values())
        for m in methods
    }
    lines.append(
        "| **mean** | " + " | ".join(f"**{means[m]:.1f}**" for m in methods) + " |"
    )
    (DOCS / "retrieval-quality.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = WorldSpec(seed=args.seed, n_domain=36)
    world = LibraryWorld.generate(spec)
    random.seed(args.seed)
    root = WORK / f"retrieval-seed-{args.seed}"
    if not (root / "library.yml").exists():
        building = WORK / f".retrieval-seed-{args.seed}.building"
        shutil.rmtree(building, ignore_errors=True)
        print(f"building the library world (seed {args.seed})")
        build_library(world, building)
        shutil.rmtree(root, ignore_errors=True)
        building.rename(root)
    t0 = time.perf_counter()
    results = evaluate(root, world)
    write_docs(args.seed, results, time.perf_counter() - t0)
    print(f"wrote docs/retrieval-quality.md in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
