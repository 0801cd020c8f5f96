"""`tada` end to end through mergekit's real planner, executor and writer."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    adapter_delta,
    assert_adapter_matches_model,
    copy_adapter,
    load_weights,
    peft_delta,
    rel_err,
    tada_config,
)

import mergekit_tada


def run(config: dict, out: str = "out", **kw) -> Path:
    return Path(mergekit_tada.merge(config, out, quiet=True, **kw))


def test_exact_sum_at_full_rank(work):
    """Gates 1/1, no conflict removal, rank r_T + r_D: adapter dW = dW_T + dW_D."""
    out = run(tada_config())
    d_task = peft_delta("base", "lora-task")
    d_domain = peft_delta("base", "lora-domain")
    ours = adapter_delta(out / "adapter")
    assert set(ours) == set(d_task)  # every module either adapter touches
    base = load_weights("base")
    merged = load_weights(out)
    assert set(merged) == set(base)
    for name, delta in ours.items():
        expected = d_task[name] + d_domain.get(name, 0)
        assert rel_err(delta, expected) < 1e-5, name
        assert rel_err(merged[name] - base[name], expected) < 1e-5, name
    for name in set(base) - set(ours):  # everything else is the base's
        assert torch.equal(merged[name], base[name]), name


def test_truncation_is_best_rank_r_of_gated_sum(work):
    out = run(tada_config(rank=3, task_weight=0.3, domain_weight=0.7))
    d_task, d_domain = (
        peft_delta("base", "lora-task"),
        peft_delta("base", "lora-domain"),
    )
    report = json.loads((out / "tada_report.json").read_text())
    for name, delta in adapter_delta(out / "adapter").items():
        target = 0.3 * d_task[name] + 0.7 * d_domain.get(name, 0)
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        assert rel_err(delta, best) < 1e-5, name
        energy = float((s[3:] ** 2).sum() / (s**2).sum())
        record = report["modules"][name.removesuffix(".weight")]
        assert record["truncation_energy"] == pytest.approx(energy, rel=1e-3)
        assert (record["task_gate"], record["domain_gate"]) == (0.3, 0.7)


def test_adapter_loads_in_peft_and_matches_merged_model(work):
    out = run(tada_config(rank=5, gates="uniform", conflict_elimination=True))
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 5
    assert cfg["peft_type"] == "LORA" and not cfg["use_rslora"] and not cfg["use_dora"]
    assert sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert_adapter_matches_model(out)
    card = (out / "README.md").read_text()
    assert "tada" in card and "tada_report.json" in card


def test_report_schema(work):
    out = run(tada_config(gates="uniform", conflict_elimination=True, rank=4))
    report = json.loads((out / "tada_report.json").read_text())
    assert {"settings", "inputs", "modules"} <= set(report)
    assert report["settings"]["merge_method"] == "tada"
    adapters = report["inputs"]["adapters"]
    assert set(adapters) == {"./base+./lora-task", "./base+./lora-domain"}
    for entry in adapters.values():
        assert len(entry["files_sha256"]["adapter_model.safetensors"]) == 64
    module = report["modules"]["model.layers.0.self_attn.q_proj"]
    for key in (
        "task_gate",
        "domain_gate",
        "dropped_task",
        "dropped_domain",
        "truncation_energy",
    ):
        assert key in module
    # the default lambda = 2 applies to uniform gates too: task arithmetic 1/1
    assert module["task_gate"] == module["domain_gate"] == 1.0
    averaged = run(tada_config(gates="uniform", rank=4, scale=1.0), "averaged")
    module = json.loads((averaged / "tada_report.json").read_text())["modules"]
    assert module["model.layers.0.self_attn.q_proj"]["task_gate"] == 0.5
    # k_proj is in the task adapter only: nothing of the domain to drop
    assert report["modules"]["model.layers.0.self_attn.k_proj"]["dropped_domain"] == []


def test_mixed_ranks_rslora_and_patterns(work):
    from mergekit_tada.toy import build_lora

    build_lora(
        "base",
        "lora-rs",
        r=8,
        alpha=4,
        seed=5,
        use_rslora=True,
        targets=("q_proj", "v_proj"),
    )
    build_lora(
        "base",
        "lora-pat",
        r=4,
        alpha=8,
        seed=6,
        targets=("q_proj", "v_proj", "o_proj"),
        rank_pattern={"v_proj": 2},
        alpha_pattern={"o_proj": 32},
    )
    config = tada_config(rank=14)
    config["models"][0]["model"] = "./base+./lora-rs"
    config["models"][1]["model"] = "./base+./lora-pat"
    out = run(config)
    d_rs, d_pat = peft_delta("base", "lora-rs"), peft_delta("base", "lora-pat")
    assert any("o_proj" in k for k in d_pat)
    for name, delta in adapter_delta(out / "adapter").items():
        assert rel_err(delta, d_rs.get(name, 0) + d_pat[name]) < 1e-5, name


def test_gradient_and_filter_weights_set_per_layer_gates(work):
    config = tada_config(
        gates="fixed",
        task_weight=[1.0, 0.0],  # gradient over the 3 layers: 1.0, 0.5, 0.0
        domain_weight=[{"filter": "mlp", "value": 0.25}, {"value": 0.75}],
    )
    out = run(config)
    modules = json.loads((out / "tada_report.json").read_text())["modules"]
    assert [
        modules[f"model.layers.{i}.self_attn.q_proj"]["task_gate"] for i in range(3)
    ] == [1.0, 0.5, 0.0]
    assert modules["model.layers.1.mlp.up_proj"]["domain_gate"] == 0.25
    assert modules["model.layers.1.self_attn.v_proj"]["domain_gate"] == 0.75
    d_task, d_domain = (
        peft_delta("base", "lora-task"),
        peft_delta("base", "lora-domain"),
    )
    delta = adapter_delta(out / "adapter")["model.layers.1.mlp.up_proj.weight"]
    name = "model.layers.1.mlp.up_proj.weight"
    assert rel_err(delta, 0.5 * d_task[name] + 0.25 * d_domain[name]) < 1e-5


def test_deterministic_outputs(work):
    # Same output path both times: mergekit's model card names the output folder.
    a = run(tada_config(rank=4, gates="uniform", conflict_elimination=True)).rename("a")
    b = run(tada_config(rank=4, gates="uniform", conflict_elimination=True))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert Path("adapter/adapter_model.safetensors") in files
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_adapter_only_matches_full_merge_and_reads_no_base_weights(work, monkeypatch):
    full = run(tada_config(rank=4, gates="uniform"), "full")
    import mergekit.io.lazy_tensor_loader as ltl

    def forbidden(*args, **kwargs):
        raise AssertionError("adapter-only must not read base weights")

    monkeypatch.setattr(ltl.LazyTensorLoader, "get_tensor", forbidden)
    only = run(tada_config(rank=4, gates="uniform"), "only", adapter_only=True)
    # no gates.png: it is drawn for probe gates only
    visible = sorted(p.name for p in only.iterdir() if p.name[0] != ".")
    assert visible == ["adapter", "tada_report.json"]
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (full / "adapter" / name).read_bytes() == (
            only / "adapter" / name
        ).read_bytes()


def test_slices_and_out_shard_size(work):
    config = tada_config(rank=10)
    del config["models"]
    config["slices"] = [
        {
            "sources": [
                {"model": "./base", "layer_range": [1, 3]},
                {
                    "model": "./base+./lora-task",
                    "layer_range": [1, 3],
                    "parameters": {"role": "task"},
                },
                {
                    "model": "./base+./lora-domain",
                    "layer_range": [1, 3],
                    "parameters": {"role": "domain"},
                },
            ]
        }
    ]
    out = run(config, out_shard_size=20_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    d_task, d_domain = (
        peft_delta("base", "lora-task"),
        peft_delta("base", "lora-domain"),
    )
    ours = adapter_delta(out / "adapter")
    # output layer i is input layer i + 1
    src = "model.layers.2.mlp.down_proj.weight"
    assert (
        rel_err(
            ours["model.layers.1.mlp.down_proj.weight"], d_task[src] + d_domain[src]
        )
        < 1e-5
    )
    assert not any(k.startswith("model.layers.2.") for k in ours)


def test_multi_stage_config(work):
    """Stage 1 is tada, stage 2 a stock linear merge that consumes its output."""
    from mergekit.scripts.multimerge import main as multimerge_main

    stage1 = tada_config(rank=10)
    stage1["name"] = "tada-stage"
    stage2 = {  # unnamed: the final merge, written to --out-path
        "merge_method": "linear",
        "models": [
            {"model": "tada-stage", "parameters": {"weight": 0.5}},
            {"model": "./base", "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }
    Path("multi.yml").write_text(yaml.safe_dump_all([stage1, stage2]))
    # An absolute intermediate dir: mergekit's model card asks the Hub about
    # relative "a/b" paths, which fails offline (mergekit behaviour, not ours).
    stages = str(work / "stages")
    with pytest.raises(SystemExit) as done:
        multimerge_main(
            [
                "multi.yml",
                "--intermediate-dir",
                stages,
                "--out-path",
                "final",
                "--quiet",
            ]
        )
    assert done.value.code == 0
    assert (work / "stages/tada-stage/adapter/adapter_config.json").exists()
    base, final = load_weights("base"), load_weights("final")
    d = peft_delta("base", "lora-task")
    name = "model.layers.0.self_attn.k_proj.weight"
    assert rel_err(final[name] - base[name], 0.5 * d[name]) < 1e-5


def test_stock_lora_path_is_untouched_for_other_methods(work, tmp_path):
    """A stock method still materializes base+lora through mergekit's own cache."""
    config = {
        "merge_method": "linear",
        "models": [{"model": "./base+./lora-task", "parameters": {"weight": 1.0}}],
        "dtype": "float32",
    }
    out = run(config, lora_merge_cache=str(tmp_path / "cache"))
    d = peft_delta("base", "lora-task")
    base, merged = load_weights("base"), load_weights(out)
    name = "model.layers.1.mlp.up_proj.weight"
    assert rel_err(merged[name] - base[name], d[name]) < 1e-5
    assert not (out / "tada_report.json").exists()


def test_copy_adapter_helper_makes_writable_copies(work):
    dst = copy_adapter("lora-task", "lora-copy")
    assert (dst / "adapter_config.json").exists() and not dst.is_symlink()


def test_truncation_warning_names_the_rank_that_keeps_99_percent(work, caplog):
    out = run(tada_config(rank=2), "low")
    report = json.loads((out / "tada_report.json").read_text())
    summary = report["summary"]
    # q_proj: a rank-4 and a rank-6 update summed: rank 10 in general position
    assert summary["suggested_rank"] == 10
    assert summary["max_truncation_energy"] > 0.1
    assert (
        f"rank 2 drops up to {summary['max_truncation_energy']:.0%} of a module's "
        "merged update" in caplog.text
    )
    assert "rank 10 would keep 99 % in every module" in caplog.text
    caplog.clear()
    run(tada_config(rank=10), "full")
    assert "would keep 99 %" not in caplog.text
