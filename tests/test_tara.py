"""TARA: the entropy objective, its gradient, the variants' algebra, end to end.

References are independent of our code: PEFT's own merge_and_unload of
adapters whose B columns are scaled per direction, dense torch SVDs, finite
differences.
"""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    adapter_delta,
    count_calls,
    outputs_under_settings,
    peft_delta,
    rel_err,
)
from safetensors.torch import load_file, save_file

import mergekit_tada
from mergekit_tada.directions import directions
from mergekit_tada.errors import TadaError
from mergekit_tada.toy import build_lora

TEXT_A = [f"the answer to question {i} is then explained" for i in range(24)]
TEXT_B = [f"the protein {i} binding with the receptor in the cell" for i in range(24)]


@pytest.fixture()
def tara_work(work):
    Path("a.txt").write_text("\n".join(TEXT_A) + "\n")
    Path("b.txt").write_text("\n".join(TEXT_B) + "\n")
    return work


def tara_config(**params) -> dict:
    parameters = {"steps": 6, "batch_size": 8, "lr": 0.05, "cache_dir": "cache"}
    parameters.update(params)
    return {
        "merge_method": "tara",
        "base_model": "./base",
        "models": [
            {"model": "./base+./lora-task", "parameters": {"data": "a.txt"}},
            {"model": "./base+./lora-domain", "parameters": {"data": "b.txt"}},
        ],
        "parameters": parameters,
        "dtype": "float32",
    }


