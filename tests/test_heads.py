"""Classification adapters (PEFT SEQ_CLS, TOKEN_CLS, QUESTION_ANS: a LoRA and
a head in modules_to_save).

The LoRAs merge as any others; each input keeps its own head, written beside
the merged adapter as an adapter of its task model. The reference is formed
explicitly from the input files (dW = sum_t s_t B_t A_t, each head as saved)
and run as a plain transformers model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mergekit_tada
from mergekit_tada.adapters import head_task_model
from mergekit_tada.errors import TadaError
from mergekit_tada.toy import build_encoder, build_llama, build_lora

LABELS = {"lora-a": 3, "lora-b": 4}
IDS = torch.tensor([[2, 5, 7, 9, 11, 3], [4, 6, 8, 10, 12, 3]])


def explicit_update(adapter: Path) -> dict[str, torch.Tensor]:
    """module (as the adapter names it) -> s B A, from the files."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    weights = load_file(adapter / "adapter_model.safetensors")
    scaling = config["lora_alpha"] / config["r"]
    out = {}
    for key, A in weights.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(
                ".lora_A.weight"
            )
            B = weights[key.replace("lora_A", "lora_B")]
            out[module] = scaling * B.double() @ A.double()
    return out


def head(adapter: Path) -> dict[str, torch.Tensor]:
    weights = load_file(adapter / "adapter_model.safetensors")
    return {
        k.removeprefix("base_model.model."): v
        for k, v in weights.items()
        if ".lora_" not in k
    }


def model_type(root: Path) -> str:
    return json.loads((root / "base" / "config.json").read_text())["model_type"]


def task_model(base: Path, labels: int, task_type: str = "SEQ_CLS"):
    """transformers' task model of ``task_type`` on ``base`` (a new head)."""
    return head_task_model(task_type).from_pretrained(
        str(base), dtype=torch.float32, num_labels=labels
    )


def build_classifiers(arch: str, task_type: str = "SEQ_CLS") -> None:
    """A base and two classifier adapters (SEQ_CLS: of 3 and 4 classes; BERT's
    saved under the task model's ``bert.`` names, the checkpoint's without)."""
    if arch == "bert":
        build_encoder("base", "bert")
        targets = (("query", "value", "dense"), ("query", "key", "dense"))
    else:
        build_llama("base", seed=3)
        targets = (("q_proj", "v_proj", "down_proj"), ("q_proj", "k_proj", "down_proj"))
    # other targets, other ranks: the written adapters have a rank_pattern
    for seed, (name, labels) in enumerate(LABELS.items(), start=1):
        build_lora(
            "base",
            name,
            r=2 + seed,
            seed=seed,
            targets=targets[seed - 1],
            task_type=task_type,
            num_labels=classes(task_type, labels),
        )


def classes(task_type: str, labels: int) -> int:
    """A question-answering head has two: the answer's start and end."""
    return 2 if task_type == "QUESTION_ANS" else labels


@pytest.fixture(params=["bert", "llama"])
def classifiers(request, tmp_path) -> Path:
    """build_classifiers' SEQ_CLS pair in tmp_path."""
    os.chdir(tmp_path)
    build_classifiers(request.param)
    return tmp_path


def config(*names: str) -> dict:
    return {
        "merge_method": "lora_task_arithmetic",
        "base_model": "base",
        "models": [{"model": f"base+{n}"} for n in names],
        "parameters": {"lossless": True},
        "dtype": "float32",
    }


def plain_adapter(root: Path) -> str:
    """lora-plain: a LoRA on lora-a's modules without a head, on the model the
    base's checkpoint is (BertModel; LlamaForCausalLM)."""
    targets = json.loads((root / "lora-a" / "adapter_config.json").read_text())
    return build_lora(
        "base",
        "lora-plain",
        r=2,
        seed=9,
        targets=targets["target_modules"],
        task_type=None if model_type(root) == "bert" else "CAUSAL_LM",
    )


