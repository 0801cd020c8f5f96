"""The test matrix: every architecture of tests/architectures.py, a tiny random
model built from transformers' own config, two random PEFT LoRAs, and each
method family checked against an oracle that is not our code:

* data-free (adapter-only) and the full model through mergekit's executor:
  Σ ΔW_t from PEFT's own ``merge_and_unload``;
* the streamed pass: its forward (logits, last hidden states) against
  transformers' own; TaDA's probe statistics and RegMean's merge against plain
  full-model forwards of transformers' model with hooks (PEFT-merged models
  for RegMean's inputs), dense maths from the paper; ``lambda: auto``'s
  objective at every candidate against PEFT-merged models; TARA's (and
  learned gates') streamed training step against the in-memory model.

Each family's LM head is tied or not as its config defaults.

MoE models (transformers fuses the experts' checkpoint tensors on load: the
streamed pass applies its conversion block by block): attention LoRAs merge
exactly in every method; expert LoRAs are refused in one line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from architectures import ARCHS, Arch, supported_table
from conftest import adapter_delta, load_weights, rel_err

import mergekit_tada
from mergekit_tada.adapters import LoraAdapter
from mergekit_tada.batches import make_batches, tokenizer_for
from mergekit_tada.errors import TadaError
from mergekit_tada.probe.calibration import run_calibration
from mergekit_tada.toy import build_decoder, build_encoder, build_llama, build_lora

PROMPTS = [f"the protein {i} binds the cell receptor and the gene" for i in range(5)]
ROOT = Path(__file__).resolve().parent.parent


def auto_class(arch: Arch):
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModel if arch.kind == "encoder" else AutoModelForCausalLM


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every architecture's base and two LoRAs, built once (lazily)."""
    cache: dict[str, Path] = {}

    def get(arch: Arch) -> Path:
        if arch.model_type not in cache:
            root = tmp_path_factory.mktemp(arch.model_type)
            if arch.model_type == "llama":
                build_llama(root / "base", seed=3)
            elif arch.kind == "encoder":
                build_encoder(root / "base", arch.model_type)
            else:
                build_decoder(root / "base", arch.model_type)
            task = None if arch.kind == "encoder" else "CAUSAL_LM"
            for name, seed, r in (("lora-a", 1, 3), ("lora-b", 2, 4)):
                build_lora(
                    root / "base",
                    root / name,
                    r=r,
                    seed=seed,
                    targets=arch.targets,
                    task_type=task,
                )
            (root / "p.txt").write_text("\n".join(PROMPTS) + "\n")
            # the checks below mean something only on prompts of several tokens
            assert len(tokenizer_for(str(root / "base"))(PROMPTS[0]).input_ids) > 5
            cache[arch.model_type] = root
        return cache[arch.model_type]

    return get


def peft_deltas(arch: Arch, root: Path) -> dict[str, torch.Tensor]:
    """Σ_t (merge_and_unload() - base) over both adapters, by weight name."""
    from peft import PeftModel

    total: dict[str, torch.Tensor] = {}
    for name in ("lora-a", "lora-b"):
        model = auto_class(arch).from_pretrained(
            str(root / "base"), dtype=torch.float32
        )
        before = {k: v.clone() for k, v in model.state_dict().items()}
        after = PeftModel.from_pretrained(model, str(root / name)).merge_and_unload()
        for k, v in after.state_dict().items():
            if not torch.equal(v, before[k]):
                total[k] = total.get(k, 0) + (v - before[k]).double()
    return total


def config(root: Path, method: str, **params) -> dict:
    data = params.pop("data", None)
    return {
        "merge_method": method,
        "base_model": str(root / "base"),
        "models": [
            {
                "model": f"{root / 'base'}+{root / n}",
                "parameters": {"data": data} if data else {},
            }
            for n in ("lora-a", "lora-b")
        ],
        "parameters": params,
        "dtype": "float32",
    }


def strip(name: str) -> str:
    """A weight's name without the checkpoint's model prefix, as PEFT's keys."""
    return re.sub(r"^(model\.|transformer\.|gpt_neox\.)?", "", name)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.model_type)
