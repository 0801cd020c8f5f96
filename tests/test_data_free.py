"""The data-free rules of 2025-26 (Iso-C/CTS, WUDI, CtM) and core space,
against dense float64 references written from the papers (tests/oracles.py)."""

import json
import shutil
from pathlib import Path

import oracles
import pytest
import torch
from conftest import adapter_delta, rel_err
from family import INPUTS, WEIGHTS, family_config, mergekit_kernel, run, stacked
from safetensors.torch import load_file

from mergekit_tada.errors import TadaError
from mergekit_tada.lowrank import Factored, stack, svd
from mergekit_tada.methods.core_space import core_space


def present(three, name, inputs=INPUTS):
    """(dense update, weight) of the inputs that have module ``name``."""
    return [
        (d, w)
        for d, w, n in zip(stacked(three, name), WEIGHTS, INPUTS, strict=True)
        if n in inputs and name in three[n]
    ]


def factors(adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (s B, A) straight from a PEFT folder (float64)."""
    adapter = Path(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    out = {}
    for key, A in load_file(adapter / "adapter_model.safetensors").items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            B = load_file(adapter / "adapter_model.safetensors")[
                key.replace(".lora_A.", ".lora_B.")
            ]
            out[module + ".weight"] = (B.double() * scale, A.double())
    return out


def test_task_arithmetic_in_core_space_is_task_arithmetic(three):
    """The transform alone: the weighted sum of the projected cores, lifted
    back, is the weighted sum of the updates."""
    for name in three["lora-task"]:
        have = [
            (n, w) for n, w in zip(INPUTS, WEIGHTS, strict=True) if name in three[n]
        ]
        fs = [Factored(*(x.float() for x in factors(n)[name])) for n, _ in have]
        space = core_space(fs)
        merged = space.lift(
            svd(stack([space.project(f) for f in fs], [w for _, w in have]))
        )
        dense = merged.U.double() @ torch.diag(merged.S.double()) @ merged.V.double().T
        expected = sum(three[n][name] * w for n, w in have)
        assert rel_err(dense, expected) < 1e-5, name


@pytest.mark.parametrize("method", ["lora_iso_c", "lora_iso_cts"])
def test_core_space_equals_full_space_for_basis_free_rules(three, method):
    """Rules that do not depend on the basis give the same update in core space."""
    config = family_config(method, rank=15)
    full = adapter_delta(run(config, "full") / "adapter")
    config["parameters"]["space"] = "core"
    core = adapter_delta(run(config, "core") / "adapter")
    for name, delta in full.items():
        assert rel_err(core[name], delta) < 1e-4, name


def test_lora_iso_c(three):
    out = run(family_config("lora_iso_c", rank=15, **{"lambda": 0.7}))
    for name, delta in adapter_delta(out / "adapter").items():
        pairs = present(three, name)
        expected = oracles.iso_c([d for d, _ in pairs], [w for _, w in pairs], 0.7)
        assert rel_err(delta, expected) < 1e-5, name


@pytest.mark.parametrize("fraction", [0.5, 0.8, 1.0])
def test_lora_iso_cts(three, fraction):
    out = run(family_config("lora_iso_cts", rank=15, common_space_fraction=fraction))
    ranks = {"lora-task": 4, "lora-domain": 6, "lora-third": 5}
    for name, delta in adapter_delta(out / "adapter").items():
        pairs = present(three, name)
        stacked_rank = sum(ranks[n] for n in INPUTS if name in three[n])
        expected = oracles.iso_cts(
            [d for d, _ in pairs], [w for _, w in pairs], fraction, stacked_rank
        )
        assert rel_err(delta, expected) < 1e-4, name


@pytest.mark.parametrize("fraction", [0.5, 0.8])
def test_lora_iso_cts_below_the_stacked_rank_is_order_independent(three, fraction):
    """Below sum r a flat spectrum ties every direction: the directions kept are
    chosen before flattening (the strongest), whatever the inputs' order."""
    config = family_config("lora_iso_cts", rank=5, common_space_fraction=fraction)
    forward = adapter_delta(run(config, "forward") / "adapter")
    config["models"].reverse()
    backward = adapter_delta(run(config, "backward") / "adapter")
    ranks = {"lora-task": 4, "lora-domain": 6, "lora-third": 5}
    for name, delta in forward.items():
        assert rel_err(backward[name], delta) < 1e-4, name
        pairs = present(three, name)
        stacked_rank = sum(ranks[n] for n in INPUTS if name in three[n])
        expected = oracles.iso_cts(
            [d for d, _ in pairs],
            [w for _, w in pairs],
            fraction,
            stacked_rank,
            keep=5,
        )
        assert rel_err(delta, expected) < 1e-4, name


@pytest.mark.parametrize(
    "method, key, match_norm",
    [
        ("lora_iso_c", "lambda", "none"),
        ("lora_iso_c", "lambda", "sum"),
        ("lora_iso_cts", "lambda", "none"),
        ("lora_iso_cts", "lambda", "mean"),
        ("lora_ctm", "lambda", None),
        ("lora_wudi", "lambda", "sum"),
        ("lora_wudi", "lambda", "none"),
        ("lora_tsv_m", "alpha", "none"),
        ("lora_tsv_m", "alpha", "sum"),
        ("lora_ties", "lambda", None),
    ],
)
def test_a_negative_global_scale_negates_the_merge(three, method, key, match_norm):
    """The update is linear in the global scale, sign included (a negative one
    used to write NaN, or lose its sign under match_norm)."""
    extra = {} if match_norm is None else {"match_norm": match_norm}
    rank = 4 if method == "lora_ctm" else 15
    plus = adapter_delta(
        run(family_config(method, rank, **extra, **{key: 1.0}), "p") / "adapter"
    )
    minus = adapter_delta(
        run(family_config(method, rank, **extra, **{key: -1.0}), "m") / "adapter"
    )
    for name, delta in minus.items():
        assert torch.isfinite(delta).all(), name
        assert float(plus[name].norm()) > 0, name
        assert rel_err(delta, -plus[name]) < 1e-4, name


def test_lora_wudi(three):
    """The closed form equals the dense pseudo-inverse solution and is the
    minimum of WUDI's loss (below the sum's, and below nearby points)."""
    out = run(family_config("lora_wudi", rank=15, ridge=0.0, match_norm="none"))
    for name, delta in adapter_delta(out / "adapter").items():
        pairs = present(three, name)
        deltas = [d for d, _ in pairs]
        expected = oracles.wudi(deltas, [w for _, w in pairs])
        assert rel_err(delta, expected) < 1e-4, name
    # at unit weights the solution minimises the loss
    config = family_config("lora_wudi", rank=15, ridge=0.0, match_norm="none")
    for m in config["models"]:
        m["parameters"]["weight"] = 1.0
    for name, delta in adapter_delta(run(config, "unit") / "adapter").items():
        deltas = [d for d, _ in present(three, name)]
        if len(deltas) < 2:
            continue  # one input: the update itself, loss 0
        best = oracles.wudi_loss(delta, deltas)
        assert best < oracles.wudi_loss(sum(deltas), deltas), name
        nudge = (
            1e-3
            * delta.norm()
            * torch.randn(
                delta.shape,
                generator=torch.Generator().manual_seed(0),
                dtype=torch.float64,
            )
            / delta.numel() ** 0.5
        )
        assert best <= oracles.wudi_loss(delta + nudge, deltas) * (1 + 1e-9), name


def test_lora_wudi_default_ridge_is_small(three):
    exact = adapter_delta(
        run(family_config("lora_wudi", rank=15, ridge=0.0), "a") / "adapter"
    )
    ridged = adapter_delta(run(family_config("lora_wudi", rank=15), "b") / "adapter")
    for name in exact:
        assert rel_err(ridged[name], exact[name]) < 1e-3, name


def test_lora_wudi_matches_the_sums_norm_by_default(three):
    """lora_wudi's match_norm defaults to sum (the other rules' to none):
    the default merge is the explicit one, byte for byte."""
    default = run(family_config("lora_wudi", rank=15), "default")
    explicit = run(family_config("lora_wudi", rank=15, match_norm="sum"), "sum")
    name = "adapter/adapter_model.safetensors"
    assert (default / name).read_bytes() == (explicit / name).read_bytes()
    plain = run(family_config("lora_wudi", rank=15, match_norm="none"), "none")
    assert (default / name).read_bytes() != (plain / name).read_bytes()


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_lora_ctm_task_arithmetic(three, beta):
    """CtM with task arithmetic: a dense HOOI Tucker-2 of the updates (after
    the beta rescaling), the weighted sum of the cores, rank r out."""
    out = run(family_config("lora_ctm", rank=5, beta=beta))
    written = adapter_delta(out / "adapter")
    for name, delta in written.items():
        pairs = present(three, name)
        deltas = [d for d, _ in pairs]
        norms = [float(d.norm()) for d in deltas]
        mean = sum(norms) / len(norms)
        fitted = [
            d * (n * beta + mean * (1 - beta)) / n
            for d, n in zip(deltas, norms, strict=True)
        ]
        P, Q = oracles.tucker2(fitted, 5)
        expected = P @ sum(w * P.T @ d @ Q for d, w in pairs) @ Q.T
        assert rel_err(delta, expected) < 1e-4, name
        assert torch.linalg.matrix_rank(delta.double(), rtol=1e-6) <= 5


def test_lora_ctm_full_rank_is_task_arithmetic(three):
    """At r = sum r the Tucker-2 keeps everything: CtM + TA = task arithmetic."""
    out = run(family_config("lora_ctm", rank=15))
    for name, delta in adapter_delta(out / "adapter").items():
        expected = sum(d * w for d, w in present(three, name))
        assert rel_err(delta, expected) < 1e-5, name


@pytest.mark.parametrize("rule", ["ties", "tsv_m", "iso_c"])
def test_lora_ctm_rules_run_on_rank_r_cores(three, rule):
    out = run(family_config("lora_ctm", rank=4, rule=rule))
    report = json.loads((out / "merge_report.json").read_text())
    records = report["modules"]
    assert all(r["rule"] == rule and r["tucker_sweeps"] >= 1 for r in records.values())
    for name, delta in adapter_delta(out / "adapter").items():
        assert torch.linalg.matrix_rank(delta.double(), rtol=1e-5) <= 4, name


def test_core_space_ties_against_the_papers_steps(three):
    """TIES in core space: bases from the dense SVDs of the stacked factors,
    mergekit's TIES kernel on the K x K cores, lifted back."""
    config = family_config("lora_ties", rank=15, space="core")
    written = adapter_delta(run(config) / "adapter")
    fac = {n: factors(n) for n in INPUTS}
    from family import DENSITIES

    for name, delta in written.items():
        have = [
            (n, w, d)
            for n, w, d in zip(INPUTS, WEIGHTS, DENSITIES, strict=True)
            if name in fac[n]
        ]
        Bs = [fac[n][name][0] for n, _, _ in have]
        As = [fac[n][name][1] for n, _, _ in have]
        U, V = oracles.core_bases(Bs, As)
        cores = [(U.T @ b @ a @ V).float() for b, a in zip(Bs, As, strict=True)]
        merged = mergekit_kernel(
            "ties",
            cores,
            [w for _, w, _ in have],
            [d for _, _, d in have],
            normalize=True,
            rescale=False,
            int8_mask=False,
            **{"lambda": 1.0},
        )
        expected = U @ merged.double() @ V.T
        assert rel_err(delta, expected) < 1e-4, name


def core_cores(fac, name, inputs):
    """Dense core bases and cores of one module (tests/oracles.py's bases)."""
    Bs = [fac[n][name][0] for n in inputs]
    As = [fac[n][name][1] for n in inputs]
    U, V = oracles.core_bases(Bs, As)
    return U, V, [U.T @ b @ a @ V for b, a in zip(Bs, As, strict=True)]


def test_core_space_tsv_m(three):
    """TSV-M in core space: the rule on the K x K cores, so each task keeps
    K // T directions (K = the stacked rank), lifted back."""
    written = adapter_delta(
        run(family_config("lora_tsv_m", rank=15, space="core", match_norm="none"))
        / "adapter"
    )
    fac = {n: factors(n) for n in INPUTS}
    for name, delta in written.items():
        have = [(n, w) for n, w in zip(INPUTS, WEIGHTS, strict=True) if name in fac[n]]
        U, V, cores = core_cores(fac, name, [n for n, _ in have])
        per = min(cores[0].shape) // len(cores)
        us, ss, vs = [], [], []
        for M, (_, w) in zip(cores, have, strict=True):
            u, s, vh = oracles.nonzero_svd(M)
            us.append(u[:, :per])
            ss.append(s[:per] * w)
            vs.append(vh[:per].T)
        merged = (
            oracles.polar(torch.cat(us, 1))
            @ torch.diag(torch.cat(ss))
            @ oracles.polar(torch.cat(vs, 1)).T
        )
        assert rel_err(delta, U @ merged @ V.T) < 1e-4, name


@pytest.mark.parametrize(
    "method, params, fragment",
    [
        (
            "lora_iso_cts",
            {"common_space_fraction": 0.0},
            "common_space_fraction must be in (0, 1]",
        ),
        (
            "lora_iso_cts",
            {"common_space_fraction": 1.5},
            "common_space_fraction must be in (0, 1]",
        ),
        ("lora_ctm", {"rule": "dare"}, "rule must be one of"),
        ("lora_ctm", {"rank": 0}, "rank must be a positive integer"),
        ("lora_ctm", {"beta": 2.0}, "beta must be in [0, 1]"),
        ("lora_ties", {"space": "kernel"}, "space must be one of full, core"),
        ("lora_wudi", {"ridge": -1.0}, "ridge must be >= 0"),
    ],
)
def test_bad_parameters_name_the_key(three, method, params, fragment):
    config = family_config(method, **params)
    with pytest.raises(TadaError, match=None) as info:
        run(config)
    assert fragment in str(info.value)
    assert not Path("out").exists() or not any(Path("out").iterdir())


def test_lossless_with_a_rank_is_refused(three):
    config = family_config("lora_task_arithmetic", rank=2, lossless=True)
    with pytest.raises(TadaError, match="lossless: true writes rank = the sum"):
        run(config)


@pytest.mark.parametrize(
    "method, params",
    [
        ("lora_tsv_m", {"alpha": 0.0}),
        ("lora_dare_linear", {"per_density": 1e-9}),
        ("lora_task_arithmetic", {"per_weight": 0.0}),
    ],
)
def test_a_zero_merge_says_the_output_is_the_base(three, caplog, method, params):
    per = {
        k.removeprefix("per_"): params.pop(k)
        for k in list(params)
        if k.startswith("per_")
    }
    config = family_config(method, rank=4, **params)
    for m in config["models"]:
        m["parameters"].update(per)
    with caplog.at_level("WARNING"):
        run(config)
    assert "the output is the base model" in caplog.text


@pytest.mark.parametrize("target", ["sum", "mean"])
@pytest.mark.parametrize("method", ["lora_iso_c", "lora_wudi", "lora_tsv_m"])
def test_match_norm_rescales_each_module(three, method, target):
    """match_norm: each module's update has the norm of the weighted sum (or
    the mean of the weighted updates' norms), times the rule's global scale,
    and the direction of the rule's own update."""
    scale = {"lora_tsv_m": {"alpha": 0.5}}.get(method, {"lambda": 0.5})
    config = family_config(method, rank=15, match_norm="none")
    plain = adapter_delta(run(config, "plain") / "adapter")
    config = family_config(method, rank=15, match_norm=target, **scale)
    matched = adapter_delta(run(config, "matched") / "adapter")
    for name, delta in matched.items():
        pairs = present(three, name)
        if target == "sum":
            norm = sum(w * d for d, w in pairs).norm()
        else:
            norm = sum(abs(w) * d.norm() for d, w in pairs) / len(pairs)
        assert abs(float(delta.norm() / (0.5 * norm)) - 1) < 1e-4, name
        direction = plain[name] * (delta.norm() / plain[name].norm())
        assert rel_err(delta, direction) < 1e-4, name


def test_match_norm_is_validated(three):
    with pytest.raises(TadaError, match="match_norm must be one of none, sum, mean"):
        run(family_config("lora_iso_c", match_norm="max"))


@pytest.mark.parametrize(
    "method", ["lora_ctm", "lora_tsv_m", "lora_iso_cts", "lora_wudi"]
)
def test_a_module_no_input_changes_merges_to_zero(three, method):
    """An untrained LoRA module (B = 0) in every input: a zero update, not an
    empty basis (MiniLM's pooler under mean pooling)."""
    from conftest import rewrite_factors

    for name in INPUTS:
        if Path(name).is_symlink():  # the session's shared toy adapters: a copy
            target = Path(name).resolve()
            Path(name).unlink()
            shutil.copytree(target, name)
        f = factors(name)["model.layers.0.self_attn.q_proj.weight"]
        zero_b = torch.zeros_like(f[0]).float()
        rewrite_factors(
            name, {"model.layers.0.self_attn.q_proj": (f[1].float(), zero_b)}
        )
    written = adapter_delta(run(family_config(method, rank=4)) / "adapter")
    assert float(written["model.layers.0.self_attn.q_proj.weight"].abs().max()) == 0.0
    assert float(written["model.layers.1.self_attn.q_proj.weight"].abs().max()) > 0.0