def with_data(cfg: dict, data: str | None = None, **params) -> dict:
    """``cfg`` with ``params`` and a prompts file per model (``data``, or
    ``<adapter>.txt``): what lambda: auto reads."""
    cfg["parameters"] = params
    for model in cfg["models"]:
        model["parameters"] = {"data": data or f"{model['model'].split('+')[1]}.txt"}
    return cfg


# LlamaForQuestionAnswering keeps its decoder under transformer., which
# transformers does not load a LlamaForCausalLM checkpoint into: no QA adapter
# is trained on such a base
KINDS = [
    ("bert", "SEQ_CLS"),
    ("bert", "TOKEN_CLS"),
    ("bert", "QUESTION_ANS"),
    ("llama", "SEQ_CLS"),
    ("llama", "TOKEN_CLS"),
]


def outputs(model, ids: torch.Tensor) -> torch.Tensor:
    """A task model's logits (a QA model's start and end logits, stacked)."""
    with torch.no_grad():
        out = model(ids)
    if hasattr(out, "start_logits"):
        return torch.stack([out.start_logits, out.end_logits])
    return out.logits


@pytest.mark.parametrize(("arch", "task_type"), KINDS)
def test_each_input_keeps_its_head(arch, task_type, tmp_path):
    from peft import PeftModel

    os.chdir(tmp_path)
    build_classifiers(arch, task_type)
    out = Path(mergekit_tada.merge(config(*LABELS), "out", quiet=True))
    total: dict[str, torch.Tensor] = {}
    for name in LABELS:
        for module, delta in explicit_update(tmp_path / name).items():
            total[module] = total.get(module, 0) + delta
    assert total
    for name, labels in LABELS.items():
        labels = classes(task_type, labels)
        reference = task_model(tmp_path / "base", labels, task_type).eval()
        state = reference.state_dict()
        for module, delta in total.items():
            key = f"{module}.weight"
            state[key] = (state[key].double() + delta).float()
        own = head(tmp_path / name)
        assert own and all(k in state for k in own)
        state.update(own)
        reference.load_state_dict(state)
        folder = out / "adapter" / name
        written = json.loads((folder / "adapter_config.json").read_text())
        saved = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert written["task_type"] == task_type and written["rank_pattern"]
        assert written["modules_to_save"] == saved["modules_to_save"]
        merged = PeftModel.from_pretrained(
            task_model(tmp_path / "base", labels, task_type).eval(), folder
        )
        expected, got = outputs(reference, IDS), outputs(merged, IDS)
        assert expected.shape[-1] == (
            IDS.shape[1] if task_type == "QUESTION_ANS" else labels
        )
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), (got, expected)
        # the head decides: another input's head gives other logits
        fresh = task_model(tmp_path / "base", labels, task_type).eval()
        assert not torch.allclose(expected, outputs(fresh, IDS))
    root = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert root["task_type"] is None and "modules_to_save" not in root
    report = json.loads((out / "merge_report.json").read_text())
    assert sorted(report["settings"]["head_adapters"].values()) == [
        "adapter/lora-a",
        "adapter/lora-b",
    ]


def test_the_merged_adapter_is_the_encoder(classifiers):
    """adapter/ holds no head and names modules as the base's checkpoint: on
    the base as saved it gives the full model mergekit wrote."""
    import transformers
    from peft import PeftModel

    out = Path(mergekit_tada.merge(config(*LABELS), "out", quiet=True))
    keys = load_file(out / "adapter" / "adapter_model.safetensors")
    assert keys and not any("classifier" in k or "score" in k for k in keys)
    saved = json.loads((classifiers / "base" / "config.json").read_text())
    auto = getattr(transformers, saved["architectures"][0])  # the class saved
    base = auto.from_pretrained("base", dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(input_ids=IDS)[0]
    full = auto.from_pretrained(str(out), dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, out / "adapter")
    with torch.no_grad():
        a, b = peft(input_ids=IDS)[0], full(input_ids=IDS)[0]
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, before, rtol=1e-3, atol=1e-4)


