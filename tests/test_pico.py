"""Pico's B-space calibration before task arithmetic and TaDA."""

import json

import pytest
import torch
from conftest import (
    adapter_delta,
    rel_err,
)
from family import (
    INPUTS,
    family_config,
    run,
)


def pico_oracle(deltas_and_factors):
    """Dense Pico + task arithmetic (weights 1): calibrate B, merge, restore norm."""
    Bs = [B for B, _ in deltas_and_factors]
    U, S, _ = torch.linalg.svd(torch.cat(Bs, 1), full_matrices=False)
    share = S**2 / (S**2).sum()
    alpha = 1 / (1 + (len(Bs) - 1) * share)
    merged = sum(
        (B + U @ torch.diag(alpha - 1) @ U.T @ B) @ A for B, A in deltas_and_factors
    )
    target = sum(torch.linalg.norm(B @ A) for B, A in deltas_and_factors) / len(Bs)
    return merged * (target / torch.linalg.norm(merged)), target


def scaled_factors(adapter, module):
    from mergekit_tada.adapters import LoraAdapter

    f = LoraAdapter(adapter).factors(module)
    return f.B.double(), f.A.double()


def test_pico_with_task_arithmetic(three):
    config = family_config("lora_task_arithmetic", lossless=True, pico=True)
    for m in config["models"]:
        m["parameters"]["weight"] = 1.0
    out = run(config)
    report = json.loads((out / "merge_report.json").read_text())
    for name, delta in adapter_delta(out / "adapter").items():
        module = name.removesuffix(".weight")
        factors = [scaled_factors(n, module) for n in INPUTS if name in three[n]]
        expected, target = pico_oracle(factors)
        assert rel_err(delta, expected) < 1e-5, name
        assert float(torch.linalg.norm(delta)) == pytest.approx(float(target), rel=1e-5)
        record = report["modules"][module]
        assert len(record["pico_sharing"]) == sum(f[0].shape[1] for f in factors)
        assert sum(record["pico_sharing"]) == pytest.approx(1.0, abs=1e-4)


def test_pico_in_tada(three):
    from conftest import tada_config

    config = tada_config(pico=True, rank=10, conflict_elimination=False)
    config["parameters"].update(task_weight=1.0, domain_weight=1.0)
    out = run(config)
    for name, delta in adapter_delta(out / "adapter").items():
        module = name.removesuffix(".weight")
        factors = [scaled_factors(n, module) for n in INPUTS[:2] if name in three[n]]
        expected, _ = pico_oracle(factors)
        assert rel_err(delta, expected) < 1e-5, name
