"""tada with gates: learned: two gates per group trained by TARA's loop."""

import json
from pathlib import Path

import pytest
from conftest import adapter_delta, count_calls, peft_delta, rel_err, tada_config

import mergekit_tada
from mergekit_tada.errors import TadaError

TASK = [f"the answer to question {i} is then explained" for i in range(16)]
DOMAIN = [f"the protein {i} binding with the receptor in the cell" for i in range(16)]


def learned_config(**params) -> dict:
    config = tada_config(
        gates="learned",
        calibration="domain.txt",
        task_calibration="task.txt",
        cache_dir="cache",
        learned_steps=8,
        learned_lr=0.05,
        calibration_batch_size=8,
    )
    for key in ("task_weight", "domain_weight"):
        config["parameters"].pop(key)
    config["parameters"].update(params)
    return config


@pytest.fixture()
def gate_work(work):
    Path("task.txt").write_text("\n".join(TASK) + "\n")
    Path("domain.txt").write_text("\n".join(DOMAIN) + "\n")
    return work


@pytest.mark.parametrize(
    "granularity,groups", [("global", 1), ("layer", 3), ("module", 21)]
)
def test_learned_gates_are_the_merged_update(gate_work, granularity, groups):
    out = Path(
        mergekit_tada.merge(
            learned_config(gate_granularity=granularity),
            "out",
            adapter_only=True,
            quiet=True,
        )
    )
    report = json.loads((out / "tada_report.json").read_text())
    training = report["training"]
    assert training["gates"] == "learned" and len(training["learned"]) == groups
    assert len(training["loss_history"]) == 8
    learned = [tuple(v) for v in training["learned"].values()]
    assert any(abs(t - 1.0) > 1e-4 or abs(d - 1.0) > 1e-4 for t, d in learned)
    d_task = peft_delta("base", "lora-task")
    d_domain = peft_delta("base", "lora-domain")
    ours = adapter_delta(out / "adapter")
    for module, record in report["modules"].items():
        assert record["gate_mode"] == "learned"
        name = module + ".weight"
        expected = record["task_gate"] * d_task[name] + record[
            "domain_gate"
        ] * d_domain.get(name, 0)
        assert rel_err(ours[name], expected) < 1e-5, module
    assert (out / "gates.png").exists()


def test_learned_gates_are_cached_and_overridable(gate_work, monkeypatch):
    import mergekit_tada.training.loop as loop

    calls = count_calls(monkeypatch, loop, "train_coefficients")
    mergekit_tada.merge(
        learned_config(gate_granularity="global"), "a", adapter_only=True, quiet=True
    )
    config = learned_config(gate_granularity="global", task_weight=0.3)
    mergekit_tada.merge(config, "b", adapter_only=True, quiet=True)
    assert len(calls) == 1  # the cache; task_weight applies after it
    modules = json.loads(Path("b/tada_report.json").read_text())["modules"]
    assert all(r["task_gate"] == 0.3 and r["gate_override"] for r in modules.values())


def test_learned_gates_need_both_prompt_sets(gate_work):
    config = learned_config()
    del config["parameters"]["task_calibration"]
    with pytest.raises(
        TadaError, match=r"gates: learned needs calibration .* and task_calibration"
    ):
        mergekit_tada.merge(config, "out", quiet=True)
    with pytest.raises(
        TadaError, match=r"gate_granularity must be one of module, layer\b"
    ):
        mergekit_tada.merge(
            tada_config(gates="uniform", gate_granularity="global"), "out", quiet=True
        )


def test_learned_gates_train_streamed_as_in_memory(gate_work):
    """training_mode: streamed (chosen by auto on a base larger than half the
    memory) learns the same gates as in memory: the tie from the gates to every
    direction's phi survives the streamed engine's backward pass per block."""
    learned = {}
    for mode in ("memory", "streamed"):
        out = Path(
            mergekit_tada.merge(
                learned_config(
                    gate_granularity="layer", training_mode=mode, cache_dir=mode
                ),
                mode,
                adapter_only=True,
                quiet=True,
            )
        )
        training = json.loads((out / "tada_report.json").read_text())["training"]
        learned[mode] = training["learned"]
        assert len(training["loss_history"]) == 8
    assert learned["memory"].keys() == learned["streamed"].keys()
    for group, gates in learned["memory"].items():
        assert gates != [1.0, 1.0]  # trained
        assert gates == pytest.approx(learned["streamed"][group], rel=1e-4), group
