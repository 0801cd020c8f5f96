"""RegMean's Gram pass against TaDA's probe calibration pass, and its peak memory.

    python bench/regmean_pass.py real [--seed 0] [--samples 64] [--against DIR]
                                      [--passes probe model base merged] [--threads N]
    python bench/regmean_pass.py limited [--fraction 0.6]

``real``: SmolLM2-135M and the five multi-task adapters of bench/real (run
bench/real/run.py --parts multitask first), each task's first ``samples``
training prompts. Three passes over the same tokens, each in its own process,
one after another: TaDA's probe statistics (probe/calibration.py, every
adapter), RegMean's Grams with each model's own inputs (``grams: model``),
with the base's (``grams: base``) and RegMean++'s (``grams: merged``: each
model's blocks on the merged states, one more forward per block). Prints the
pass seconds (printed by the child: the pass alone), wall time and peak
anonymous memory of each process, and the ratios to the probe pass and to
``grams: model``. ``--against DIR`` (a checkout of another commit, e.g. ``git
worktree add DIR COMMIT``): each pass of that tree runs right before this
one's, and the table gives their ratio (side by side in one run).
``--passes``: only these (``model`` is always run: the ratios are to it).
``--threads N``: every pass's process on N torch threads (OMP_NUM_THREADS),
so N chunks in flight; 1: one chunk after another, as on one core.

``limited``: a model larger than the memory it is allowed. bench/generate.py's
``medium`` Llama (2.9 GB bf16) and two rank-16 LoRAs; ``mergekit-yaml`` with
``lora_regmean`` in a cgroup whose hard limit is ``fraction`` of the model's
size (``--grams merged``: RegMean++); prints rc, wall time and the cgroup's
peak.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "real"))


def _measure():
    """bench/run.py's measure (bench/real has a run.py of its own)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench/run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.measure


def _inputs(seed: int, samples: int):
    """The base, the five adapters and each task's prompts as batches."""
    from data import MULTITASK, TASKS, prompt

    from mergekit_tada.adapters import LoraAdapter
    from mergekit_tada.batches import make_batches, tokenizer_for

    work = ROOT / "bench/work/real"
    base = str(work / "base")
    root = work / f"full/multitask/seed{seed}"
    adapters = {t: LoraAdapter(str(root / f"lora-{t}")) for t in MULTITASK}
    tokenizer = tokenizer_for(base)
    batches = {}
    for t in MULTITASK:
        rows = [json.loads(x) for x in (work / f"data/{t}.jsonl").open()]
        texts = [prompt(TASKS[t], r["text"]) for r in rows if r["split"] == "train"]
        batches[t] = make_batches(tokenizer, texts[:samples], 256, 8)
    return base, adapters, batches


def phase(name: str, seed: int, samples: int) -> None:
    """One pass, in this process; prints its seconds as JSON."""
    import torch

    from mergekit_tada.probe.calibration import run_calibration
    from mergekit_tada.probe.grams import gram_pass

    base, adapters, batches = _inputs(seed, samples)
    start = time.perf_counter()
    if name == "probe":
        every = [b for bs in batches.values() for b in bs]
        run_calibration(base, every, adapters, quiet=True)
    else:
        weights = None
        if name == "merged":
            weights = {(t, m): 1.0 for t, a in adapters.items() for m in a.modules}
        gram_pass(
            base,
            batches,
            adapters,
            0.9,
            name != "base",
            merged_weights=weights,
            quiet=True,
        )
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {"phase": name, "seconds": seconds, "threads": torch.get_num_threads()}
        )
    )


def _run_phase(
    tree: Path, name: str, seed: int, samples: int, threads: int | None = None
) -> dict | None:
    """One pass in its own process, with ``tree``'s package and bench script
    (None where that tree's bench has no such pass)."""
    import os

    script = tree / "bench/regmean_pass.py"
    if f'"{name}"' not in script.read_text():
        return None
    cmd = [sys.executable, str(script), "phase", name, "--seed", str(seed)]
    os.environ["PYTHONPATH"] = str(tree)  # its mergekit_tada, not the installed one
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    result = _measure()([*cmd, "--samples", str(samples)], ROOT)
    if result["rc"] != 0:
        raise SystemExit(f"{name} ({tree}) failed:\n{result['tail']}")
    line = [x for x in result["tail"].splitlines() if x.startswith("{")][-1]
    return {**json.loads(line), **result}


