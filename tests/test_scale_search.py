"""lambda: auto against an independent computation: transformers' own models
(PEFT merge_and_unload for each adapter; the base plus c times the merged
update for each candidate), one unpadded prompt at a time, the objective
written from its definition (KL of next-token distributions)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import adapter_delta, rel_err
from family import INPUTS, family_config

import mergekit_tada
from mergekit_tada.errors import TadaError
from mergekit_tada.probe.agreement import GRID

PROMPTS = {
    "lora-task": [f"question {i}: which of these is a cat or a dog?" for i in range(7)],
    "lora-domain": [
        f"entry {i}. the enzyme binds the substrate at pH {i}" for i in range(5)
    ],
    "lora-third": [f"the answer to question {i} is then explained" for i in range(6)],
}


def with_data(config: dict) -> dict:
    for model, name in zip(config["models"], INPUTS, strict=True):
        path = Path(f"{name}.txt")
        path.write_text("\n".join(PROMPTS[name]) + "\n", encoding="utf-8")
        model["parameters"]["data"] = str(path)
    return config


def mean_kl(scales, merged: dict) -> dict:
    """mean over models of the mean over t's tokens of KL(p_t || p_c)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained("base")
    base = AutoModelForCausalLM.from_pretrained("base", dtype=torch.float32).eval()
    W0 = {k: v.clone() for k, v in base.state_dict().items()}
    out = {c: 0.0 for c in scales}
    for name, texts in PROMPTS.items():
        own = (
            PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained("base", dtype=torch.float32), name
            )
            .merge_and_unload()
            .eval()
        )
        ids = [
            tokenizer(t, return_tensors="pt", truncation=True, max_length=128)
            for t in texts
        ]
        with torch.no_grad():
            ref = [torch.log_softmax(own(**i).logits[0].double(), -1) for i in ids]
            for c in scales:
                base.load_state_dict(
                    {k: W0[k] + c * merged[k] if k in merged else W0[k] for k in W0}
                )
                total, tokens = 0.0, 0
                for i, log_p in zip(ids, ref, strict=True):
                    log_q = torch.log_softmax(base(**i).logits[0].double(), -1)
                    total += float((log_p.exp() * (log_p - log_q)).sum())
                    tokens += log_p.shape[0]
                out[c] += total / tokens / len(PROMPTS)
    return out


@pytest.mark.parametrize(
    "method, key", [("lora_tsv_m", "alpha"), ("lora_task_arithmetic", "lambda")]
)
def test_lambda_auto_scores_every_candidate_and_writes_the_best(three, method, key):
    config = with_data(family_config(method, rank=15, **{key: "auto"}))
    auto = Path(mergekit_tada.merge(config, "auto", quiet=True, adapter_only=True))
    search = json.loads((auto / "merge_report.json").read_text())["training"][
        "scale_search"
    ]
    config["parameters"][key] = 1.0
    one = adapter_delta(
        Path(mergekit_tada.merge(config, "one", quiet=True)) / "adapter"
    )
    expected = mean_kl(GRID, one)
    for c in GRID:
        assert abs(search["candidates"][str(c)] / expected[c] - 1) < 1e-3, c
    best = min(GRID, key=lambda c: expected[c])
    assert search["chosen"] == best and search["key"] == key
    assert search["objective"] == "kl"
    chosen = adapter_delta(auto / "adapter")
    for name, delta in one.items():
        assert rel_err(chosen[name], best * delta) < 1e-4, name


def test_lambda_auto_with_regmean(work):
    from test_regmean import PROMPTS as TEXTS
    from test_regmean import regmean_config, write_prompts

    data = {n: (write_prompts(work, n, t), {}) for n, t in TEXTS.items()}
    out = Path(
        mergekit_tada.merge(
            regmean_config(data, **{"lambda": "auto"}), "out", quiet=True
        )
    )
    report = json.loads((out / "merge_report.json").read_text())["training"]
    assert report["scale_search"]["chosen"] in GRID
    assert report["regmean"]["grams"] == "model"


def test_lambda_auto_without_data_is_one_line(three):
    with pytest.raises(
        TadaError,
        match=r"lora_iso_c: lambda: auto chooses the scale .*missing for ./base\+./lora-task",
    ):
        mergekit_tada.merge(
            family_config("lora_iso_c", rank=6, **{"lambda": "auto"}), "out", quiet=True
        )
    assert not Path("out").exists()
    with pytest.raises(TadaError, match=r"lambda"):
        mergekit_tada.merge(
            family_config("lora_iso_c", rank=6, **{"lambda": "best"}), "out", quiet=True
        )
