"""lambda: auto against an independent computation: transformers' own models
(PEFT merge_and_unload for each adapter; the base plus c times the merged
update for each candidate), one unpadded prompt at a time, the objective
written from its definition (KL of next-token distributions)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import adapter_delta, count_calls, rel_err
from family import INPUTS, family_config

import mergekit_tada
from mergekit_tada.errors import TadaError
from mergekit_tada.probe.agreement import GRID

PROMPTS = {  # of several lengths: batches are padded
    "lora-task": [
        f"question {i}: which of these is a cat or a dog?" + " or a bird" * (i % 3)
        for i in range(7)
    ],
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


def agreement(
    base, own_texts: dict, merged: dict, scales, causal=True, response=False
) -> dict:
    """The objective from its definition, mean over models t: with ``causal``
    the mean over t's tokens of KL(p_t || p_c), else ||H_c - H_t||^2 /
    ||H_t||^2 over the final hidden states; with ``response`` (a causal LM)
    (share of t's prompts whose top next token after the prompt is the same
    under c as under t, mean KL(p_t || p_c) there); model t = PEFT's
    merge_and_unload of adapter t (``own_texts``: adapter folder -> its
    prompts), model c = the base plus c times ``merged`` (weight name -> dense
    update at scale 1)."""
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    auto = AutoModelForCausalLM if causal else AutoModel
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = auto.from_pretrained(str(base), dtype=torch.float32).eval()
    W0 = {k: v.clone() for k, v in model.state_dict().items()}
    from transformers.pytorch_utils import Conv1D

    conv1d = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
    update = {}
    for k, v in W0.items():
        d = merged.get(k, merged.get(k.removeprefix("model.")))
        if d is not None:  # Conv1D weights are in x out
            update[k] = (d.T if k in conv1d else d).to(v.dtype)
    assert update, "no merged weight is a weight of the base"

    def output(m, ids):
        out = m(**ids)
        if causal:
            logp = torch.log_softmax(out.logits[0].double(), -1)
            return logp[-1:] if response else logp
        return out.last_hidden_state[0].double()

    result = dict.fromkeys(scales, 0.0)
    agreed = dict.fromkeys(scales, 0.0)
    for adapter, texts in own_texts.items():
        own = auto.from_pretrained(str(base), dtype=torch.float32)
        own = PeftModel.from_pretrained(own, str(adapter)).merge_and_unload().eval()
        ids = [
            tokenizer(t, return_tensors="pt", truncation=True, max_length=128)
            for t in texts
        ]
        with torch.no_grad():
            ref = [output(own, i) for i in ids]
            norm = sum(r.shape[0] if causal else float(r.square().sum()) for r in ref)
            for c in scales:
                model.load_state_dict({k: W0[k] + c * update.get(k, 0) for k in W0})
                total = same = 0.0
                for i, p in zip(ids, ref, strict=True):
                    q = output(model, i)
                    total += float(
                        (p.exp() * (p - q)).sum() if causal else (q - p).square().sum()
                    )
                    same += float(p.argmax() == q.argmax())
                result[c] += total / norm / len(own_texts)
                agreed[c] += same / norm / len(own_texts)
    if response:
        return {c: (agreed[c], result[c]) for c in scales}
    return result


def assert_chose_the_best(out: Path, one: dict, expected: dict, key: str) -> None:
    """The report's objective at every candidate equals ``expected``, the
    smallest was chosen and the written adapter is it times the merge at 1."""
    search = json.loads((out / "merge_report.json").read_text())["training"][
        "scale_search"
    ]
    for c, value in expected.items():
        got = search["candidates"][str(c)]
        if isinstance(value, tuple):  # response: (agreement, KL)
            assert abs(got["agreement"] - value[0]) < 1e-6, c
            got, value = got["kl"], value[1]
        assert abs(got - value) <= 1e-3 * abs(value) + 1e-9, c  # KL 0: rounding

    def rank(c: float):
        value = expected[c]
        return (-value[0], value[1]) if isinstance(value, tuple) else value

    assert search["chosen"] == min(expected, key=rank)
    assert search["key"] == key
    chosen = adapter_delta(out / "adapter")
    for name, delta in one.items():
        assert rel_err(chosen[name], search["chosen"] * delta) < 1e-4, name


@pytest.mark.parametrize(
    "method, key", [("lora_tsv_m", "alpha"), ("lora_task_arithmetic", "lambda")]
)
def test_lambda_auto_scores_every_candidate_and_writes_the_best(three, method, key):
    config = with_data(family_config(method, rank=15, **{key: "auto"}))
    auto = Path(mergekit_tada.merge(config, "auto", quiet=True, adapter_only=True))
    config["parameters"][key] = 1.0
    one = adapter_delta(
        Path(mergekit_tada.merge(config, "one", quiet=True)) / "adapter"
    )
    expected = agreement("base", PROMPTS, one, GRID)
    assert_chose_the_best(auto, one, expected, key)
    report = json.loads((auto / "merge_report.json").read_text())["training"]
    assert report["scale_search"]["objective"] == "kl"


def peaked_base() -> None:
    """./base as a copy whose next tokens have a clear favourite (the final
    norm x 30): a random tiny model's distributions are nearly flat, and any
    update changes their top token."""
    from safetensors.torch import load_file, save_file

    source = Path("base").resolve()
    Path("base").unlink()
    shutil.copytree(source, "base")
    path = Path("base/model.safetensors")
    weights = load_file(path)
    weights["model.norm.weight"] *= 30
    save_file(weights, path, metadata={"format": "pt"})


def test_lambda_auto_on_the_response(work):
    """auto_objective: response: at each prompt's end only, the share of
    prompts whose top next token is model t's, then the KL there. Two copies
    of one adapter: the merge at 1/2 is each model, and agrees on every
    prompt; elsewhere the top tokens differ on some."""
    peaked_base()
    shutil.copytree("lora-task", "lora-copy")
    texts = {"lora-task": PROMPTS["lora-task"], "lora-copy": PROMPTS["lora-domain"]}
    models = []
    for name, lines in texts.items():
        Path(f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        models.append(
            {"model": f"./base+./{name}", "parameters": {"data": f"{name}.txt"}}
        )
    config = {
        "merge_method": "lora_task_arithmetic",
        "base_model": "./base",
        "models": models,
        "parameters": {"lambda": "auto", "auto_objective": "response", "rank": 8},
        "dtype": "float32",
    }
    auto = Path(mergekit_tada.merge(config, "auto", quiet=True, adapter_only=True))
    config["parameters"]["lambda"] = 1.0
    one = adapter_delta(
        Path(mergekit_tada.merge(config, "one", quiet=True)) / "adapter"
    )
    expected = agreement("base", texts, one, GRID, response=True)
    assert expected[0.5][0] == 1.0
    assert min(v[0] for v in expected.values()) < 0.5  # the agreement decides
    assert_chose_the_best(auto, one, expected, "lambda")
    search = json.loads((auto / "merge_report.json").read_text())["training"][
        "scale_search"
    ]
    assert search["objective"] == "response" and search["chosen"] == 0.5


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


def test_data_without_auto_says_it_is_not_read(three, caplog):
    """data on a rule that reads it only for lambda: auto, lambda left at 1:
    one warning, and the merge is the plain one."""
    config = with_data(family_config("lora_tsv_m", rank=6))
    with caplog.at_level("WARNING"):
        out = Path(mergekit_tada.merge(config, "out", quiet=True, adapter_only=True))
    assert "data is read only by alpha: auto" in caplog.text
    report = json.loads((out / "merge_report.json").read_text())
    assert "scale_search" not in report.get("training", {})


def test_task_arithmetic_with_data_chooses_its_scale_by_default(three, caplog):
    """lora_task_arithmetic, lambda unset: auto where every model gives data
    (it beat lambda 1 on every seed of both benchmarks), 1 where one does not
    (one warning: the prompts are not read), and an explicit number is kept."""
    config = with_data(family_config("lora_task_arithmetic", rank=15))
    assert "lambda" not in config["parameters"]
    default = Path(mergekit_tada.merge(config, "d", quiet=True, adapter_only=True))
    config["parameters"]["lambda"] = "auto"
    auto = Path(mergekit_tada.merge(config, "a", quiet=True, adapter_only=True))
    search = json.loads((default / "merge_report.json").read_text())["training"][
        "scale_search"
    ]
    assert search["by_default"] is True
    assert search["chosen"] != 1.0  # a case where the default changes the merge
    explicit = json.loads((auto / "merge_report.json").read_text())["training"]
    assert explicit["scale_search"]["by_default"] is False
    same = "adapter/adapter_model.safetensors"
    assert (default / same).read_bytes() == (auto / same).read_bytes()

    config["parameters"]["lambda"] = 1.0
    with caplog.at_level("WARNING"):
        one = Path(mergekit_tada.merge(config, "one", quiet=True, adapter_only=True))
    assert "data is read only by lambda: auto" in caplog.text
    caplog.clear()
    del config["parameters"]["lambda"]
    config["models"][1]["parameters"].pop("data")
    with caplog.at_level("WARNING"):
        part = Path(mergekit_tada.merge(config, "p", quiet=True, adapter_only=True))
    assert "data is read only by lambda: auto" in caplog.text
    for out in (one, part):
        report = json.loads((out / "merge_report.json").read_text())
        assert "scale_search" not in report.get("training", {})
    assert (
        adapter_delta(one / "adapter").keys() == adapter_delta(part / "adapter").keys()
    )
    for name, delta in adapter_delta(one / "adapter").items():
        assert torch.equal(delta, adapter_delta(part / "adapter")[name])


def test_lambda_auto_reads_its_objective_from_the_cache(three, monkeypatch, caplog):
    """The objective at every candidate is kept in cache_dir, keyed by what
    the pass reads (adapters, base, token ids, the merge at scale 1, the
    objective): a rerun skips the pass and writes the same bytes; other
    prompts, another objective or another merge run it again; a damaged
    entry is run again after one warning."""
    from mergekit_tada.probe import agreement

    config = with_data(family_config("lora_task_arithmetic", rank=15, cache_dir="c"))
    calls = count_calls(monkeypatch, agreement, "agreement_pass")

    def merged(out: str) -> tuple[dict, bytes]:
        folder = Path(mergekit_tada.merge(config, out, quiet=True, adapter_only=True))
        report = json.loads((folder / "merge_report.json").read_text())
        written = (folder / "adapter/adapter_model.safetensors").read_bytes()
        return report["training"]["scale_search"], written

    first, written = merged("1")
    assert not first["cache_hit"] and len(calls) == 1
    again, same = merged("2")
    assert again["cache_hit"] and len(calls) == 1  # no pass
    assert again["cache_key"] == first["cache_key"] and same == written
    assert again["candidates"] == first["candidates"]

    entry = Path("c") / f"scale-{first['cache_key']}.json"
    entry.write_text(entry.read_text().replace("0", "1", 1))
    with caplog.at_level("WARNING"):
        damaged, same = merged("3")
    assert "ignoring corrupt cache entry" in caplog.text
    assert not damaged["cache_hit"] and len(calls) == 2 and same == written

    config["parameters"]["auto_objective"] = "response"
    other, _ = merged("4")
    config["parameters"]["auto_objective"] = "tokens"
    config["models"][0]["parameters"]["weight"] = 0.5  # another merge at scale 1
    reweighted, _ = merged("5")
    Path(config["models"][1]["parameters"]["data"]).write_text("other words\n")
    reprompted, _ = merged("6")
    keys = {first["cache_key"], other["cache_key"]}
    keys |= {reweighted["cache_key"], reprompted["cache_key"]}
    assert len(keys) == 4 and len(calls) == 5