def real(
    seed: int,
    samples: int,
    against: Path | None,
    passes: list[str],
    threads: int | None,
) -> None:
    """Each pass of this tree; with ``against`` (a checkout of another
    commit) each pass of that tree right before this one's, side by side."""
    rows, before = {}, {}
    for name in ("probe", "model", "base", "merged"):
        if name != "model" and name not in passes:
            continue
        if against is not None:
            before[name] = _run_phase(against, name, seed, samples, threads)
        rows[name] = _run_phase(ROOT, name, seed, samples, threads)
    probe = rows["probe"]["seconds"] if "probe" in rows else float("nan")
    model = rows["model"]["seconds"]
    print(
        f"SmolLM2-135M, 5 adapters, {samples} prompts per task, seed {seed}, "
        f"torch threads {rows['model']['threads']}"
    )
    print(
        "| pass | pass s | ratio to probe | ratio to model | process wall s "
        "| peak anon GB | against s | against peak GB | now / against |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        old = before.get(name)
        then = "– | – | –"
        if old:
            ratio = r["seconds"] / old["seconds"]
            then = f"{old['seconds']:.1f} | {old['peak_anon_gb']:.2f} | {ratio:.2f}"
        print(
            f"| {name} | {r['seconds']:.1f} | {r['seconds'] / probe:.2f} | "
            f"{r['seconds'] / model:.2f} | {r['wall']:.1f} | {r['peak_anon_gb']:.2f} "
            f"| {then} |"
        )


def limited(fraction: float, grams: str) -> None:
    import yaml
    from generate import make_base, make_lora

    measure = _measure()
    work = ROOT / "bench/work/regmean-limited"
    work.mkdir(parents=True, exist_ok=True)
    base = make_base(work / "base", "medium")
    for name, seed in (("lora-a", 1), ("lora-b", 2)):
        make_lora(base, work / name, "medium", seed)
    for name, word in (("a", "apple"), ("b", "river")):
        lines = [
            f"{word} {i} " + " ".join(str(i * j) for j in range(12)) for i in range(8)
        ]
        (work / f"prompts-{name}.txt").write_text("\n".join(lines) + "\n")
    config = {
        "merge_method": "lora_regmean",
        "base_model": "./base",
        "models": [
            {"model": "./base+./lora-a", "parameters": {"data": "prompts-a.txt"}},
            {"model": "./base+./lora-b", "parameters": {"data": "prompts-b.txt"}},
        ],
        "parameters": {
            "rank": 16,
            "cache_dir": "./cache",
            "max_length": 32,
            "grams": grams,
        },
        "dtype": "bfloat16",
    }
    (work / "regmean.yml").write_text(yaml.safe_dump(config))
    size = sum(p.stat().st_size for p in (work / "base").glob("*.safetensors"))
    limit = int(size * fraction)
    cmd = [str(Path(sys.executable).parent / "mergekit-yaml"), "regmean.yml", "out"]
    for stale in ("out", "cache"):  # a cold pass, into a fresh folder
        shutil.rmtree(work / stale, ignore_errors=True)
    result = measure([*cmd, "--out-shard-size", "500M"], work, memory_limit=limit)
    print(
        f"model {size / 1e9:.2f} GB, limit {limit / 1e9:.2f} GB: rc {result['rc']}, "
        f"{result['wall']:.1f} s, cgroup peak {result.get('cgroup_peak_gb', 0):.2f} GB, "
        f"peak anon {result['peak_anon_gb']:.2f} GB"
    )
    if result["rc"] != 0:
        print(result["tail"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["real", "limited", "phase"])
    ap.add_argument("name", nargs="?")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--fraction", type=float, default=0.6)
    ap.add_argument("--grams", default="model", choices=["model", "base", "merged"])
    ap.add_argument("--against", type=Path, help="a checkout of another commit")
    ap.add_argument("--passes", nargs="+", default=["probe", "model", "base", "merged"])
    ap.add_argument("--threads", type=int, help="torch threads of every pass")
    args = ap.parse_args()
    if args.what == "phase":
        phase(args.name, args.seed, args.samples)
    elif args.what == "real":
        real(args.seed, args.samples, args.against, args.passes, args.threads)
    else:
        limited(args.fraction, args.grams)


if __name__ == "__main__":
    main()
