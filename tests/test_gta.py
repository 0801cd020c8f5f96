"""mergekit's rules on LoRA updates (methods/gta.py) and magnitude prune: against
the papers' steps (tests/oracles.py), mergekit's kernels and stock methods, PEFT."""

import json
from pathlib import Path

import oracles
import pytest
import torch
from conftest import (
    adapter_delta,
    load_weights,
    rel_err,
)
from family import (
    DENSITIES,
    INPUTS,
    WEIGHTS,
    best_rank,
    family_config,
    mergekit_kernel,
    run,
    stacked,
)

from mergekit_tada.methods.dense import module_seed


def test_lora_ties_equals_stock_mergekit_ties_over_base_plus_lora(three, tmp_path):
    stock = {
        "merge_method": "ties",
        "base_model": "./base",
        "models": [
            {"model": f"./base+./{n}", "parameters": {"weight": w, "density": d}}
            for n, w, d in zip(INPUTS, WEIGHTS, DENSITIES, strict=True)
        ],
        "dtype": "float32",
    }
    stock_out = run(stock, "stock", lora_merge_cache=str(tmp_path / "lora-cache"))
    ours = run(family_config("lora_ties", rank=64))
    base, dense = load_weights("base"), load_weights(stock_out)
    deltas = adapter_delta(ours / "adapter")
    assert len(deltas) == 21
    for name, delta in deltas.items():
        assert rel_err(delta, dense[name] - base[name]) < 1e-4, name
    # and with rank 3, its best rank-3 approximation
    low = adapter_delta(run(family_config("lora_ties", rank=3), "low") / "adapter")
    for name, delta in low.items():
        assert rel_err(delta, best_rank(dense[name] - base[name], 3)) < 1e-4, name


def test_lora_dare_ties_is_mergekit_dare_seeded_per_module(three):
    out = run(family_config("lora_dare_ties", rank=64), random_seed=7)
    for name, delta in adapter_delta(out / "adapter").items():
        seed = module_seed(7, name.removesuffix(".weight"))
        expected = mergekit_kernel(
            "dare_ties",
            stacked(three, name),
            WEIGHTS,
            DENSITIES,
            seed=seed,
            normalize=False,
            rescale=True,
            int8_mask=False,
            **{"lambda": 1.0},
        )
        assert rel_err(delta, expected) < 1e-5, name
    again = run(family_config("lora_dare_ties", rank=64), "again", random_seed=7)
    other = run(family_config("lora_dare_ties", rank=64), "other", random_seed=8)
    a = (out / "adapter/adapter_model.safetensors").read_bytes()
    assert (again / "adapter/adapter_model.safetensors").read_bytes() == a
    assert (other / "adapter/adapter_model.safetensors").read_bytes() != a


def test_lora_ties_and_dare_ties_equal_the_papers_steps(three):
    """TIES (trim, sum election, disjoint mean) and DARE-TIES (seeded masks,
    L1-preserving rescale, sum election, no normalisation) in dense float64
    from tests/oracles.py, on the inputs' exact updates."""
    exact = {n: adapter_delta(n) for n in INPUTS}
    ties_out = adapter_delta(run(family_config("lora_ties", rank=64)) / "adapter")
    dare_out = adapter_delta(
        run(family_config("lora_dare_ties", rank=64), "dare", random_seed=11)
        / "adapter"
    )
    zero = {name: torch.zeros_like(d) for n in INPUTS for name, d in exact[n].items()}
    for name in ties_out:
        deltas = [exact[n].get(name, zero[name]) for n in INPUTS]
        expected = oracles.ties(deltas, WEIGHTS, DENSITIES)
        assert rel_err(ties_out[name], expected) < 1e-5, name
        masks = oracles.dare_masks(deltas, DENSITIES, module_seed(11, name[:-7]))
        dropped = [
            oracles.l1_rescaled(d.double(), m)
            for d, m in zip(deltas, masks, strict=True)
        ]
        expected = oracles.ties(dropped, WEIGHTS, [1.0] * 3, normalize=False)
        assert rel_err(dare_out[name], expected) < 1e-4, name