def test_data_free_adapter_and_full_model(built, arch, tmp_path):
    root = built(arch)
    expected = {strip(k): v for k, v in peft_deltas(arch, root).items()}
    cfg = config(root, "lora_task_arithmetic", lossless=True)
    out = Path(mergekit_tada.merge(cfg, tmp_path / "a", adapter_only=True, quiet=True))
    written = {strip(k): v for k, v in adapter_delta(out / "adapter").items()}
    config_file = json.loads((out / "adapter/adapter_config.json").read_text())
    if config_file.get("fan_in_fan_out"):  # Conv1D weights are in x out
        written = {k: v.T for k, v in written.items()}
    assert set(written) == set(expected)
    for name, delta in expected.items():
        assert rel_err(written[name], delta) < 1e-5, name
    full = Path(mergekit_tada.merge(cfg, tmp_path / "f", quiet=True))
    merged, base = load_weights(full), load_weights(root / "base")
    # every weight of the model is written (gpt_neox's embed_out was left out);
    # MoE experts are written fused, under the model's own names
    _, info = auto_class(arch).from_pretrained(
        str(full), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"], info["missing_keys"]
    for name, delta in expected.items():
        key = next(k for k in merged if strip(k) == name)
        assert rel_err(merged[key].double() - base[key].double(), delta) < 1e-4, name
    # the written adapter loads in PEFT, and its merge is the written model
    from peft import PeftModel

    model = auto_class(arch).from_pretrained(str(root / "base"), dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, str(full / "adapter")).merge_and_unload()
    by_name = {strip(k): v for k, v in merged.items()}
    for name, tensor in peft.state_dict().items():
        if strip(name) in by_name:
            assert torch.allclose(tensor, by_name[strip(name)], atol=1e-5), name


def dense_inputs(arch: Arch, root: Path, adapter: str | None):
    """Every linear's inputs (tokens x d_in) in base (+ adapter, PEFT-merged),
    one unpadded prompt at a time."""
    from peft import PeftModel

    model = auto_class(arch).from_pretrained(str(root / "base"), dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, str(root / adapter)).merge_and_unload()
    tokenizer = tokenizer_for(str(root / "base"))
    rows: dict[str, list] = {}
    from transformers.pytorch_utils import Conv1D

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear | Conv1D) and name != "lm_head":
            m.register_forward_hook(
                lambda _m, i, _o, n=name: rows.setdefault(n, []).append(
                    i[0].reshape(-1, i[0].shape[-1]).double()
                )
            )
    with torch.no_grad():
        for text in PROMPTS:
            model(**tokenizer(text, return_tensors="pt"))
    return {strip(n): torch.cat(v) for n, v in rows.items()}


STREAMED = [a for a in ARCHS if a.streamed]


@pytest.mark.parametrize("arch", STREAMED, ids=lambda a: a.model_type)
def test_streamed_forward_is_the_models_forward(built, arch):
    """Block by block from the checkpoint, then the stem's tail (with the LM
    head for a causal LM: TARA's and ``lambda: auto``'s logits), equals
    transformers' own forward of the loaded model on padded batches."""
    from mergekit_tada.streaming import StreamedModel

    root = built(arch)
    causal = arch.kind != "encoder"
    batches = make_batches(tokenizer_for(str(root / "base")), PROMPTS, 16, 2)
    model = StreamedModel(
        str(root / "base"), torch.device("cpu"), torch.float32, causal
    )
    plain = auto_class(arch).from_pretrained(str(root / "base"), dtype=torch.float32)
    with torch.no_grad():
        records = model.block_inputs(batches)
        finals = model.forward_blocks(records, [r[0][0] for r in records])
        for batch, (final,) in zip(batches, finals, strict=True):
            out = model.tail(batch, final, head=causal)
            expected = plain.eval()(**batch.forward_kwargs())
            name = "logits" if causal else "last_hidden_state"
            mask = batch.attention_mask.bool()
            assert rel_err(out[name][mask], expected[name][mask]) < 1e-5


