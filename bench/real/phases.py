"""Phase times of the real-weights benchmark, measured alone (docs/quality-real.md, "Cost").

    python bench/real/phases.py [--work bench/work/real] [--seed 0] [--threads 2]

Times one of each phase the full run repeats: training a task's adapter, the
validation grid and one test pass of a multi-task row, and three merges of
the five adapters (dense, factored, TARA A). Uses the full run's cached
adapters of ``--seed`` (run ``run.py --parts multitask --seeds 0`` first);
everything it writes goes to a temporary folder, and TARA gets an empty
cache so it trains. Run it with nothing else on the machine: times measured
while other runs share the cores overstate some phases by up to 4x.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from data import MULTITASK
from run import Bench, merge, multitask_methods
from train import train_lora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="bench/work/real")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    bench = Bench(Path(args.work), quick=False)
    root = bench.work / f"full/multitask/seed{args.seed}"
    adapters = {t: root / f"lora-{t}" for t in MULTITASK}
    if not all((p / "adapter_config.json").exists() for p in adapters.values()):
        raise SystemExit(f"{root}: no cached adapters; run run.py --parts multitask")
    times: dict[str, float] = {}

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - start
        print(f"{name}: {times[name]:.1f} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        task = MULTITASK[0]
        rows = bench.split(task, "train")
        timed(
            f"adapter ({task}, {len(rows)} rows, 1 epoch)",
            lambda: train_lora(
                bench.base, out / "lora", {"task": rows}, 7, 1, quiet=True
            ),
        )
        summed = root / "merges/task_arithmetic__sum_/adapter"
        val = {t: bench.split(t, "val") for t in adapters}
        test = {t: bench.split(t, "test") for t in adapters}
        _ = bench.evaluator  # the base is loaded before timing starts
        timed(
            f"validation grid ({len(bench.grid)} scales x {sum(map(len, val.values()))} rows)",
            lambda: [bench.evaluator.correct(val, summed, scale=c) for c in bench.grid],
        )
        timed(
            f"one test pass ({sum(map(len, test.values()))} rows)",
            lambda: bench.evaluator.correct(test, summed),
        )
        data = {t: str(root / f"data-{t}.jsonl") for t in adapters}
        configs = multitask_methods(bench, adapters, data)
        for name in ("lora_ties", "lora_tsv_m", "tara A"):
            cfg = configs[name]
            if "cache_dir" in cfg["parameters"]:  # TARA trains, not reads its cache
                cfg["parameters"]["cache_dir"] = str(out / "cache")
            timed(f"merge {name}", lambda cfg=cfg, name=name: merge(cfg, out / name))
    print("\n| phase | seconds |\n|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
