"""The LoRA-space family against dense oracles computed independently in the test."""

import json
from pathlib import Path

import oracles
import pytest
import torch
from conftest import (
    adapter_delta,
    assert_adapter_matches_model,
    load_weights,
    peft_delta,
    rel_err,
)

import mergekit_tada
from mergekit_tada.methods.dense import module_seed
from mergekit_tada.toy import build_lora

INPUTS = ("lora-task", "lora-domain", "lora-third")
WEIGHTS = (1.0, 0.6, 0.8)
DENSITIES = (0.5, 0.7, 0.4)


@pytest.fixture()
def three(work):
    build_lora(
        "base",
        "lora-third",
        r=5,
        alpha=5,
        seed=9,
        targets=("q_proj", "o_proj", "up_proj"),
    )
    return {name: peft_delta("base", name) for name in INPUTS}


def family_config(method, rank=None, **params):
    models = [
        {"model": f"./base+./{name}", "parameters": {"weight": w, "density": d}}
        for name, w, d in zip(INPUTS, WEIGHTS, DENSITIES, strict=True)
    ]
    if method in ("lora_task_arithmetic", "lora_tsv_m"):
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


def test_task_arithmetic_lossless_and_truncated(three):
    out = run(family_config("lora_task_arithmetic", lossless=True))
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    rank = {
        "q_proj": 15,
        "k_proj": 4,
        "v_proj": 10,
        "o_proj": 9,
        "gate_proj": 4,
        "up_proj": 15,
        "down_proj": 10,
    }  # sums of the inputs' ranks
    for layer in range(3):
        for proj, r in rank.items():
            group = "self_attn" if proj[0] in "qkvo" else "mlp"
            module = f"model.layers.{layer}.{group}.{proj}"
            assert cfg["rank_pattern"].get(module, cfg["r"]) == r, module
            assert cfg["alpha_pattern"].get(module, cfg["lora_alpha"]) == r, module
    assert_adapter_matches_model(out)  # PEFT honours the written rank_pattern
    ours = adapter_delta(out / "adapter")
    assert set(ours) == set(three["lora-task"])
    for name, delta in ours.items():
        expected = sum(
            w * d for w, d in zip(WEIGHTS, stacked(three, name), strict=True)
        )
        assert rel_err(delta, expected) < 1e-5, name
    out = run(family_config("lora_task_arithmetic", rank=3), "out3")
    for name, delta in adapter_delta(out / "adapter").items():
        expected = sum(
            w * d for w, d in zip(WEIGHTS, stacked(three, name), strict=True)
        )
        assert rel_err(delta, best_rank(expected, 3)) < 1e-5, name


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


@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
@pytest.mark.parametrize("inputs", [INPUTS[:2], INPUTS])
def test_lora_knots_ties(three, density, inputs):
    """KnOTS-TIES equals the paper's steps in dense float64 (tests/oracles.py):
    TIES on the S-scaled coefficient blocks of the shared SVD, mixed ranks."""
    config = family_config("lora_knots_ties", rank=64)
    config["models"] = [
        m for m in config["models"] if m["model"].split("/")[-1] in inputs
    ]
    for m in config["models"]:
        m["parameters"]["density"] = density
    out = run(config)
    written = adapter_delta(out / "adapter")
    # s B A in float64 from the inputs' files: W' - W in float32 would add
    # rounding noise that the trim sees as extra directions
    exact = {n: adapter_delta(n) for n in inputs}
    for name in set().union(*exact.values()):
        present = [
            (exact[n][name], w)
            for n, w in zip(INPUTS, WEIGHTS, strict=False)
            if n in inputs and name in exact[n]
        ]
        expected = oracles.knots_ties(
            [d for d, _ in present], [w for _, w in present], [density] * len(present)
        )
        assert rel_err(written[name], expected) < 1e-5, name


def test_lora_tsv_m(three):
    out = run(family_config("lora_tsv_m", rank=64, alpha=0.9))
    for name, delta in adapter_delta(out / "adapter").items():
        present = [
            (d, w)
            for d, w, n in zip(stacked(three, name), WEIGHTS, INPUTS, strict=True)
            if name in three[n]
        ]
        per = min(present[0][0].shape) // len(present)
        us, ss, vs = [], [], []
        for d, w in present:
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
            k = min(per, int((s > s[0] * 1e-6).sum()))
            us.append(u[:, :k])
            ss.append(s[:k] * w)
            vs.append(vh[:k].T)

        def polar(x):
            p, _, qh = torch.linalg.svd(x, full_matrices=False)
            return p @ qh

        expected = (
            0.9
            * polar(torch.cat(us, 1))
            @ torch.diag(torch.cat(ss))
            @ polar(torch.cat(vs, 1)).T
        )
        assert rel_err(delta, expected) < 1e-5, name


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


@pytest.mark.parametrize(
    "method",
    [
        "lora_task_arithmetic",
        "lora_ties",
        "lora_dare_ties",
        "lora_knots_ties",
        "lora_tsv_m",
    ],
)
def test_merged_model_agrees_with_adapter(three, method):
    out = run(family_config(method, rank=6, pico=method == "lora_tsv_m"), random_seed=3)
    assert_adapter_matches_model(out)
    assert not (out / "tada_report.json").exists()
    report = json.loads((out / "merge_report.json").read_text())
    assert report["settings"]["merge_method"] == method
    assert len(report["modules"]) == 21
    # the report and the card speak of this method, not of TaDA's gates
    assert "dropped_task" not in report["summary"]
    card = (out / "README.md").read_text()
    section = card[card.index("## mergekit-tada") :]
    assert f"`{method}`" in section and "merge_report.json" in section
    for word in ("gate", "probe", "conflicting"):
        assert word not in section, word
    assert "weights per input (config order): [" in section


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