def scaled_factors(adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (s*B, A) in float64, read straight from the PEFT files."""
    cfg = json.loads(Path(adapter, "adapter_config.json").read_text())
    tensors = load_file(Path(adapter, "adapter_model.safetensors"))
    out = {}
    for key, A in tensors.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").removesuffix(
                ".lora_A.weight"
            )
            B = tensors[key.replace(".lora_A.", ".lora_B.")]
            out[module] = (B.double() * cfg["lora_alpha"] / cfg["r"], A.double())
    return out


def reference_update(phi_by_input, adapters, module, variant):
    """Dense dW(phi) from the definitions, with a dense SVD for variant B."""
    present = [
        (scaled_factors(a)[module], p)
        for a, p in zip(adapters, phi_by_input, strict=True)
        if module in scaled_factors(a)
    ]
    if variant == "a":
        return sum(B @ torch.diag(p) @ A for (B, A), p in present)
    M = torch.cat([B @ A for (B, A), _ in present], dim=1)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    R = sum(A.shape[0] for (_, A), _ in present)
    n = present[0][0][1].shape[1]
    U, S, Vh = U[:, :R], S[:R], Vh[:R]
    return sum(
        U @ torch.diag(S * p) @ Vh[:, t * n : (t + 1) * n]
        for t, (_, p) in enumerate(present)
    )


def split_phi(record_phi, ranks, variant):
    """Per-input coefficient vectors from a module's phi (in input order)."""
    phi = torch.tensor(record_phi, dtype=torch.float64)
    if variant == "a":
        return list(torch.split(phi, ranks))
    return list(torch.chunk(phi, len(ranks)))


# ------------------------------------------------------------ algebra


@pytest.mark.parametrize("variant", ["a", "b"])
def test_phi_one_is_task_arithmetic(work, variant):
    from mergekit_tada.adapters import LoraAdapter

    adapters = [LoraAdapter("lora-task"), LoraAdapter("lora-domain")]
    d_task = peft_delta("base", "lora-task")
    d_domain = peft_delta("base", "lora-domain")
    for module in adapters[0].modules:
        updates = [a.factors(module) if module in a.modules else None for a in adapters]
        d = directions(updates, variant)
        merged = d.merged(torch.ones(d.size)).dense().double()
        name = module + ".weight"
        expected = d_task[name] + d_domain.get(name, 0)
        assert rel_err(merged, expected) < 1e-5, module
        for i in range(2):  # single(i): input i's own update
            if updates[i] is not None:
                alone = d.merged(d.single(i)).dense().double()
                want = (d_task if i == 0 else d_domain)[name]
                assert rel_err(alone, want) < 1e-5, (module, i)


@pytest.mark.parametrize("variant", ["a", "b"])
def test_directions_match_the_definition_for_any_phi(work, variant):
    from mergekit_tada.adapters import LoraAdapter

    module = "model.layers.1.mlp.up_proj"  # in both adapters (r = 4 and 6)
    adapters = [LoraAdapter("lora-task"), LoraAdapter("lora-domain")]
    d = directions([a.factors(module) for a in adapters], variant)
    phi = torch.linspace(-1.0, 2.0, d.size)
    ours = d.merged(phi).dense().double()
    per_input = split_phi(phi.tolist(), [4, 6], variant)
    expected = reference_update(
        per_input, ["lora-task", "lora-domain"], module, variant
    )
    assert rel_err(ours, expected) < 1e-5


# ------------------------------------------------------------ the objective


def scaled_copy(src: str, dst: str, phi_by_module: dict[str, torch.Tensor]) -> str:
    """A PEFT adapter whose B columns are multiplied by phi (per direction)."""
    shutil.copytree(Path(src).resolve(), dst)
    path = Path(dst) / "adapter_model.safetensors"
    tensors = load_file(path)
    for module, phi in phi_by_module.items():
        key = f"base_model.model.{module}.lora_B.weight"
        tensors[key] = tensors[key] * phi.float()[None, :]
    save_file(tensors, path, metadata={"format": "pt"})
    return dst


def reference_entropy(model_dir: str, adapters: list[str], texts: list[str]) -> float:
    """Mean next-token entropy of base + adapters merged by PEFT, plain torch."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "right"
    tok.pad_token = tok.pad_token or tok.eos_token or tok.unk_token
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=32)
    with torch.no_grad():
        logits = model(**enc).logits.double()
    p = torch.softmax(logits, -1)
    h = -(p * torch.log(p)).sum(-1)
    mask = enc["attention_mask"].bool()
    return float(h[mask].mean())


def our_entropy(variant: str, phi_fn, texts: list[str]) -> tuple[float, dict]:
    from mergekit_tada.adapters import LoraAdapter
    from mergekit_tada.batches import make_batches, tokenizer_for
    from mergekit_tada.training.engines import InMemory, load_causal_lm
    from mergekit_tada.training.loop import Task, task_entropy

    adapters = [LoraAdapter("lora-task"), LoraAdapter("lora-domain")]
    dirs = {
        m: directions(
            [a.factors(m) if m in a.modules else None for a in adapters], variant
        )
        for m in adapters[0].modules
    }
    phi = {m: phi_fn(d) for m, d in dirs.items()}
    model = load_causal_lm("base", torch.device("cpu"))
    batches = make_batches(tokenizer_for("base"), texts, 32, len(texts))
    engine = InMemory(model, dirs, torch.device("cpu"))
    return task_entropy(engine, phi, Task("t", batches)), phi


def test_entropy_equals_peft_reference(work):
    """H(phi) of our hooked base = entropy of PEFT's merged model, variant A."""
    texts = TEXT_A[:6]
    gen = torch.Generator().manual_seed(0)
    ours, phi = our_entropy(
        "a", lambda d: torch.rand(d.size, generator=gen) * 2 - 0.5, texts
    )
    # the same phi as scaled B columns of each adapter, merged by PEFT
    task = {m: p[:4] for m, p in phi.items()}
    domain = {m: p[4:] for m, p in phi.items() if len(p) > 4}
    scaled_copy("lora-task", "task-phi", task)
    scaled_copy("lora-domain", "domain-phi", domain)
    reference = reference_entropy("base", ["task-phi", "domain-phi"], texts)
    assert abs(ours - reference) / reference < 1e-5
    # and each adapter alone (z_i's definition)
    alone, _ = our_entropy("a", lambda d: d.single(0), texts)
    assert abs(alone - reference_entropy("base", ["lora-task"], texts)) < 1e-5 * alone


@pytest.mark.parametrize("objective", ["stch", "linear"])
def test_gradient_matches_finite_differences(work, objective, monkeypatch):
    from transformers.models.llama import modeling_llama

    from mergekit_tada.adapters import LoraAdapter
    from mergekit_tada.batches import make_batches, tokenizer_for
    from mergekit_tada.training.engines import InMemory, load_causal_lm

    adapters = [LoraAdapter("lora-task"), LoraAdapter("lora-domain")]
    module_names = sorted(adapters[0].modules)[:4]
    dirs = {}
    for m in module_names:
        d = directions(
            [a.factors(m) if m in a.modules else None for a in adapters], "b"
        )
        dirs[m] = type(d)(d.B.double(), d.A.double(), d.groups, d.owners)

    def rms_norm_in_input_dtype(self, x):  # Llama's norm computes in float32
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm_in_input_dtype)
    model = load_causal_lm("base", torch.device("cpu")).double()
    tok = tokenizer_for("base")
    batches = [make_batches(tok, t[:4], 16, 4)[0] for t in (TEXT_A, TEXT_B)]
    z = torch.tensor([3.0, 3.1], dtype=torch.float64)
    rho = torch.tensor([0.3, 0.7], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    phi = {
        m: torch.rand(d.size, generator=gen, dtype=torch.float64)
        for m, d in dirs.items()
    }

    engine = InMemory(model, dirs, torch.device("cpu"))

    def psi(values):
        return engine.step(values, batches, z, rho, objective, 1.0)[0]

    params = {m: p.clone().requires_grad_(True) for m, p in phi.items()}
    psi(params)  # the engine's step leaves d psi / d phi in .grad
    eps = 1e-6
    for m in module_names[:2]:
        for j in (0, 3, dirs[m].size - 1):
            up = {k: v.clone() for k, v in phi.items()}
            down = {k: v.clone() for k, v in phi.items()}
            up[m][j] += eps
            down[m][j] -= eps
            with torch.no_grad():
                numeric = float(psi(up) - psi(down)) / (2 * eps)
            analytic = float(params[m].grad[j])
            assert abs(numeric - analytic) <= 1e-5 * max(1.0, abs(analytic)), (m, j)


# ------------------------------------------------------------ end to end


@pytest.mark.parametrize("variant", ["a", "b"])
def test_output_adapter_is_the_learned_update(tara_work, variant):
    out = Path(mergekit_tada.merge(tara_config(variant=variant), "out", quiet=True))
    report = json.loads((out / "merge_report.json").read_text())
    training = report["training"]
    assert training["variant"] == variant and len(training["loss_history"]) == 6
    assert (out / "tara_loss.png").stat().st_size > 1000
    ours = adapter_delta(out / "adapter")
    base_ranks = {"lora-task": 4, "lora-domain": 6}
    for module, record in report["modules"].items():
        adapters = [
            a for a in ("lora-task", "lora-domain") if module in scaled_factors(a)
        ]
        per_input = split_phi(record["phi"], [base_ranks[a] for a in adapters], variant)
        expected = reference_update(per_input, adapters, module, variant)
        assert rel_err(ours[module + ".weight"], expected) < 1e-5, module
    # the full model agrees with the adapter
    from conftest import assert_adapter_matches_model

    assert_adapter_matches_model(out)


def test_preference_lowers_the_preferred_gap(tara_work):
    def gaps(preference: float, out: str) -> list[float]:
        config = tara_config(steps=12, objective="linear")
        config["models"][1]["parameters"]["preference"] = preference
        mergekit_tada.merge(config, out, adapter_only=True, quiet=True)
        t = json.loads(Path(out, "merge_report.json").read_text())["training"]
        return [h - z for h, z in zip(t["h_after"], t["z"], strict=True)]

    uniform = gaps(1.0, "uniform")
    preferred = gaps(9.0, "preferred")  # rho = (0.1, 0.9)
    assert preferred[1] < uniform[1]


def test_output_bytes_do_not_depend_on_hash_seed_or_threads(tara_work):
    """Training and the per-module merges on worker threads give the same bits
    on 1 or 2 torch threads (ATen splits reductions by the thread count)."""
    inputs = ("base", "lora-task", "lora-domain", "a.txt", "b.txt")
    outputs = outputs_under_settings(tara_config(), inputs, adapter_only=True)
    assert outputs[0] == outputs[1] == outputs[2]
    assert "out/adapter/adapter_model.safetensors" in outputs[0]


def test_reruns_are_bit_identical_and_cached(tara_work, monkeypatch):
    import mergekit_tada.training.loop as loop

    calls = count_calls(monkeypatch, loop, "train_coefficients")
    a = Path(mergekit_tada.merge(tara_config(), "a", adapter_only=True, quiet=True))
    config = tara_config(cache_dir="other-cache")
    b = Path(mergekit_tada.merge(config, "b", adapter_only=True, quiet=True))
    assert len(calls) == 2
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (a / "adapter" / name).read_bytes() == (
            b / "adapter" / name
        ).read_bytes()
    # same inputs: the cache; another output rank: the cache too
    mergekit_tada.merge(tara_config(rank=3), "c", adapter_only=True, quiet=True)
    assert len(calls) == 2
    report = json.loads(Path("c/merge_report.json").read_text())
    assert report["training"]["cache_hit"] is True
    # changed data or settings: trained again
    Path("b.txt").write_text("\n".join(TEXT_A) + "\n")  # other tokens
    mergekit_tada.merge(tara_config(rank=3), "d", adapter_only=True, quiet=True)
    mergekit_tada.merge(
        tara_config(rank=3, lr=0.01), "e", adapter_only=True, quiet=True
    )
    assert len(calls) == 4


# ------------------------------------------------------------ bad input


def expect(config, match):
    with pytest.raises(TadaError, match=match):
        mergekit_tada.merge(config, "out", quiet=True)
    assert not Path("out").exists()


def test_bad_input(tara_work):
    config = tara_config()
    del config["models"][0]["parameters"]["data"]
    expect(config, r"tara: model ./base\+./lora-task needs parameters: \{data: path\}")
    Path("empty.txt").write_text("\n \n")
    config = tara_config()
    config["models"][1]["parameters"]["data"] = "empty.txt"
    expect(config, r"tara: data of models\[1\] .*empty.txt contains no usable text")
    expect(tara_config(steps=0), r"tara: steps must be >= 1")
    config = tara_config()
    config["models"][0]["parameters"]["preference"] = -1.0
    expect(config, r"tara: preference of ./base\+./lora-task must be > 0")
    expect(tara_config(variant="c"), r"tara: variant must be one of a, b")
    expect(tara_config(pico=True), r"tara: pico is not supported")


def test_encoder_base_is_refused(tara_work):
    shutil.copytree(Path("base").resolve(), "enc-base")
    cfg = json.loads(Path("enc-base/config.json").read_text())
    cfg["model_type"] = "bert"
    Path("enc-base/config.json").write_text(json.dumps(cfg))
    config = tara_config()
    config["base_model"] = "./enc-base"
    for m in config["models"]:
        m["model"] = m["model"].replace("./base+", "./enc-base+")
    with pytest.raises(
        TadaError, match=r"tara: base model ./enc-base is a 'bert' model"
    ):
        mergekit_tada.merge(config, "out", adapter_only=True, quiet=True)


def test_diverging_training_names_the_step(tara_work):
    build_lora("base", "lora-big", r=4, alpha=8, seed=5, std=30.0)
    config = tara_config(lr=1e30, steps=5)
    config["models"][1]["model"] = "./base+./lora-big"
    with pytest.raises(TadaError, match=r"tara: .*at step \d+"):
        mergekit_tada.merge(config, "out", adapter_only=True, quiet=True)
    assert not Path("out").exists()


def test_streamed_gradients_equal_in_memory(work):
    """One block at a time, weights re-read: the same psi and d psi / d phi."""
    from mergekit_tada.adapters import LoraAdapter
    from mergekit_tada.batches import make_batches, tokenizer_for
    from mergekit_tada.training.engines import InMemory, Streamed, load_causal_lm

    cpu = torch.device("cpu")
    adapters = [LoraAdapter("lora-task"), LoraAdapter("lora-domain")]
    dirs = {
        m: directions([a.factors(m) if m in a.modules else None for a in adapters], "b")
        for m in adapters[0].modules
    }
    tok = tokenizer_for("base")
    batches = [make_batches(tok, t[:5], 16, 5)[0] for t in (TEXT_A, TEXT_B)]
    z = torch.tensor([3.0, 3.2])
    rho = torch.tensor([0.4, 0.6])
    gen = torch.Generator().manual_seed(2)
    phi0 = {m: torch.rand(d.size, generator=gen) for m, d in dirs.items()}
    grads = {}
    for engine in (
        InMemory(load_causal_lm("base", cpu), dirs, cpu),
        Streamed("base", dirs, cpu),
    ):
        phi = {m: torch.nn.Parameter(p.clone()) for m, p in phi0.items()}
        psi, gaps = engine.step(phi, batches, z, rho, "stch", 1.0)
        grads[engine.mode] = (float(psi), {m: p.grad.clone() for m, p in phi.items()})
        if engine.mode == "streamed":
            assert engine.sm.max_resident_blocks == 1
    (psi_a, ga), (psi_b, gb) = grads["memory"], grads["streamed"]
    assert psi_a == pytest.approx(psi_b, rel=1e-6)
    for m in ga:
        assert rel_err(gb[m], ga[m]) < 1e-5, m


def test_streamed_mode_is_chosen_when_the_base_does_not_fit(
    tara_work, monkeypatch, caplog
):
    import mergekit_tada.training.engines as engines

    caplog.set_level(logging.INFO)  # the choice is an info line
    memory = Path(
        mergekit_tada.merge(
            tara_config(training_mode="memory", cache_dir="c1"),
            "m",
            adapter_only=True,
            quiet=True,
        )
    )
    monkeypatch.setattr(engines, "_available_memory", lambda: 100_000)
    streamed = Path(
        mergekit_tada.merge(
            tara_config(cache_dir="c2"), "s", adapter_only=True, quiet=True
        )
    )
    assert "tara: training block-streamed" in caplog.text
    a, b = adapter_delta(memory / "adapter"), adapter_delta(streamed / "adapter")
    for name in a:
        assert rel_err(b[name], a[name]) < 1e-4, name
