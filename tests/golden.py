"""Output bytes of every method on the toy models: the redesign's fixed point.

``python tests/golden.py`` records tests/golden.json (every output file of
every case: JSON content, tensor sums, other files' sha256) with the code as
it is; ``tests/test_golden.py`` runs the same cases and compares, floats to a
relative 1e-5 (float32 kernels round differently on another CPU: bytes
recorded on one machine did not match on an AMD EPYC), everything else
exactly. Recorded first before the package's files moved (issue 20).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

GOLDEN = Path(__file__).with_name("golden.json")
TEXT_A = [f"the answer to question {i} is then explained" for i in range(24)]
TEXT_B = [f"the protein {i} binding with the receptor in the cell" for i in range(24)]
PAIR = [
    {"model": "./base+./lora-task", "parameters": {"role": "task"}},
    {"model": "./base+./lora-domain", "parameters": {"role": "domain"}},
]
FAMILY = [
    {"model": "./base+./lora-task", "parameters": {"weight": 0.7, "density": 0.6}},
    {"model": "./base+./lora-domain", "parameters": {"weight": 0.5, "density": 0.8}},
]


def _config(method: str, models: list, **parameters) -> dict:
    return {
        "merge_method": method,
        "base_model": "./base",
        "models": models,
        "parameters": {"cache_dir": "cache", **parameters}
        if method in ("tada", "tara")
        else parameters,
        "dtype": "float32",
    }


def _family(method: str, keep: tuple[str, ...] = ("weight",), **parameters) -> dict:
    models = [
        {"model": m["model"], "parameters": {k: m["parameters"][k] for k in keep}}
        for m in FAMILY
    ]
    return _config(method, models, **parameters)


def _tara(variant: str) -> dict:
    models = [
        {"model": "./base+./lora-task", "parameters": {"data": "a.txt"}},
        {"model": "./base+./lora-domain", "parameters": {"data": "b.txt"}},
    ]
    return _config(
        "tara", models, variant=variant, steps=6, batch_size=8, lr=0.05, rank=6
    )


# name -> (config, how it runs: full | adapter-only | fastpath | compose)
CASES: dict[str, tuple[dict, str]] = {
    "tada_fixed": (
        _config(
            "tada", PAIR, rank=8, gates="fixed", task_weight=0.8, domain_weight=1.2
        ),
        "full",
    ),
    "tada_probe": (
        _config("tada", PAIR, gates="probe", calibration="b.txt", rank=6),
        "full",
    ),
    "tada_probe_equalise_contrast": (
        _config(
            "tada",
            PAIR,
            gates="probe",
            calibration="b.txt",
            task_calibration="a.txt",
            probe_prompts="contrast",
            probe_balance="equalise",
            rank=6,
        ),
        "adapter-only",
    ),
    "tada_probe_fastpath": (
        _config("tada", PAIR, gates="probe", calibration="b.txt", rank=6),
        "fastpath",
    ),
    "tada_learned": (
        _config(
            "tada",
            PAIR,
            gates="learned",
            calibration="b.txt",
            task_calibration="a.txt",
            learned_steps=5,
            learned_lr=0.05,
            gate_granularity="layer",
        ),
        "adapter-only",
    ),
    "task_arithmetic": (_family("lora_task_arithmetic", rank=6), "full"),
    "task_arithmetic_pico": (
        _family("lora_task_arithmetic", pico=True, rank=6),
        "adapter-only",
    ),
    "ties": (_family("lora_ties", ("weight", "density"), rank=6), "adapter-only"),
    "dare_ties": (
        _family("lora_dare_ties", ("weight", "density"), rank=6),
        "adapter-only",
    ),
    "knots_ties_density1": (_family("lora_knots_ties", rank=6), "adapter-only"),
    "tsv_m": (_family("lora_tsv_m", alpha=0.8, rank=6, match_norm="none"), "full"),
    "tsv_m_pico": (_family("lora_tsv_m", pico=True, match_norm="none"), "adapter-only"),
    "tara_a": (_tara("a"), "adapter-only"),
    "tara_b": (_tara("b"), "adapter-only"),
    "compose": ({}, "compose"),
}


def build_inputs(root: Path) -> None:
    """The toy base and adapters of tests/conftest.py, and two text files."""
    from conftest import build_toy

    build_toy(root)
    for adapter in ("lora-task", "lora-domain"):  # no temporary path in the bytes
        path = root / adapter / "adapter_config.json"
        config = json.loads(path.read_text())
        config["base_model_name_or_path"] = "./base"
        config["target_modules"] = sorted(config["target_modules"])  # a set in PEFT
        path.write_text(json.dumps(config, indent=2, sort_keys=True))
    (root / "a.txt").write_text("\n".join(TEXT_A) + "\n")
    (root / "b.txt").write_text("\n".join(TEXT_B) + "\n")


_RUN = """
import json, sys
name, how = sys.argv[1], sys.argv[2]
config = json.loads(sys.argv[3])
if how == "fastpath":
    from mergekit_tada import fastpath
    assert fastpath.try_run(["c.yml", "out", "--adapter-only", "--quiet"])