@pytest.mark.parametrize("arch", STREAMED, ids=lambda a: a.model_type)
def test_regmean_against_plain_forwards(built, arch, tmp_path):
    import oracles

    root = built(arch)
    cfg = config(
        root, "lora_regmean", rank=7, data=str(root / "p.txt"), cache_dir=str(tmp_path)
    )
    out = Path(mergekit_tada.merge(cfg, tmp_path / "o", adapter_only=True, quiet=True))
    written = {strip(k): v for k, v in adapter_delta(out / "adapter").items()}
    deltas = {
        n: {strip(k): v for k, v in adapter_delta(root / n).items()}
        for n in ("lora-a", "lora-b")
    }
    inputs = {n: dense_inputs(arch, root, n) for n in deltas}
    for module, delta in written.items():
        name = module.removesuffix(".weight")
        grams = [
            oracles.regmean_grams(
                inputs[n][name].T @ inputs[n][name] / len(inputs[n][name]), 0.9
            )
            for n in deltas
        ]
        zero = torch.zeros_like(next(d[module] for d in deltas.values() if module in d))
        expected = oracles.least_squares_merge(
            [deltas[n].get(module, zero) for n in deltas], grams
        )
        assert rel_err(delta, expected) < 1e-4, module


@pytest.mark.parametrize("arch", STREAMED, ids=lambda a: a.model_type)
def test_probe_statistics_against_plain_forwards(built, arch):
    from test_probe import assert_stats_match, reference_stats

    root = built(arch)
    adapters = {n: LoraAdapter(root / n) for n in ("lora-a", "lora-b")}
    batches = make_batches(tokenizer_for(str(root / "base")), PROMPTS, 16, batch_size=2)
    stats = run_calibration(str(root / "base"), batches, adapters, quiet=True)
    auto = "base" if arch.kind == "encoder" else "causal"
    assert_stats_match(stats, reference_stats(root / "base", batches, adapters, auto))


@pytest.mark.parametrize("arch", STREAMED, ids=lambda a: a.model_type)
def test_lambda_auto_against_plain_forwards(built, arch, tmp_path):
    """RegMean with ``lambda: auto``: every candidate's objective from
    transformers' own models (a tied LM head included: the families that tie
    by default are built tied)."""
    from test_scale_search import agreement, assert_chose_the_best

    from mergekit_tada.probe.agreement import GRID

    root = built(arch)
    cfg = config(root, "lora_regmean", data=str(root / "p.txt"))
    cfg["parameters"]["lambda"] = "auto"
    auto = Path(
        mergekit_tada.merge(cfg, tmp_path / "auto", adapter_only=True, quiet=True)
    )
    cfg["parameters"]["lambda"] = 1.0
    one = adapter_delta(
        Path(mergekit_tada.merge(cfg, tmp_path / "one", adapter_only=True, quiet=True))
        / "adapter"
    )
    adapters = {root / n: PROMPTS for n in ("lora-a", "lora-b")}
    causal = arch.kind != "encoder"
    expected = agreement(root / "base", adapters, one, GRID, causal)
    assert_chose_the_best(auto, one, expected, "lambda")


