"""lora_regmean against a dense oracle from the paper: each model's module
inputs captured from PEFT's merged model (base + adapter t), one prompt at
a time (no padding), Grams formed densely, the closed form by pseudo-inverse."""

import json
import shutil
from pathlib import Path

import oracles
import pytest
import torch
from conftest import adapter_delta, assert_adapter_matches_model, rel_err

import mergekit_tada
from mergekit_tada.errors import TadaError

PROMPTS = {
    "lora-task": [
        f"question {i}: which of these is a cat or a dog?" for i in range(12)
    ],
    "lora-domain": [
        f"entry {i}. the enzyme binds the substrate at pH {i}" for i in range(9)
    ],
}


def write_prompts(folder: Path, name: str, texts) -> str:
    path = folder / f"{name}.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return str(path)


def regmean_config(data: dict, **params) -> dict:
    return {
        "merge_method": "lora_regmean",
        "base_model": "./base",
        "models": [
            {"model": f"./base+./{name}", "parameters": {"data": path, **extra}}
            for name, (path, extra) in data.items()
        ],
        "parameters": {"rank": 10, "cache_dir": "cache", **params},
        "dtype": "float32",
    }


def model_inputs(adapter: str | None, texts) -> dict[str, torch.Tensor]:
    """Every linear's inputs (tokens x d_in) in base + adapter, PEFT-merged,
    one unpadded prompt at a time, tokenised as the merge does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained("base", dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained("base")
    rows: dict[str, list] = {}
    hooks = [
        m.register_forward_hook(
            lambda _m, i, _o, n=name: rows.setdefault(n, []).append(i[0][0].double())
        )
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    ]
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
            model(**ids)
    for h in hooks:
        h.remove()
    return {n + ".weight": torch.cat(v) for n, v in rows.items()}


def dense_regmean(inputs: dict, alpha: float, weights=None) -> dict:
    """The paper's closed form per module, from each model's own inputs."""
    deltas = {n: adapter_delta(n) for n in inputs}
    out = {}
    for module in set().union(*deltas.values()):
        names = list(inputs)
        grams = [
            oracles.regmean_grams(
                inputs[n][module].T @ inputs[n][module] / len(inputs[n][module]), alpha
            )
            for n in names
        ]
        zero = torch.zeros_like(next(d[module] for d in deltas.values() if module in d))
        updates = [deltas[n].get(module, zero) for n in names]
        out[module] = oracles.least_squares_merge(updates, grams, weights)
    return out


@pytest.mark.parametrize("alpha", [0.9, 0.5])
def test_lora_regmean_model_grams(work, alpha):
    data = {n: (write_prompts(work, n, t), {}) for n, t in PROMPTS.items()}
    out = Path(
        mergekit_tada.merge(regmean_config(data, alpha=alpha), "out", quiet=True)
    )
    written = adapter_delta(out / "adapter")
    inputs = {n: model_inputs(n, t) for n, t in PROMPTS.items()}
    expected = dense_regmean(inputs, alpha)
    for module, delta in written.items():
        assert rel_err(delta, expected[module]) < 1e-4, module
    assert_adapter_matches_model(out)
    report = json.loads((out / "merge_report.json").read_text())["training"]["regmean"]
    assert report["grams"] == "model" and report["prompts"] == {
        f"./base+./{n}": len(t) for n, t in PROMPTS.items()
    }


def dense_regmean_plusplus(texts: dict, alpha: float, weights=None) -> dict:
    """RegMean++ from the paper as a plain loop over transformers' own decoder
    layers (oracles.regmean_plusplus): dense dW, one unpadded prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained("base", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained("base")
    layers = model.model.layers
    states = {}
    for name, prompts in texts.items():
        states[name] = []
        for text in prompts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
            got = {}
            handle = layers[0].register_forward_pre_hook(
                lambda _m, a, kw, got=got: got.update(a=a, kw=kw),
                with_kwargs=True,
            )
            with torch.no_grad():
                model(**ids, use_cache=False)  # no cache for the blocks to extend
            handle.remove()
            assert got["a"], "the block's hidden states come first, positionally"
            states[name].append((got["a"][0], (got["a"][1:], got["kw"])))

    def run_block(index, dws, state, seen):
        h, (args, kw) = state
        layer = layers[index]
        linears = {
            f"model.layers.{index}.{n}.weight": m
            for n, m in layer.named_modules()
            if isinstance(m, torch.nn.Linear)
        }
        saved = {k: m.weight.detach().clone() for k, m in linears.items()}
        hooks = [
            m.register_forward_hook(
                lambda _m, i, _o, k=k: seen.setdefault(k, []).append(i[0][0].double())
            )
            for k, m in linears.items()
        ]
        with torch.no_grad():
            for k, m in linears.items():
                if k in dws:
                    m.weight += dws[k].float()
            out = layer(h, *args, **kw)
            for k, m in linears.items():
                m.weight.copy_(saved[k])
        for handle in hooks:
            handle.remove()
        return (out[0] if isinstance(out, tuple) else out), (args, kw)

    deltas = {n: adapter_delta(n) for n in texts}
    return oracles.regmean_plusplus(
        len(layers), states, deltas, alpha, run_block, weights
    )


@pytest.mark.parametrize("weights", [None, (0.7, 1.2)])
def test_lora_regmean_plusplus_against_the_papers_loop(work, weights):
    data = {
        n: (write_prompts(work, n, t), {"weight": w} if weights else {})
        for (n, t), w in zip(PROMPTS.items(), weights or (1, 1), strict=True)
    }
    config = regmean_config(data, grams="merged")
    out = Path(mergekit_tada.merge(config, "out", quiet=True))
    written = adapter_delta(out / "adapter")
    expected = dense_regmean_plusplus(PROMPTS, 0.9, list(weights) if weights else None)
    plain = dense_regmean({n: model_inputs(n, t) for n, t in PROMPTS.items()}, 0.9)
    for module, delta in written.items():
        print(
            module,
            rel_err(delta, expected[module]),
            rel_err(delta, plain[module]),
            rel_err(expected[module], plain[module]),
        )
    for module, delta in written.items():
        assert rel_err(delta, expected[module]) < 1e-4, module
    # past the first block RegMean++ is not RegMean
    deep = "model.layers.2.self_attn.q_proj.weight"
    assert rel_err(expected[deep], plain[deep]) > 1e-3
    assert_adapter_matches_model(out)
    report = json.loads((out / "merge_report.json").read_text())["training"]["regmean"]
    assert report["grams"] == "merged"


def test_regmean_plusplus_skips_what_it_does_not_read(work, monkeypatch):
    """RegMean++'s run of each model's block (outputs dropped) ends once every
    LoRA'd module of the block has read its input: the block's last linear
    (down_proj, 64 inputs on the toy) computes there for chunk 0 only (which
    learns the block's calls), and for every chunk in the merged block's run.
    The R_t are the bits of the whole forward."""
    from mergekit_tada.adapters import LoraAdapter
    from mergekit_tada.batches import make_batches, tokenizer_for
    from mergekit_tada.probe import grams

    adapters = {n: LoraAdapter(n) for n in PROMPTS}
    batches = {
        n: make_batches(tokenizer_for("base"), t, 64, 4) for n, t in PROMPTS.items()
    }
    chunks = sum(len(b) for b in batches.values())
    weights = {(t, m): 0.5 for t, a in adapters.items() for m in a.modules}
    calls = []

    def count(module, _inputs, _output):
        if isinstance(module, torch.nn.Linear) and module.in_features == 64:
            calls.append(module)

    def run() -> dict:
        calls.clear()
        handle = torch.nn.modules.module.register_module_forward_hook(count)
        try:
            return grams.gram_pass(
                "base", batches, adapters, 0.9, True, merged_weights=weights, quiet=True
            )
        finally:
            handle.remove()

    early = run()
    assert chunks == 6 and len(calls) == 3 * (1 + chunks)  # 3 blocks
    monkeypatch.setattr(grams._Accumulator, "_all_read", lambda self, module: False)
    whole = run()
    assert len(calls) == 3 * 2 * chunks
    assert early.keys() == whole.keys()
    assert all(torch.equal(early[k], whole[k]) for k in early)


def test_lora_regmean_base_grams_and_weights(work):
    data = {
        "lora-task": (
            write_prompts(work, "lora-task", PROMPTS["lora-task"]),
            {"weight": 0.7},
        ),
        "lora-domain": (
            write_prompts(work, "lora-domain", PROMPTS["lora-domain"]),
            {"weight": 1.2},
        ),
    }
    out = Path(
        mergekit_tada.merge(regmean_config(data, grams="base"), "out", quiet=True)
    )
    written = adapter_delta(out / "adapter")
    inputs = {n: model_inputs(None, t) for n, t in PROMPTS.items()}
    expected = dense_regmean(inputs, 0.9, [0.7, 1.2])
    for module, delta in written.items():
        assert rel_err(delta, expected[module]) < 1e-4, module


def test_copies_of_one_adapter_return_it(work):
    """One adapter merged with a copy of itself on different texts: itself."""
    shutil.copytree("lora-task", "lora-copy")
    data = {
        "lora-task": (write_prompts(work, "a", PROMPTS["lora-task"]), {}),
        "lora-copy": (write_prompts(work, "b", PROMPTS["lora-domain"]), {}),
    }
    out = Path(mergekit_tada.merge(regmean_config(data, rank=8), "out", quiet=True))
    original = adapter_delta("lora-task")
    for module, delta in adapter_delta(out / "adapter").items():
        assert rel_err(delta, original[module]) < 1e-4, module


def test_shared_text_gives_the_weighted_mean_where_no_adapter_changes_the_input(work):
    """On one text, layer 0's attention inputs are the same in every model, so
    RegMean is the mean sum_t w_t dW_t / T there (and not deeper)."""
    path = write_prompts(work, "shared", PROMPTS["lora-task"])
    data = {
        "lora-task": (path, {"weight": 1.0}),
        "lora-domain": (path, {"weight": 0.5}),
    }
    out = Path(mergekit_tada.merge(regmean_config(data), "out", quiet=True))
    written = adapter_delta(out / "adapter")
    task, domain = adapter_delta("lora-task"), adapter_delta("lora-domain")
    name = "model.layers.0.self_attn.q_proj.weight"
    mean = (task[name] + 0.5 * domain[name]) / 2
    assert rel_err(written[name], mean) < 1e-4
    deep = "model.layers.2.self_attn.q_proj.weight"
    assert rel_err(written[deep], (task[deep] + 0.5 * domain[deep]) / 2) > 1e-2


def test_deterministic_cached_and_thread_independent(work):
    data = {n: (write_prompts(work, n, t), {}) for n, t in PROMPTS.items()}
    config = regmean_config(data)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = Path(mergekit_tada.merge(config, "a", quiet=True, adapter_only=True))
        torch.set_num_threads(2)
        config["parameters"]["cache_dir"] = "cache2"
        b = Path(mergekit_tada.merge(config, "b", quiet=True, adapter_only=True))
        c = Path(mergekit_tada.merge(config, "c", quiet=True, adapter_only=True))
    finally:
        torch.set_num_threads(threads)
    files = [p / "adapter/adapter_model.safetensors" for p in (a, b, c)]
    assert files[0].read_bytes() == files[1].read_bytes() == files[2].read_bytes()
    hits = [
        json.loads((p / "merge_report.json").read_text())["training"]["regmean"][
            "cache_hit"
        ]
        for p in (b, c)
    ]
    assert hits == [False, True]


@pytest.mark.parametrize("damage", ["zeros", "nan"])
def test_a_damaged_gram_cache_entry_is_recomputed(work, caplog, damage):
    """Bytes changed in place (same size, valid header) are caught by the
    entry's digest: one warning, a fresh pass, the same adapter."""
    import numpy as np

    data = {n: (write_prompts(work, n, t), {}) for n, t in PROMPTS.items()}
    config = regmean_config(data)
    a = Path(mergekit_tada.merge(config, "a", quiet=True, adapter_only=True))
    (entry,) = Path("cache").glob("regmean-*.safetensors")
    raw = bytearray(entry.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    span = slice(header + 64, header + 64 + 4000)
    if damage == "zeros":
        raw[span] = bytes(4000)
    else:
        raw[span] = np.full(1000, np.nan, dtype=np.float32).tobytes()
    entry.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        b = Path(mergekit_tada.merge(config, "b", quiet=True, adapter_only=True))
    assert any("ignoring damaged cache entry" in r.getMessage() for r in caplog.records)
    report = json.loads((b / "merge_report.json").read_text())["training"]["regmean"]
    assert report["cache_hit"] is False
    assert (a / "adapter/adapter_model.safetensors").read_bytes() == (
        b / "adapter/adapter_model.safetensors"
    ).read_bytes()


def test_generate_writes_texts_per_model(work):
    data = {n: ("generate", {}) for n in PROMPTS}
    config = regmean_config(data, samples=6, generate_length=12)
    a = Path(mergekit_tada.merge(config, "a", quiet=True, adapter_only=True))
    report = json.loads((a / "merge_report.json").read_text())["training"]["regmean"]
    assert all(0 < n <= 6 for n in report["prompts"].values())
    assert len(list(Path("cache").glob("texts-*.json"))) == 2
    b = Path(mergekit_tada.merge(config, "b", quiet=True, adapter_only=True))
    assert (a / "adapter/adapter_model.safetensors").read_bytes() == (
        b / "adapter/adapter_model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing", "does not exist"),
        ("empty", "lora_regmean: data of ./base+./lora-task"),
        ("latin1", "is not UTF-8"),
        ("alpha", "alpha must be in [0, 1]"),
        (
            "mixed",
            "model(s) ./base+./lora-domain need parameters: {data: path} (the others have data)",
        ),
        ("singular", "singular with alpha=1.0: lower alpha"),
        ("pico", "lora_regmean: pico is not supported"),
    ],
)
def test_bad_input_names_key_and_file(work, case, fragment):
    good = write_prompts(work, "good", PROMPTS["lora-task"])
    data = {"lora-task": (good, {}), "lora-domain": (good, {})}
    params = {}
    if case == "missing":
        data["lora-task"] = ("nope.txt", {})
    elif case == "empty":
        Path("empty.txt").write_text("\n\n")
        data["lora-task"] = ("empty.txt", {})
    elif case == "latin1":
        Path("latin.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
        data["lora-task"] = ("latin.txt", {})
    elif case == "alpha":
        params["alpha"] = 1.5
    elif case == "pico":
        params["pico"] = True
    elif case == "singular":
        data = {n: (write_prompts(work, "short", ["hi"]), {}) for n in PROMPTS}
        params["alpha"] = 1.0
    config = regmean_config(data, **params)
    if case == "mixed":
        del config["models"][1]["parameters"]["data"]
    with pytest.raises(TadaError) as info:
        mergekit_tada.merge(config, "out", quiet=True)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
    assert not Path("out/adapter").exists()


def test_a_feature_that_is_always_zero_takes_the_mean(work):
    """A norm weight of 0 makes one input feature 0 on every token: the Grams
    are singular there, the merge solves the rest and takes the models' mean
    column for that feature (and stays the oracle's elsewhere)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(Path("base").resolve(), "base-dead")
    path = Path("base-dead/model.safetensors")
    tensors = load_file(path)
    key = "model.layers.1.input_layernorm.weight"
    tensors[key][0] = 0.0
    save_file(tensors, path, metadata={"format": "pt"})
    data = {n: (write_prompts(work, n, t), {}) for n, t in PROMPTS.items()}
    config = regmean_config(data)
    config["base_model"] = "./base-dead"
    for m in config["models"]:
        m["model"] = m["model"].replace("./base+", "./base-dead+")
    out = Path(mergekit_tada.merge(config, "out", quiet=True, adapter_only=True))
    written = adapter_delta(out / "adapter")
    name = "model.layers.1.self_attn.q_proj.weight"
    task, domain = adapter_delta("lora-task"), adapter_delta("lora-domain")
    mean = (task[name][:, 0] + domain[name][:, 0]) / 2
    assert rel_err(written[name][:, 0], mean) < 1e-4
    assert torch.isfinite(written[name]).all()


def test_gram_sum_in_upper_triangle_slabs_is_the_full_gram():
    """The pass forms only the upper triangle of each Gram, in slabs of SLAB
    columns and ROWS tokens (the tiny models' inputs fit in one slab: this
    takes several of each); mirrored, it is X^T X, built independently here
    in float64."""
    from mergekit_tada.probe.grams import ROWS, SLAB, add_upper_gram, mirror_upper

    torch.manual_seed(0)
    d = 2 * SLAB + 37
    x = torch.randn(ROWS + 101, d)
    total = torch.zeros(d, d, dtype=torch.float64)
    add_upper_gram(total, x, 0.5)
    slab = torch.arange(d) // SLAB
    below = slab[:, None] > slab[None, :]  # below the diagonal slabs: not formed
    assert below.any() and not total[below].any()
    mirror_upper(total)
    expected = 0.5 * x.double().T @ x.double()
    assert torch.equal(total, total.T)
    assert rel_err(total, expected) < 1e-6
