"""Adapter-only merge of a 7B-shaped adapter pair against reading and writing its bytes.

    python bench/adapter_only.py [--repeats N]

Builds (once) bench/work/7b: a sparse Llama-2-7B-shaped base (headers only;
the adapter-only path never reads base data) and two rank-16 LoRAs on all
seven projections. Then, alternating in one process: the I/O floor (read both
adapter files, write and fsync one adapter-sized file) and our merge work
(Execution.merge_adapter_only + writing the adapter; validation and
imports excluded, reported separately). Prints medians and the ratio.
"""

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from generate import make_base, make_lora

    work = ROOT / "bench" / "work" / "7b"
    if not (work / "lora-b" / "adapter_model.safetensors").exists():
        base = make_base(work / "base", "7b", sparse=True)
        make_lora(base, work / "lora-a", "7b", seed=1)
        make_lora(base, work / "lora-b", "7b", seed=2)
    os.chdir(work)
    config = {
        "merge_method": "tada",
        "base_model": "./base",
        "models": [
            {"model": "./base+./lora-a", "parameters": {"role": "task"}},
            {"model": "./base+./lora-b", "parameters": {"role": "domain"}},
        ],
        "parameters": {"rank": 16, "gates": "uniform"},
        "dtype": "bfloat16",
    }
    Path("tada.yml").write_text(yaml.safe_dump(config))

    t0 = time.perf_counter()
    import mergekit.merge  # noqa: F401
    from mergekit.options import MergeOptions

    from mergekit_tada._hook import ensure_installed
    from mergekit_tada.api import load_config
    from mergekit_tada.integration import mergekit_planner
    from mergekit_tada.run.execute import Execution
    from mergekit_tada.run.plan import MergePlan
    from mergekit_tada.run.prepare import prepare

    ensure_installed()
    imported = time.perf_counter() - t0
    cfg, _ = load_config("tada.yml")
    t0 = time.perf_counter()
    plan = MergePlan(cfg, MergeOptions(quiet=True), None, mergekit_planner)
    prepared_run = prepare(plan)
    prepared = time.perf_counter() - t0
    files = [
        Path("lora-a/adapter_model.safetensors"),
        Path("lora-b/adapter_model.safetensors"),
    ]
    out_bytes = None
    floor, work = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        data = [f.read_bytes() for f in files]
        size = out_bytes or len(data[0])
        with open("io-floor.bin", "wb") as fh:
            fh.write(data[0][:size])
            fh.flush()
            os.fsync(fh.fileno())
        floor.append(time.perf_counter() - t0)
        del data
        execution = Execution(plan, prepared_run)
        shutil.rmtree("out", ignore_errors=True)
        t0 = time.perf_counter()
        with execution.writing(Path("out")):
            execution.merge_adapter_only()
        work.append(time.perf_counter() - t0)
        out_bytes = Path("out/adapter/adapter_model.safetensors").stat().st_size
    os.remove("io-floor.bin")
    f, w = statistics.median(floor), statistics.median(work)
    print(
        f"imports {imported:.1f} s, validation (hashes, finiteness, planning) {prepared:.1f} s"
    )
    print(
        f"read 2 adapters + write 1 (I/O floor): {f:.2f} s; merge work incl. writing: "
        f"{w:.2f} s; ratio {w / f:.2f} (median of {args.repeats}, "
        f"{os.cpu_count()} cores, {len(execution.records)} modules)"
    )


if __name__ == "__main__":
    main()
