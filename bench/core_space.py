"""Each rule in core space against the same rule in full space, side by side.

    python bench/core_space.py [--seed 0] [--rules lora_ties lora_tsv_m ...]

SmolLM2-135M's five multi-task adapters of bench/real (run bench/real/run.py
--parts multitask first), merged adapter-only at rank sum r = 40, once with
``space: full`` and once with ``space: core``, each merge in its own process,
the two of a rule one right after the other. Prints the merge's seconds
(measured by the child around ``mergekit_tada.merge``), the process's peak
anonymous memory, and the full / core ratio. Accuracy: docs/quality-real.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RULES = (
    "lora_ties",
    "lora_dare_ties",
    "lora_dare_linear",
    "lora_breadcrumbs",
    "lora_breadcrumbs_ties",
    "lora_della",
    "lora_della_linear",
    "lora_magnitude_prune",
    "lora_tsv_m",
    "lora_iso_c",
    "lora_iso_cts",
)
DENSITY = {"lora_tsv_m", "lora_iso_c", "lora_iso_cts"}  # rules without density


def config(rule: str, space: str, seed: int) -> dict:
    work = ROOT / "bench/work/real"
    root = work / f"full/multitask/seed{seed}"
    params = {} if rule in DENSITY else {"density": 0.5}
    return {
        "merge_method": rule,
        "base_model": str(work / "base"),
        "models": [
            {"model": f"{work / 'base'}+{p}", "parameters": {"weight": 1.0, **params}}
            for p in sorted(root.glob("lora-*"))
        ],
        "parameters": {"rank": 40, "space": space},
        "dtype": "float32",
    }


def child(rule: str, space: str, seed: int) -> None:
    import mergekit_tada

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        mergekit_tada.merge(
            config(rule, space, seed), out, adapter_only=True, quiet=True
        )
        print(json.dumps({"seconds": time.perf_counter() - start}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rules", nargs="+", default=list(RULES))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.seed)
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench/run.py")
    bench_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_run)
    print("| rule | full s | core s | full / core | full peak GB | core peak GB |")
    print("|---|---|---|---|---|---|")
    for rule in args.rules:
        cells = {}
        for space in ("full", "core"):
            cmd = [
                sys.executable,
                __file__,
                "--seed",
                str(args.seed),
                "--child",
                rule,
                space,
            ]
            result = bench_run.measure(cmd, ROOT)
            if result["rc"] != 0:
                raise SystemExit(f"{rule} {space} failed:\n{result['tail']}")
            line = [x for x in result["tail"].splitlines() if x.startswith("{")][-1]
            cells[space] = (json.loads(line)["seconds"], result["peak_anon_gb"])
        (fs, fm), (cs, cm) = cells["full"], cells["core"]
        print(
            f"| {rule} | {fs:.1f} | {cs:.2f} | {fs / cs:.0f}x | {fm:.2f} | {cm:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
