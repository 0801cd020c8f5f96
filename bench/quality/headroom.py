"""Where the headroom is: the global task/domain balance and per-group oracles.

On the task x domain worlds of run.py (built and cached there), for each seed:

1. **Global grid**: task arithmetic with task weight a and domain weight b,
   a, b in {0, 0.25, ..., 2} (81 merges). The best pair per world is an
   oracle upper bound for any rule that picks one global balance.
2. **Per-group oracle**: from the best global pair, coordinate ascent over
   the weights of 8 groups (each layer's attention and MLP) for each adapter,
   trying x0, x0.5, x1.5, x2 per coordinate and keeping what raises the
   combined score on a *tuning half* of the combined items; then scored on
   the *held-out half*, and its per-group weights applied as they are to the
   other seeds' worlds (transfer).

Every score also reports H, the harmonic mean of combined and task control.
Weights per group go through mergekit's filter lists, so these are ordinary
``lora_task_arithmetic`` merges. Writes docs/quality-headroom.md and .json.

    .venv/bin/python bench/quality/headroom.py [--seeds 0 1 2] [--world quiet]

(--world quiet writes docs/quality-quiet-headroom.md and .json.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from report import doc_stem, harmonic  # noqa: E402
from run import WORK, Ctx, score, with_adapter  # noqa: E402
from world import WORLDS, World, WorldSpec, world_root  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs"
GRID = [i / 4 for i in range(9)]
MULTIPLIERS = (0.0, 0.5, 1.5, 2.0)


def groups(layers: int) -> list[str]:
    return [
        f"layers.{i}.{part}" for i in range(layers) for part in ("self_attn", "mlp")
    ]


def weight_value(per_group: dict[str, float] | float):
    """A scalar, or a mergekit filter list (substring of the tensor name)."""
    if isinstance(per_group, float | int):
        return float(per_group)
    return [{"filter": g, "value": w} for g, w in per_group.items()] + [{"value": 0.0}]


def merged_model(ctx: Ctx, tag: str, task, domain):
    import mergekit_tada

    config = {
        "merge_method": "lora_task_arithmetic",
        "base_model": ctx.base,
        "models": [
            {
                "model": f"{ctx.base}+{ctx.lora('task')}",
                "parameters": {"weight": weight_value(task)},
            },
            {
                "model": f"{ctx.base}+{ctx.lora('domain')}",
                "parameters": {"weight": weight_value(domain)},
            },
        ],
        "parameters": {"lossless": True},
        "dtype": "float32",
    }
    out = ctx.out / tag
    mergekit_tada.merge(config, out, adapter_only=True, quiet=True)
    model = with_adapter(ctx, str(out / "adapter"))
    shutil.rmtree(out)
    return model


def evaluate(model, tok, sets: dict) -> dict[str, float]:
    row = {name: score(model, tok, pairs)["exact"] for name, pairs in sets.items()}
    # the halves split the combined items evenly: combined is their mean
    row["combined"] = (row["tune"] + row["held_out"]) / 2
    row["H"] = harmonic(row["combined"], row["task"])
    return row


def context(seed: int, world_name: str) -> tuple[Ctx, World, dict, object]:
    from transformers import AutoTokenizer

    world = World.generate(WorldSpec(seed=seed, **WORLDS[world_name]))
    root = world_root(WORK, world_name, seed)
    if not (root / "world.json").exists():
        raise SystemExit(
            f"{root} is not built: run bench/quality/run.py --seeds {seed} "
            f"--world {world_name}"
        )
    ctx = Ctx(root, seed, world, root / "headroom")
    shutil.rmtree(ctx.out, ignore_errors=True)
    ctx.out.mkdir()
    sets = world.eval_sets()
    combined = sets["combined"]
    assert len(combined) % 2 == 0
    sets = {
        "tune": combined[0::2],
        "held_out": combined[1::2],
        "task": sets["task"],
        "domain": sets["domain"],
    }
    return ctx, world, sets, AutoTokenizer.from_pretrained(ctx.base)


def run_seed(seed: int, world_name: str, log=print) -> dict:
    ctx, world, sets, tok = context(seed, world_name)
    grid = {}
    for a in GRID:
        for b in GRID:
            grid[(a, b)] = evaluate(merged_model(ctx, f"g{a}-{b}", a, b), tok, sets)
    best = max(grid, key=lambda k: (grid[k]["combined"], grid[k]["H"]))
    best_h = max(grid, key=lambda k: (grid[k]["H"], grid[k]["combined"]))
    log(f"  seed {seed}: best global pair {best} combined {grid[best]['combined']:.1f}")
    task = dict.fromkeys(groups(world.spec.layers), best[0])
    domain = dict.fromkeys(groups(world.spec.layers), best[1])
    current = evaluate(merged_model(ctx, "start", task, domain), tok, sets)
    for group in groups(world.spec.layers):
        for weights in (task, domain):
            base_value = weights[group]
            for m in MULTIPLIERS:
                weights[group] = base_value * m
                trial = evaluate(merged_model(ctx, "trial", task, domain), tok, sets)
                if trial["tune"] > current["tune"]:
                    current, base_value = trial, weights[group]
                weights[group] = base_value
    log(
        f"  seed {seed}: per-group oracle tune {current['tune']:.1f} "
        f"held-out {current['held_out']:.1f} combined {current['combined']:.1f}"
    )
    return {
        "grid": {f"{a},{b}": row for (a, b), row in grid.items()},
        "best": list(best),
        "best_by_H": list(best_h),
        "oracle": {"task": task, "domain": domain, "scores": current},
    }


def transfer(results: dict, world_name: str, log=print) -> dict:
    """Each seed's per-group weights applied to every other seed's world."""
    out = {}
    for source, res in results.items():
        for target in results:
            if target == source:
                continue
            ctx, _, sets, tok = context(target, world_name)
            row = evaluate(
                merged_model(
                    ctx, "transfer", res["oracle"]["task"], res["oracle"]["domain"]
                ),
                tok,
                sets,
            )
            out[f"{source}->{target}"] = row
            log(
                f"  oracle of seed {source} on seed {target}: combined {row['combined']:.1f}"
            )
    return out


def write_docs(results: dict, moved: dict, seconds: float, world_name: str) -> str:
    stem = doc_stem(world_name)
    (DOCS / f"{stem}-headroom.json").write_text(
        json.dumps({"seeds": results, "transfer": moved}, indent=1) + "\n"
    )
    lines = [
        "# Headroom of the task/domain balance (bench/quality/headroom.py)"
        + ("" if world_name == "default" else f", the {world_name} world"),
        "",
        f"Seeds {', '.join(map(str, results))}; {seconds / 60:.1f} min. Exact match %; "
        "H = harmonic mean of combined and task control. Task arithmetic 1/1 is "
        "the (1.0, 1.0) cell; TaDA's default gates stay close to it.",
        "",
        "## Global grid: the best (task, domain) weight pair per world",
        "",
        "| seed | best pair (combined) | combined | task | domain | H | best pair (H) | its H | 1/1 combined | 1/1 H |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, res in results.items():
        g = res["grid"]
        b = g[",".join(map(str, res["best"]))]
        bh = g[",".join(map(str, res["best_by_H"]))]
        one = g["1.0,1.0"]
        lines.append(
            f"| {seed} | {tuple(res['best'])} | {b['combined']:.1f} | {b['task']:.1f} | "
            f"{b['domain']:.1f} | {b['H']:.1f} | {tuple(res['best_by_H'])} | {bh['H']:.1f} | "
            f"{one['combined']:.1f} | {one['H']:.1f} |"
        )

    def mean(key: str, cell=None) -> float:
        return statistics.mean(
            r["grid"][cell or ",".join(map(str, r["best"]))][key]
            for r in results.values()
        )

    lines += [
        "",
        f"Mean over seeds: best global pair {mean('combined'):.1f} combined "
        f"(H {mean('H'):.1f}) against task arithmetic 1/1 "
        f"{mean('combined', '1.0,1.0'):.1f} (H {mean('H', '1.0,1.0'):.1f}).",
        "",
        "## Per-group oracle (layer x attention/MLP, from the best global pair)",
        "",
        "| seed | start: tune / held-out | oracle: tune / held-out | combined | H |",
        "|---|---|---|---|---|",
    ]
    for seed, res in results.items():
        start = res["grid"][",".join(map(str, res["best"]))]
        o = res["oracle"]["scores"]
        lines.append(
            f"| {seed} | {start['tune']:.1f} / {start['held_out']:.1f} | "
            f"{o['tune']:.1f} / {o['held_out']:.1f} | {o['combined']:.1f} | {o['H']:.1f} |"
        )
    lines += [
        "",
        "Transfer (one seed's per-group weights on another seed's world, combined):",
        "",
        *(f"- {k}: {v['combined']:.1f} (H {v['H']:.1f})" for k, v in moved.items()),
    ]
    (DOCS / f"{stem}-headroom.md").write_text("\n".join(lines) + "\n")
    return f"docs/{stem}-headroom.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--world", choices=sorted(WORLDS), default="default")
    args = parser.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    results = {seed: run_seed(seed, args.world) for seed in args.seeds}
    moved = transfer(results, args.world)
    page = write_docs(results, moved, time.perf_counter() - t0, args.world)
    print(f"wrote {page} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
