"""The multi-adapter methods' shared test inputs: three toy LoRAs of mixed
ranks (the ``three`` fixture in conftest.py), their config, and mergekit's
own kernels as an oracle for its rules."""

from pathlib import Path

import torch

import mergekit_tada
from mergekit_tada.methods import registry

INPUTS = ("lora-task", "lora-domain", "lora-third")

WEIGHTS = (1.0, 0.6, 0.8)

DENSITIES = (0.5, 0.7, 0.4)


def family_config(method, rank=None, **params):
    models = [
        {"model": f"./base+./{name}", "parameters": {"weight": w, "density": d}}
        for name, w, d in zip(INPUTS, WEIGHTS, DENSITIES, strict=True)
    ]
    if "density" not in {p.name for p in registry.get(method).spec.input_parameters}:
        for m in models:
            del m["parameters"]["density"]
    parameters = dict(params)
    if rank is not None:
        parameters["rank"] = rank
    return {
        "merge_method": method,
        "base_model": "./base",
        "models": models,
        "parameters": parameters,
        "dtype": "float32",
    }


def run(config, out="out", **kw) -> Path:
    return Path(mergekit_tada.merge(config, out, quiet=True, **kw))


def stacked(deltas, name):
    zero = torch.zeros_like(next(d[name] for d in deltas.values() if name in d))
    return [deltas[n].get(name, zero) for n in INPUTS]


def best_rank(M, r):
    u, s, vh = torch.linalg.svd(M.double(), full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def mergekit_kernel(kernel, deltas, weights, densities, seed=0, **shared):
    """mergekit's own kernel on dense deltas with a zero base (the oracle for GTA rules)."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    base = torch.zeros_like(deltas[0])
    group = TensorGroup.from_tensors(
        [base, *deltas], ids=["b", 0, 1, 2][: len(deltas) + 1], base_index=0
    )
    per_input = shared.pop("per_input", {})
    params = {
        "weight": dict(enumerate(weights)),
        "density": dict(enumerate(densities)),
        **{k: dict(enumerate(v)) for k, v in per_input.items()},
        **shared,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return registry.get(kernel)([group], parameters=params)[0]
