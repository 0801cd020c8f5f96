"""A fault sweep: odd and wrong parameter values, tried as a user would.

    python bench/fault_sweep.py [--work bench/work/sweep]

Every case runs an adapter-only merge on the toy models (tests' tiny Llama
and three LoRAs of mixed ranks) with one parameter set to an odd or wrong
value, and is classed as: ``error`` (a one-line ``TadaError`` naming the key;
nothing written), ``ran`` (an adapter whose every factor is finite, inputs
unchanged), or ``BAD`` (a traceback, a multi-line error, output written
beside an error, a non-finite adapter, or an input changed). Prints one line
per case and the counts. The issue-38 round covered RegMean, WUDI, Iso-C/CTS,
CtM, core space and match_norm; this sweep covers the other parameters.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

NAN, INF = float("nan"), float("inf")
# (method, shared parameters, per-input parameters for every input)
CASES: list[tuple[str, dict, dict]] = []
for method in ("lora_ties", "lora_dare_ties", "lora_della", "lora_breadcrumbs"):
    for density in (0.0, -0.5, 1.5, NAN, "half", True):
        CASES.append((method, {}, {"density": density}))
    for weight in (0.0, -1.0, INF, 1e30, "x"):
        CASES.append((method, {}, {"weight": weight, "density": 0.5}))
    for key, value in (("normalize", "yes"), ("rescale", 3), ("int8_mask", 1.5)):
        CASES.append((method, {key: value}, {"density": 0.5}))
CASES += [
    ("lora_breadcrumbs", {}, {"density": 0.5, "gamma": g}) for g in (-0.1, 1.5, NAN)
]
CASES += [("lora_della", {}, {"density": 0.5, "epsilon": e}) for e in (-0.1, 2.0, NAN)]
CASES += [("lora_task_arithmetic", {"lossless": v}, {}) for v in ("true", 2, None)]
CASES += [("lora_task_arithmetic", {"rank": r}, {}) for r in (0, -3, 1.5, 10**6, "8")]
CASES += [("lora_task_arithmetic", {"adapter_out": a}, {}) for a in ("", "a/b", 5)]
CASES += [("lora_knots_ties", {}, {"density": d}) for d in (0.0, 1.0, 2.0)]
CASES += [("lora_magnitude_prune", {}, {"density": d}) for d in (0.0, 1e-9, 1.0)]
CASES += [("lora_tsv_m", {"alpha": a}, {}) for a in (0.0, 1e-30, 1e30, NAN)]
CASES += [
    ("lora_ctm", {"rank": 4, key: value}, {})
    for key, value in (
        ("tol", 0.0),
        ("tol", -1.0),
        ("max_iter", 0),
        ("max_iter", 10**12),
        ("beta", 1.5),
        ("rule", "dare"),
    )
]
CASES += [
    ("lora_iso_cts", {"common_space_fraction": f}, {}) for f in (0.0, 1e-9, 1.0, 1.2)
]
CASES += [("lora_wudi", {"ridge": r}, {}) for r in (-1.0, 0.0, 1e30, NAN)]
CASES += [
    ("tada", {key: value}, {})
    for key, value in (
        ("tau", 0.0),
        ("tau", -1.0),
        ("gate_min", 0.9),
        ("gate_min", -0.1),
        ("gate_max", 1.5),
        ("scale", 0.0),
        ("scale", -2.0),
        ("conflict_threshold", -1.0),
        ("conflict_threshold", 5.0),
        ("gates", "magic"),
        ("gate_granularity", "global"),
        ("task_weight", 2.0),
        ("domain_weight", -1.0),
        ("calibration_samples", 0),
        ("gate_normalization", "min"),
        ("probe_statistic", "mean"),
    )
]
CASES += [
    ("lora_task_arithmetic", {"lambda": v}, {}) for v in (0.0, -2.0, "auto", "best")
]


def config(method: str, shared: dict, per_input: dict) -> dict:
    from family import INPUTS

    if method == "tada":
        models = [
            {"model": "./base+./lora-task", "parameters": {"role": "task"}},
            {"model": "./base+./lora-domain", "parameters": {"role": "domain"}},
        ]
        return {
            "merge_method": "tada",
            "base_model": "./base",
            "models": models,
            "parameters": {"rank": 6, "gates": "fixed", **shared},
            "dtype": "float32",
        }
    return {
        "merge_method": method,
        "base_model": "./base",
        "models": [
            {"model": f"./base+./{n}", "parameters": dict(per_input)} for n in INPUTS
        ],
        "parameters": {"rank": shared.pop("rank", 6), **shared},
        "dtype": "float32",
    }


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def run_case(i: int, method: str, shared: dict, per_input: dict) -> tuple[str, str]:
    import torch
    from safetensors.torch import load_file

    import mergekit_tada
    from mergekit_tada.errors import TadaError

    out = Path(f"out{i}")
    try:
        mergekit_tada.merge(
            config(method, dict(shared), per_input), out, adapter_only=True, quiet=True
        )
    except TadaError as error:
        text = str(error)
        if "\n" in text or (out / "adapter").exists():
            return "BAD", f"multi-line or outputs left: {text[:120]}"
        return "error", text[:140]
    except Exception:
        return "BAD", traceback.format_exc().strip().splitlines()[-1][:140]
    tensors = load_file(out / "adapter/adapter_model.safetensors")
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        return "BAD", "non-finite adapter"
    return "ran", f"{len(tensors)} tensors, finite"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="bench/work/sweep")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from conftest import build_toy

    from mergekit_tada.toy import build_lora

    build_toy(work)
    build_lora(
        work / "base",
        work / "lora-third",
        r=5,
        alpha=10,
        seed=3,
        targets=("q_proj", "v_proj", "o_proj", "gate_proj"),
    )
    os.chdir(work)
    inputs = {
        n: digest(work / n) for n in ("base", "lora-task", "lora-domain", "lora-third")
    }
    counts: dict[str, int] = {}
    for i, (method, shared, per_input) in enumerate(CASES):
        kind, what = run_case(i, method, shared, per_input)
        changed = [n for n, d in inputs.items() if digest(work / n) != d]
        if changed:
            kind, what = "BAD", f"inputs changed: {changed}"
        counts[kind] = counts.get(kind, 0) + 1
        print(f"{kind:5} {method} {shared} {per_input}: {what}", flush=True)
    print(
        f"{len(CASES)} cases: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    )


if __name__ == "__main__":
    main()