def test_response_objective_on_an_encoder_is_one_line(built, tmp_path):
    """An encoder writes no next token: auto_objective: response is refused
    before any merge, in one line, and no output is left."""
    from mergekit_tada.errors import TadaError

    root = built(next(a for a in STREAMED if a.kind == "encoder"))
    cfg = config(root, "lora_task_arithmetic", data=str(root / "p.txt"))
    cfg["parameters"].update({"lambda": "auto", "auto_objective": "response"})
    with pytest.raises(TadaError, match=r"auto_objective: response .*not a causal LM"):
        mergekit_tada.merge(cfg, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arch", [a for a in STREAMED if a.kind != "encoder"], ids=lambda a: a.model_type
)
def test_tara_streamed_step_equals_in_memory(built, arch):
    """TARA's (and learned gates') training step, block-streamed from the
    checkpoint, against transformers' in-memory model: the same objective and
    gradient."""
    from mergekit_tada.directions import directions
    from mergekit_tada.training.engines import InMemory, Streamed, load_causal_lm

    root = built(arch)
    cpu = torch.device("cpu")
    adapters = [LoraAdapter(root / n) for n in ("lora-a", "lora-b")]
    dirs = {
        m: directions([a.factors(m) if m in a.modules else None for a in adapters], "b")
        for m in adapters[0].modules
    }
    tok = tokenizer_for(str(root / "base"))
    batches = [make_batches(tok, PROMPTS[i : i + 2], 16, 2)[0] for i in (0, 2)]
    generator = torch.Generator().manual_seed(2)
    phi0 = {m: torch.rand(d.size, generator=generator) for m, d in dirs.items()}
    grads = {}
    for engine in (
        InMemory(load_causal_lm(str(root / "base"), cpu), dirs, cpu),
        Streamed(str(root / "base"), dirs, cpu),
    ):
        phi = {m: torch.nn.Parameter(p.clone()) for m, p in phi0.items()}
        psi, _ = engine.step(
            phi,
            batches,
            torch.tensor([3.0, 3.2]),
            torch.tensor([0.4, 0.6]),
            "stch",
            1.0,
        )
        grads[engine.mode] = (float(psi), {m: p.grad for m, p in phi.items()})
    (psi_a, ga), (psi_b, gb) = grads["memory"], grads["streamed"]
    assert psi_b == pytest.approx(psi_a, rel=1e-5)
    for m in ga:
        assert ga[m].abs().sum() > 0, m  # every module's coefficients learn
        assert rel_err(gb[m], ga[m]) < 1e-4, m


@pytest.mark.parametrize(
    "arch", [a for a in ARCHS if a.kind == "moe"], ids=lambda a: a.model_type
)
def test_moe_expert_loras_are_refused_in_one_line(built, arch, tmp_path):
    """PEFT's ``all-linear`` on a MoE model puts the fused experts in
    ``target_parameters``: one line that says which LoRAs do merge."""
    root = built(arch)
    build_lora(root / "base", tmp_path / "experts", r=2, targets="all-linear")
    cfg = config(root, "lora_task_arithmetic")
    cfg["models"][1]["model"] = f"{root / 'base'}+{tmp_path / 'experts'}"
    with pytest.raises(
        TadaError, match=r"target_parameters .*target_modules.* is not supported"
    ) as info:
        mergekit_tada.merge(cfg, tmp_path / "o", adapter_only=True, quiet=True)
    assert "\n" not in str(info.value)


def test_readme_table_is_the_matrix():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert supported_table() in readme