# mergekit's rules beyond TIES/DARE-TIES: (ours, kernel, mergekit's defaults, extra)
GTA_RULES = [
    ("lora_dare_linear", "dare_linear", False, True, {}),
    ("lora_breadcrumbs", "breadcrumbs", False, False, {"gamma": (0.05, 0.02, 0.1)}),
    (
        "lora_breadcrumbs_ties",
        "breadcrumbs_ties",
        False,
        False,
        {"gamma": (0.05, 0.0, 0.1)},
    ),
    ("lora_della", "della", True, True, {"epsilon": (0.2, 0.1, 0.15)}),
    ("lora_della_linear", "della_linear", False, True, {"epsilon": (0.1, 0.2, 0.3)}),
]


@pytest.mark.parametrize("method,kernel,normalize,rescale,extra", GTA_RULES)
def test_gta_rules_are_mergekits_kernels_seeded_per_module(
    three, method, kernel, normalize, rescale, extra
):
    """Each is mergekit's own kernel on the module's dense update, with mergekit's
    defaults (normalize, rescale), per-input gamma/epsilon, and masks seeded
    per module from --random-seed."""
    config = family_config(method, rank=64)
    for key, values in extra.items():
        for m, v in zip(config["models"], values, strict=True):
            m["parameters"][key] = v
    out = run(config, random_seed=5)
    report = json.loads((out / "merge_report.json").read_text())
    for name, delta in adapter_delta(out / "adapter").items():
        expected = mergekit_kernel(
            kernel,
            stacked(three, name),
            WEIGHTS,
            DENSITIES,
            seed=module_seed(5, name.removesuffix(".weight")),
            normalize=normalize,
            rescale=rescale,
            int8_mask=False,
            per_input={k: list(v) for k, v in extra.items()},
            **{"lambda": 1.0},
        )
        assert rel_err(delta, expected) < 1e-5, name
        record = report["modules"][name.removesuffix(".weight")]
        for key, values in extra.items():
            assert record[f"{key}s"] == list(values)


def test_lora_breadcrumbs_equals_stock_mergekit_over_base_plus_lora(three, tmp_path):
    """Deterministic rules also equal mergekit's own method over base+lora inputs."""
    stock = {
        "merge_method": "breadcrumbs_ties",
        "base_model": "./base",
        "models": [
            {
                "model": f"./base+./{n}",
                "parameters": {"weight": w, "density": d, "gamma": 0.05},
            }
            for n, w, d in zip(INPUTS, WEIGHTS, DENSITIES, strict=True)
        ],
        "dtype": "float32",
    }
    stock_out = run(stock, "stock", lora_merge_cache=str(tmp_path / "lora-cache"))
    config = family_config("lora_breadcrumbs_ties", rank=64)
    for m in config["models"]:
        m["parameters"]["gamma"] = 0.05
    ours = adapter_delta(run(config) / "adapter")
    base, dense = load_weights("base"), load_weights(stock_out)
    assert len(ours) == 21
    for name, delta in ours.items():
        assert rel_err(delta, dense[name] - base[name]) < 1e-4, name


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_lora_magnitude_prune_is_peft_magnitude_prune_on_dense_updates(three, density):
    from peft.utils.merge_utils import magnitude_prune

    config = family_config("lora_magnitude_prune", rank=64)
    for m in config["models"]:
        m["parameters"]["density"] = density
    out = run(config)
    for name, delta in adapter_delta(out / "adapter").items():
        expected = magnitude_prune(
            [d.float() for d in stacked(three, name)], torch.tensor(WEIGHTS), density
        )
        assert rel_err(delta, expected) < 1e-5, name