elif how == "compose":
    from mergekit_tada.retrieval.compose import compose
    from mergekit_tada.retrieval.route import Routing
    routing = Routing(
        weights={"bio": 0.625, "instruct": 0.375},
        distribution={"bio": 0.6, "instruct": 0.36, "other": 0.04},
        queries=[{"text": "q", "neighbours": {"bio": 3, "instruct": 2}}],
        adapters={"bio": "./lora-domain", "instruct": "./lora-task"},
        base_model="./base",
        settings={"top_k": 5, "p": 0.9},
    )
    compose(routing, "out", method="lora_ties", rank=6, quiet=True)
else:
    import mergekit_tada
    mergekit_tada.merge(config, "out", adapter_only=how == "adapter-only", quiet=True)
"""


def fingerprints(root: Path, names: list[str] | None = None) -> dict[str, dict]:
    """Run each case in a fresh process in its own folder; :func:`digest` of
    every output."""
    import yaml

    result = {}
    for name in names or list(CASES):
        config, how = CASES[name]
        run = root / name
        run.mkdir()
        for item in ("base", "lora-task", "lora-domain", "a.txt", "b.txt"):
            (run / item).symlink_to(root / item)
        (run / "c.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        env = dict(os.environ, PYTHONHASHSEED="0", HF_HUB_OFFLINE="1")
        done = subprocess.run(
            [sys.executable, "-c", _RUN, name, how, json.dumps(config)],
            cwd=run,
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{name}: {done.stderr[-3000:]}")
        out = run / "out"
        result[name] = {
            str(p.relative_to(out)): digest(p)
            for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".mergekit-tada.lock"
        }
    return result


# What the installed transformers and PEFT stamp into files (their versions,
# and so the hashes of the input adapters' configs in our reports): left out,
# so that a patch release of either does not read as a change of ours.
VOLATILE = ("transformers_version", "peft_version", "files_sha256")
RELATIVE = 1e-5  # float32 kernels round differently on other CPUs (AMD vs Intel)


def digest(path: Path):
    """What a file is compared by: a JSON file's content without VOLATILE keys;
    a safetensors file's per-tensor sums (sum |x|, sum x^2, sum |x| i % 7:
    positive terms, so float noise stays relative); a PNG's presence (its
    pixels follow the report's numbers); any other file's sha256."""
    if path.suffix == ".json":

        def strip(node):
            if isinstance(node, dict):
                return {k: strip(v) for k, v in node.items() if k not in VOLATILE}
            if isinstance(node, list):
                return [strip(v) for v in node]
            return node

        return strip(json.loads(path.read_text()))
    if path.suffix == ".safetensors":
        import torch
        from safetensors.torch import load_file

        sums = {}
        for name, t in sorted(load_file(path).items()):
            x = t.double().flatten()
            ramp = torch.arange(x.numel(), dtype=torch.float64) % 7 + 1
            sums[name] = [
                list(t.shape),
                float(x.abs().sum()),
                float(x.square().sum()),
                float((x.abs() * ramp).sum()),
            ]
        return sums
    if path.suffix == ".png":
        return "png"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same(a, b, where: str = "") -> list[str]:
    """Where ``a`` and ``b`` differ: floats beyond RELATIVE, anything else at all."""
    if isinstance(a, float) and isinstance(b, float):
        close = abs(a - b) <= RELATIVE * max(abs(a), abs(b)) + 1e-12
        return [] if close else [f"{where}: {a} != {b}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in same(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in same(x, y, f"{where}[{i}]")
        ]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        build_inputs(Path(tmp))
        prints = fingerprints(Path(tmp))
    GOLDEN.write_text(json.dumps(prints, indent=1, sort_keys=True) + "\n")
    print(f"{sum(map(len, prints.values()))} files in {len(prints)} cases -> {GOLDEN}")