def test_a_plain_input_beside_a_classifier(classifiers):
    """Only inputs with a head get a head adapter."""
    plain = plain_adapter(classifiers)
    out = Path(mergekit_tada.merge(config("lora-a", plain), "out", quiet=True))
    assert sorted(p.name for p in (out / "adapter").iterdir() if p.is_dir()) == [
        "lora-a"
    ]


def test_a_copy_of_a_base_module_is_refused(classifiers):
    cfg = json.loads((classifiers / "lora-a" / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["classifier", "score", "word_embeddings", "embed_tokens"]
    (classifiers / "lora-a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        TadaError,
        match=r"lora-a/adapter_config.json: modules_to_save names (word_embeddings|embed_tokens), a module of the base",
    ):
        mergekit_tada.merge(config(*LABELS), "out", quiet=True, adapter_only=True)
    assert not Path("out").exists()


PROMPTS = {  # of several lengths: the pass pads its batches
    "lora-a": [f"the protein {i} binds" + " the cell" * (i % 3) for i in range(5)],
    "lora-b": [f"a gene {i} and" + " the receptor" * (i % 2) for i in range(4)],
}


@pytest.mark.parametrize(("arch", "task_type"), KINDS)
def test_lambda_auto_on_the_heads(arch, task_type, tmp_path):
    """auto_objective: head against transformers' own task models, one
    unpadded prompt at a time: per candidate the share of decisions (a
    prompt's class, each token's class, a prompt's answer start and end) the
    merge makes as model t (model t's head on both), then the mean KL."""
    from mergekit_tada.batches import tokenizer_for
    from mergekit_tada.probe.agreement import GRID

    os.chdir(tmp_path)
    build_classifiers(arch, task_type)
    for name, prompts in PROMPTS.items():
        Path(f"{name}.txt").write_text("\n".join(prompts) + "\n")
    cfg = with_data(config(*LABELS), lossless=True, auto_objective="head")
    cfg["parameters"]["lambda"] = "auto"
    out = Path(mergekit_tada.merge(cfg, "out", quiet=True, adapter_only=True))
    search = json.loads((out / "merge_report.json").read_text())["training"][
        "scale_search"
    ]
    assert search["objective"] == "head"

    updates = {n: explicit_update(tmp_path / n) for n in LABELS}
    total: dict[str, torch.Tensor] = {}
    for update in updates.values():
        for module, delta in update.items():
            total[module] = total.get(module, 0) + delta
    tokenizer = tokenizer_for("base")

    def classifier(name: str, update: dict[str, torch.Tensor], scale: float):
        model = task_model(
            tmp_path / "base", classes(task_type, LABELS[name]), task_type
        )
        state = model.state_dict()
        for module, delta in update.items():
            key = f"{module}.weight"
            state[key] = (state[key].double() + scale * delta).float()
        state.update(head(tmp_path / name))
        model.load_state_dict(state)
        return model.eval()

    def log_probs(model, prompts) -> list[torch.Tensor]:
        """Per prompt, a row of log-probabilities per decision."""
        rows = []
        for p in prompts:
            with torch.no_grad():
                out = model(**tokenizer(p, return_tensors="pt"))
            if task_type == "QUESTION_ANS":
                logits = torch.cat([out.start_logits, out.end_logits])
            else:  # a prompt's classes (1 x k), or each token's (n x k)
                logits = out.logits[0] if task_type == "TOKEN_CLS" else out.logits
            rows.append(torch.log_softmax(logits.double(), -1))
        return rows

    own = {n: log_probs(classifier(n, updates[n], 1.0), PROMPTS[n]) for n in LABELS}
    assert all(len(r) > 1 for r in own["lora-a"]) == (task_type != "SEQ_CLS")
    expected = {}
    for scale in GRID:
        agreement, kl = [], []
        for name in LABELS:
            merged = log_probs(classifier(name, total, scale), PROMPTS[name])
            count = sum(len(p) for p in own[name])
            same = sum(
                int((p.argmax(-1) == q.argmax(-1)).sum())
                for p, q in zip(own[name], merged, strict=True)
            )
            divergence = sum(
                float((p.exp() * (p - q)).sum())
                for p, q in zip(own[name], merged, strict=True)
            )
            agreement.append(same / count)
            kl.append(divergence / count)
        expected[scale] = (sum(agreement) / 2, sum(kl) / 2)
        got = search["candidates"][str(scale)]
        # the report rounds to 6 digits; one decision moves it by 1/count
        assert got["agreement"] == pytest.approx(expected[scale][0], abs=1e-6)
        assert got["kl"] == pytest.approx(expected[scale][1], rel=1e-4, abs=1e-9)
    # the objective differs between candidates, so the choice means something
    assert len({round(v[1], 6) for v in expected.values()}) == len(GRID)
    best = min(GRID, key=lambda c: (-expected[c][0], expected[c][1], GRID.index(c)))
    assert search["chosen"] == best


def test_the_heads_objective_needs_every_head(classifiers):
    Path("p.txt").write_text("\n".join(PROMPTS["lora-a"]) + "\n")
    plain_adapter(classifiers)
    cfg = with_data(config("lora-a", "lora-plain"), "p.txt", auto_objective="head")
    with pytest.raises(
        TadaError,
        match=r"auto_objective: head reads each model's classifier head "
        r".*lora-plain is not one",
    ):
        mergekit_tada.merge(cfg, "out", quiet=True, adapter_only=True)


def test_a_classifier_in_an_adapter_library(classifiers):
    """Retrieval's library takes a classifier as the merge does: its modules
    read under the checkpoint's names (what composing merges)."""
    from mergekit_tada.loading import HeaderIndex
    from mergekit_tada.retrieval.index import check_entry
    from mergekit_tada.retrieval.library import LibraryEntry

    entry = LibraryEntry(name="a", path="lora-a", samples="p.txt")
    adapter = check_entry(entry, HeaderIndex("base"), "base")
    assert adapter.heads and adapter.modules
    keys = HeaderIndex("base").index.tensor_paths
    assert all(f"{m}.weight" in keys for m in adapter.modules)


def test_a_head_that_misses_a_weight_of_the_classifier(tmp_path):
    """DistilBERT's classifier reads a pre_classifier, which PEFT's SEQ_CLS
    saves with the classifier (modules_to_save match by name ending): an
    adapter without it (rewritten by hand here) still merges, and the head
    objective, which cannot run its classifier, says so in one line."""
    from safetensors.torch import save_file

    os.chdir(tmp_path)
    build_encoder("base", "distilbert")
    for seed, name in enumerate(LABELS, start=1):
        build_lora(
            "base",
            name,
            r=2,
            seed=seed,
            targets=("q_lin", "v_lin"),
            task_type="SEQ_CLS",
        )
        Path(f"{name}.txt").write_text("\n".join(PROMPTS[name]) + "\n")
    weights = load_file("lora-a/adapter_model.safetensors")
    assert "base_model.model.pre_classifier.weight" in weights
    kept = {k: v for k, v in weights.items() if "pre_classifier" not in k}
    save_file(kept, "lora-a/adapter_model.safetensors", metadata={"format": "pt"})
    cfg = config(*LABELS)
    out = Path(mergekit_tada.merge(cfg, "out", quiet=True, adapter_only=True))
    assert (out / "adapter" / "lora-a" / "adapter_model.safetensors").exists()
    with_data(cfg, auto_objective="head")
    with pytest.raises(
        TadaError,
        match=r"lora-a/adapter_model.safetensors: DistilBertForSequenceClassification's "
        r"pre_classifier.weight is in neither the base nor the adapter",
    ):
        mergekit_tada.merge(cfg, "out2", quiet=True, adapter_only=True)


def saved_as(source: str, name: str, task_type: str) -> None:
    """A copy of adapter ``source`` at ``name`` whose config says ``task_type``."""
    import shutil

    shutil.copytree(source, name)
    saved = json.loads(Path(f"{name}/adapter_config.json").read_text())
    Path(f"{name}/adapter_config.json").write_text(
        json.dumps(saved | {"task_type": task_type})
    )


def test_classifiers_default_to_their_heads(classifiers):
    """Where every model is a sequence classifier, lambda: auto (task
    arithmetic's default given data) compares the heads' decisions; token
    classifiers compare every token; both on 64 prompts per model. With one
    model without a head, every token on 16."""
    lines = [f"the protein {i} binds the cell" for i in range(70)]
    Path("many.txt").write_text("\n".join(lines) + "\n")

    def search(*names: str) -> dict:
        cfg = with_data(config(*names), "many.txt")
        out = Path(mergekit_tada.merge(cfg, "out", quiet=True, adapter_only=True))
        report = json.loads((out / "merge_report.json").read_text())
        return report["training"]["scale_search"]

    found = search(*LABELS)
    assert found["by_default"] and found["objective"] == "head"
    assert found["prompts"] == dict.fromkeys(found["prompts"], 64)
    assert set(found["candidates"]["1.0"]) == {"agreement", "kl"}
    for name in LABELS:
        saved_as(name, f"tok-{name}", "TOKEN_CLS")
    found = search(*(f"tok-{name}" for name in LABELS))
    assert found["by_default"] and found["objective"] in ("kl", "hidden_states")
    assert found["prompts"] == dict.fromkeys(found["prompts"], 64)
    plain_adapter(classifiers)
    found = search("lora-a", "lora-plain")
    assert found["objective"] in ("kl", "hidden_states")
    assert found["prompts"] == dict.fromkeys(found["prompts"], 16)


def test_each_model_is_read_by_its_own_task_model(tmp_path):
    """A sequence and a token classifier merge; the head objective reads each
    with its own task model. One adapter saved as both kinds (BERT's: the
    same layout; Llama's token head has a bias): the pair's objective is the
    mean of each kind's alone, where the merge is the same."""
    import shutil

    os.chdir(tmp_path)
    build_classifiers("bert")
    for name, kind in (
        ("seq", "SEQ_CLS"),
        ("tok-1", "TOKEN_CLS"),
        ("tok-2", "TOKEN_CLS"),
    ):
        saved_as("lora-a", name, kind)
    Path("p.txt").write_text("\n".join(PROMPTS["lora-a"]) + "\n")

    def search(*names: str) -> dict:
        cfg = with_data(config(*names), "p.txt", auto_objective="head")
        cfg["parameters"]["lambda"] = "auto"
        out = Path(mergekit_tada.merge(cfg, "out", quiet=True, adapter_only=True))
        report = json.loads((out / "merge_report.json").read_text())
        written = {
            n: json.loads((out / "adapter" / n / "adapter_config.json").read_text())
            for n in names
        }
        assert {n: w["task_type"] for n, w in written.items()} == {
            n: "TOKEN_CLS" if n.startswith("tok") else "SEQ_CLS" for n in names
        }
        shutil.rmtree(out)
        found = report["training"]["scale_search"]
        assert found["objective"] == "head"
        return found["candidates"]

    sequences, tokens = search("lora-a", "seq"), search("tok-1", "tok-2")
    mixed = search("seq", "tok-1")
    assert sequences != tokens
    for c, got in mixed.items():
        for key in ("agreement", "kl"):
            mean = (sequences[c][key] + tokens[c][key]) / 2
            assert got[key] == pytest.approx(mean, rel=2e-6, abs=1e-6), (c, key)