@pytest.mark.parametrize(
    "method,key,value,message",
    [
        (
            "lora_dare_linear",
            "density",
            1.5,
            r"lora_dare_linear: density must be in \(0, 1\] \(got 1.5\)",
        ),
        (
            "lora_magnitude_prune",
            "density",
            0.0,
            r"density must be in \(0, 1\] \(got 0.0\)",
        ),
        (
            "lora_breadcrumbs",
            "gamma",
            1.0,
            r"lora_breadcrumbs: gamma must be in \[0, 1\) \(got 1.0\)",
        ),
        (
            "lora_breadcrumbs_ties",
            "gamma",
            -0.1,
            r"gamma must be in \[0, 1\) \(got -0.1\)",
        ),
        (
            "lora_della",
            "epsilon",
            0.6,
            r"lora_della: epsilon must keep density - epsilon and density \+ epsilon in \(0, 1\) \(got density 0.5, epsilon 0.6\)",
        ),
        (
            "lora_della_linear",
            "epsilon",
            float("nan"),
            r"lora_della_linear: epsilon must be a finite number \(got nan\)",
        ),
        (
            "lora_dare_linear",
            "weight",
            float("inf"),
            r"weight must be a finite number \(got inf\)",
        ),
    ],
)
def test_fusion_rules_refuse_bad_values_in_one_line(three, method, key, value, message):
    from mergekit_tada.errors import TadaError

    config = family_config(method)
    config["models"][0]["parameters"][key] = value
    with pytest.raises(TadaError, match=message):
        run(config)
    assert not Path("out").exists()


def test_dare_masks_do_not_race_across_worker_threads(three):
    """Adapter-only merges run modules on threads; DARE's seeded RNG must not be shared."""
    from mergekit.options import MergeOptions

    from mergekit_tada.api import load_config
    from mergekit_tada.integration import mergekit_planner
    from mergekit_tada.run.execute import Execution
    from mergekit_tada.run.plan import MergePlan
    from mergekit_tada.run.prepare import prepare

    reference = run(family_config("lora_dare_ties", rank=64), random_seed=7)
    expected = (reference / "adapter/adapter_model.safetensors").read_bytes()
    config, _ = load_config(family_config("lora_dare_ties", rank=64))
    for attempt in range(4):
        out = f"threads-{attempt}"
        options = MergeOptions(quiet=True, random_seed=7)
        plan = MergePlan(config, options, None, mergekit_planner)
        execution = Execution(plan, prepare(plan))
        with execution.writing(Path(out)):
            execution.merge_adapter_only(workers=8)
        assert (
            Path(out) / "adapter/adapter_model.safetensors"
        ).read_bytes() == expected


def test_density_out_of_range(three):
    from mergekit_tada.errors import TadaError

    config = family_config("lora_ties", rank=4)
    config["models"][0]["parameters"]["density"] = 1.5
    with pytest.raises(TadaError, match=r"density must be in \(0, 1\] \(got 1.5\)"):
        run(config)


def test_randomized_svd_is_near_optimal():
    """Large dense modules use a randomized truncated SVD: within 0.5% of optimal."""
    from mergekit_tada.methods.dense import EXACT_SVD_MAX_DIM, dense_svd

    g = torch.Generator().manual_seed(0)
    n = EXACT_SVD_MAX_DIM + 64
    # a TIES-like update: low-rank signal plus a sparse full-rank remainder
    low = torch.randn(n, 24, generator=g) @ torch.randn(24, n - 32, generator=g)
    sparse = torch.randn(n, n - 32, generator=g) * (
        torch.rand(n, n - 32, generator=g) < 0.05
    )
    M = low + 3 * sparse
    s = dense_svd(M, 16)
    approx = (s.U[:, :16] * s.S[:16]) @ s.V[:, :16].T
    exact = best_rank(M, 16).float()
    err, best = torch.linalg.norm(M - approx), torch.linalg.norm(M - exact)
    assert float(err / best) < 1.005