def test_a_block_weight_the_checkpoint_lacks_is_one_line(built, tmp_path):
    """A block weight neither in the checkpoint nor made by transformers'
    conversion mapping (in block 1: every block is checked, as blocks may
    differ): the streamed methods stop in one line, nothing written."""
    import shutil

    from safetensors.torch import load_file, save_file

    root = built(ARCHS[0])
    shutil.copytree(root, tmp_path / "w")
    weights = tmp_path / "w" / "base" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.input_layernorm.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    cfg = config(tmp_path / "w", "lora_regmean", data=str(root / "p.txt"))
    with pytest.raises(
        TadaError,
        match=r"streamed pass: .* has no weight model\.layers\.1\.input_layernorm\.weight "
        r".* cannot be read one at a time; .*--adapter-only",
    ) as info:
        mergekit_tada.merge(cfg, tmp_path / "o", adapter_only=True, quiet=True)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "arch",
    [a for a in ARCHS if a.model_type in ("llama", "mixtral", "bert")],
    ids=lambda a: a.model_type,
)
def test_chunks_on_several_threads_give_the_same_bits(built, arch, monkeypatch):
    """The streamed passes run several chunks through a block at once, one per
    worker thread (as many as torch's threads): probe statistics, RegMean's and
    RegMean++'s R_t and ``lambda: auto``'s objective are bit-identical to one
    chunk after another, and the chunks did run on several threads."""
    import threading

    from mergekit_tada.lowrank import Factored
    from mergekit_tada.probe import calibration, grams
    from mergekit_tada.probe.agreement import agreement_pass

    root = built(arch)
    base = str(root / "base")
    adapters = {n: LoraAdapter(root / n) for n in ("lora-a", "lora-b")}
    tokenizer = tokenizer_for(base)
    batches = {n: make_batches(tokenizer, PROMPTS, 16, 1) for n in adapters}
    weights = {(t, m): 0.5 for t, a in adapters.items() for m in a.modules}

    def summed(module: str) -> Factored:  # sum_t dW_t, factored
        fs = [a.factors(module) for a in adapters.values()]
        return Factored(torch.cat([f.B for f in fs], 1), torch.cat([f.A for f in fs]))

    merged = {m: summed(m) for m in adapters["lora-a"].modules}
    threads_seen: set[int] = set()
    hook = calibration._Accumulator.hook

    def spying(self, name, *args, **kwargs):
        inner = hook(self, name, *args, **kwargs)

        def run(*a):
            threads_seen.add(threading.get_ident())
            return inner(*a)

        return run

    monkeypatch.setattr(calibration._Accumulator, "hook", spying)

    def passes():
        every = [b for bs in batches.values() for b in bs]
        return (
            run_calibration(base, every, adapters, quiet=True),
            grams.gram_pass(base, batches, adapters, 0.9, True, quiet=True),
            grams.gram_pass(
                base, batches, adapters, 0.9, True, merged_weights=weights, quiet=True
            ),
            agreement_pass(base, batches, adapters, merged, quiet=True),
        )

    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = passes()
        assert len(threads_seen) == 1
        torch.set_num_threads(3)
        threads_seen.clear()
        parallel = passes()
        assert len(threads_seen) > 1
    finally:
        torch.set_num_threads(saved)
    assert parallel[0] == serial[0]  # dataclasses of floats: exact
    for a, b in zip(parallel[1:3], serial[1:3], strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert parallel[3] == serial[3]


def test_gpt_neox_lm_head_lora(built, tmp_path):
    """A LoRA on gpt_neox's LM head: PEFT names it lm_head, the checkpoint
    stores embed_out (transformers renames it on load). Adapter-only, the full
    model and a streamed method merge it; the written adapter is named as
    PEFT's and its merge is the written model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = built(next(a for a in ARCHS if a.model_type == "gpt_neox"))
    targets = ("query_key_value", "lm_head")
    for name, seed in (("head-a", 1), ("head-b", 2)):
        build_lora(root / "base", tmp_path / name, r=2, seed=seed, targets=targets)
    cfg = config(root, "lora_task_arithmetic", lossless=True)
    for model, name in zip(cfg["models"], ("head-a", "head-b"), strict=True):
        model["model"] = f"{root / 'base'}+{tmp_path / name}"
    expected = sum(
        adapter_delta(tmp_path / n)["lm_head.weight"] for n in ("head-a", "head-b")
    )
    full = Path(mergekit_tada.merge(cfg, tmp_path / "f", quiet=True))
    assert rel_err(adapter_delta(full / "adapter")["lm_head.weight"], expected) < 1e-5
    merged, base = load_weights(full), load_weights(root / "base")
    assert set(merged) == set(base)
    assert (
        rel_err(merged["embed_out.weight"] - base["embed_out.weight"], expected) < 1e-4
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(root / "base"), dtype=torch.float32
    )
    peft = PeftModel.from_pretrained(model, str(full / "adapter")).merge_and_unload()
    assert torch.allclose(
        peft.state_dict()["lm_head.weight"], merged["embed_out.weight"], atol=1e-5
    )
    cfg = config(
        root, "lora_regmean", data=str(root / "p.txt"), cache_dir=str(tmp_path)
    )
    for model, name in zip(cfg["models"], ("head-a", "head-b"), strict=True):
        model["model"] = f"{root / 'base'}+{tmp_path / name}"
    out = Path(mergekit_tada.merge(cfg, tmp_path / "r", adapter_only=True, quiet=True))
    assert "lm_head.weight" in adapter_delta(out / "adapter")
