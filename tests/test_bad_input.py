"""Bad input: a clear error naming file and module, and nothing that looks finished."""

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    copy_adapter,
    outputs_under_settings,
    rewrite_factors,
    tada_config,
)

import mergekit_tada
from mergekit_tada.errors import TadaError
from mergekit_tada.toy import build_llama, build_lora


def expect_error(config, match, out="out", **kw):
    with pytest.raises(TadaError, match=match):
        mergekit_tada.merge(config, out, quiet=True, **kw)
    out = Path(out)
    # nothing written that looks finished: no report, no adapter, no model config
    for name in ("tada_report.json", "adapter", "config.json", "model.safetensors"):
        assert not (out / name).exists(), name


def with_domain(path: str) -> dict:
    config = tada_config()
    config["models"][1]["model"] = f"./base+./{path}"
    return config


def test_adapter_from_a_different_base(work):
    build_llama("other-base", hidden=48, layers=3, seed=3)
    build_lora("other-base", "lora-other", r=4, seed=4, targets=("q_proj",))
    expect_error(
        with_domain("lora-other"),
        r"lora-other/adapter_model.safetensors: module "
        r"model.layers.0.self_attn.q_proj updates a 48x48 weight.*different base",
    )


def test_adapter_module_missing_from_base(work):
    build_llama("deep-base", layers=5, seed=3)
    build_lora("deep-base", "lora-deep", r=4, seed=4, targets=("q_proj",))
    expect_error(
        with_domain("lora-deep"),
        r"lora-deep/adapter_model.safetensors: module "
        r"model.layers.3.self_attn.q_proj matches no weight",
    )


@pytest.mark.parametrize(
    "roles,match",
    [
        (("task", "task"), "exactly one model must have role 'task'"),
        (("task", None), r"lora-domain needs parameters: \{role: task\}"),
        (("task", "style"), r"got role='style'"),
    ],
)
def test_roles(work, roles, match):
    config = tada_config()
    for model, role in zip(config["models"], roles, strict=True):
        model["parameters"] = {"role": role} if role else {}
    expect_error(config, match)


def test_role_on_a_non_lora_model(work):
    config = tada_config()
    config["models"].append({"model": "./base", "parameters": {"role": "task"}})
    expect_error(config, r"role given to the non-LoRA model ./base")


def test_non_lora_input(work):
    build_llama("other", layers=3, seed=9)
    config = tada_config()
    config["models"][1] = {"model": "./other"}
    expect_error(config, r"model ./other is not a LoRA input")
    config["models"][1]["parameters"] = {"role": "domain"}
    expect_error(
        config,
        r"model ./other in models\[1\] is not a LoRA input: LoRA inputs are written "
        r"base\+adapter",
    )


@pytest.mark.parametrize("rank", [0, -3])
def test_nonpositive_rank(work, rank):
    expect_error(tada_config(rank=rank), r"rank must be a positive integer \(got")


def test_unknown_parameter_is_named(work):
    expect_error(
        tada_config(conflict_treshold=0.2), r"unknown parameter\(s\) conflict_treshold"
    )


def test_bad_gate_mode(work):
    expect_error(
        tada_config(gates="magic"), r"gates must be one of probe, uniform, fixed"
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_factor(work, value):
    path = copy_adapter("lora-domain", "lora-bad")
    B = torch.randn(32, 6)  # down_proj: 64 -> 32
    B[3, 2] = value
    rewrite_factors(path, {"model.layers.2.mlp.down_proj": (torch.randn(6, 64), B)})
    expect_error(
        with_domain("lora-bad"),
        r"lora-bad/adapter_model.safetensors: module "
        r"model.layers.2.mlp.down_proj: lora_B contains NaN or Inf",
    )


def test_truncated_safetensors(work):
    path = copy_adapter("lora-domain", "lora-cut")
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(
        with_domain("lora-cut"),
        r"lora-cut/adapter_model.safetensors: not a readable safetensors",
    )


def test_garbage_safetensors(work):
    path = copy_adapter("lora-domain", "lora-junk")
    (path / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    expect_error(
        with_domain("lora-junk"), r"lora-junk/adapter_model.safetensors: not a readable"
    )


def test_missing_adapter_config(work):
    path = copy_adapter("lora-domain", "lora-noconf")
    (path / "adapter_config.json").unlink()
    expect_error(
        with_domain("lora-noconf"), r"lora-noconf/adapter_config.json: missing"
    )


@pytest.mark.parametrize(
    "flag,value,what",
    [
        ("use_dora", True, "DoRA"),
        ("lora_bias", True, "LoRA biases"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("bias", "all", "bias='all'"),
        ("peft_type", "IA3", "peft_type IA3"),
    ],
)
def test_unsupported_variants_in_config(work, flag, value, what):
    path = copy_adapter("lora-domain", "lora-variant")
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg[flag] = value
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    expect_error(
        with_domain("lora-variant"), rf"lora-variant/adapter_config.json: {what}"
    )


def test_dora_adapter_saved_by_peft(work):
    build_lora("base", "lora-dora", r=4, seed=7, targets=("q_proj",), use_dora=True)
    expect_error(with_domain("lora-dora"), r"lora-dora/adapter_config.json: DoRA")
    # the weights alone tell too
    cfg = json.loads(Path("lora-dora/adapter_config.json").read_text())
    cfg["use_dora"] = False
    Path("lora-dora/adapter_config.json").write_text(json.dumps(cfg))
    expect_error(
        with_domain("lora-dora"), r"lora-dora/adapter_model.safetensors: DoRA magnitude"
    )


def test_embedding_lora(work):
    build_lora("base", "lora-emb", r=4, seed=8, targets=("embed_tokens", "q_proj"))
    expect_error(
        with_domain("lora-emb"), r"lora-emb/adapter_model.safetensors: embedding LoRA"
    )


def test_validation_failure_leaves_earlier_output_intact(work):
    mergekit_tada.merge(tada_config(), "out", quiet=True)
    before = Path("out/adapter/adapter_model.safetensors").read_bytes()
    path = copy_adapter("lora-domain", "lora-late")
    B = torch.full((32, 6), float("nan"))
    rewrite_factors(path, {"model.layers.2.mlp.down_proj": (torch.randn(6, 64), B)})
    with pytest.raises(TadaError, match="NaN"):
        mergekit_tada.merge(with_domain("lora-late"), "out", quiet=True)
    # validation failed before anything was touched: the earlier run is intact
    assert Path("out/tada_report.json").exists()
    assert Path("out/adapter/adapter_model.safetensors").read_bytes() == before


def assert_nothing_looks_finished(out: Path) -> None:
    """A run into a new folder that failed leaves no folder at all."""
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_failed_fsync_fails_the_merge(work, monkeypatch):
    """The final fsync runs on a background thread: its error must still surface."""
    import os

    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output error"):
        mergekit_tada.merge(tada_config(), "out", quiet=True)
    assert_nothing_looks_finished(Path("out"))


# ------------------------------------------------------- parameters and factors


@pytest.mark.parametrize(
    "key,value",
    [
        ("scale", float("nan")),
        ("tau", float("inf")),
        ("task_weight", float("nan")),
        ("gate_min", float("nan")),
        ("gate_max", float("nan")),
        ("conflict_threshold", float("nan")),
        ("task_weight", [1.0, float("nan")]),  # a gradient that reaches NaN
    ],
)
def test_non_finite_parameters_are_named(work, key, value):
    expect_error(tada_config(**{key: value}), rf"tada: {key} must be a finite number")


def test_integer_factors_are_refused(work):
    from safetensors.torch import load_file, save_file

    path = copy_adapter("lora-domain", "lora-int8")
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key] = (tensors[key] * 100).to(torch.int8)
    save_file(tensors, weights, metadata={"format": "pt"})
    expect_error(
        with_domain("lora-int8"),
        rf"lora-int8/adapter_model.safetensors: tensor {key} is I8; LoRA factors "
        "must be floating point",
    )


@pytest.mark.parametrize(
    "r,match",
    [
        (0, r"r must be a positive integer \(got 0\)"),
        (5, r"r = 5, but module .* has rank 6"),
    ],
)
def test_config_rank_must_match_the_factors(work, r, match):
    path = copy_adapter("lora-domain", "lora-r")
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["r"] = r
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    expect_error(with_domain("lora-r"), rf"lora-r/adapter_config.json: {match}")


def test_output_rank_is_capped_at_what_the_update_can_have(work, caplog):
    from safetensors import safe_open

    out = Path(mergekit_tada.merge(tada_config(rank=10000), "out", quiet=True))
    cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    with safe_open(out / "adapter/adapter_model.safetensors", "pt") as fh:
        ranks = {
            k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): (
                fh.get_slice(k).get_shape()[0]
            )
            for k in fh.keys()
            if "lora_A" in k
        }
    # both adapters (task r=4 + domain r=6) on q, v, up, down; the task's alone
    # on k, o, gate: every weight is at least 32 wide, so the sums are the caps
    for module, rank in ranks.items():
        both = module.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "up_proj", "down_proj")
        assert rank == (10 if both else 4), module
        assert cfg["rank_pattern"].get(module, cfg["r"]) == rank
    assert "rank 10000 is more than the merged update can have in any" in caplog.text


def test_output_bytes_do_not_depend_on_hash_seed_or_threads(work):
    """Inputs with different task types: the output's comes from the config order."""
    path = copy_adapter("lora-domain", "lora-fe")
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["task_type"] = "FEATURE_EXTRACTION"
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    from test_probe import PROMPTS

    Path("prompts.txt").write_text("\n".join(PROMPTS))
    config = with_domain("lora-fe")
    params = config["parameters"]
    del params["task_weight"], params["domain_weight"]
    params.update(
        gates="probe",
        calibration="prompts.txt",
        conflict_elimination=True,
        cache_dir="cache",
    )
    outputs = outputs_under_settings(
        config, ("base", "lora-task", "lora-fe", "prompts.txt")
    )
    assert outputs[0] == outputs[1] == outputs[2]
    cfg = json.loads(outputs[0]["out/adapter/adapter_config.json"])
    assert cfg["task_type"] == "CAUSAL_LM"  # the first input's, in config order


# ------------------------------------------------------- errors, one line each


def test_missing_base_folder(work):
    config = tada_config()
    config["base_model"] = "./basee"
    expect_error(
        config, r"base model ./basee: no such folder \(relative paths are resolved from"
    )


def test_hub_id_offline_fails_at_once(work, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = tada_config()
    config["base_model"] = "someone/missing-model"
    config["models"] = [
        {"model": "someone/missing-model+./lora-task", "parameters": {"role": "task"}},
        {
            "model": "someone/missing-model+./lora-domain",
            "parameters": {"role": "domain"},
        },
    ]
    t0 = time.monotonic()
    expect_error(
        config,
        r"base model someone/missing-model: no such local folder, and not in the Hugging Face cache while HF_HUB_OFFLINE",
    )
    assert time.monotonic() - t0 < 10


def test_missing_adapter_folder(work):
    expect_error(
        with_domain("lora-nope"),
        r"adapter ./lora-nope of ./base\+./lora-nope: no such folder",
    )


def test_unknown_merge_method_suggests(work):
    config = tada_config()
    config["merge_method"] = "tadaa"
    expect_error(
        config,
        r"unknown merge_method 'tadaa'; did you mean 'tada' or 'tara'\? Known: .*lora_ties",
    )


def test_tada_takes_two_inputs(work):
    build_lora("base", "lora-third", r=4, seed=9, targets=("q_proj",))
    config = tada_config()
    config["models"].append(
        {"model": "./base+./lora-third", "parameters": {"role": "task"}}
    )
    expect_error(
        config, r"tada takes exactly two LoRA inputs.*use lora_ties, lora_tsv_m or tara"
    )


def test_mergekit_validation_errors_are_one_line(work):
    config = tada_config()
    config["models"] = 3
    expect_error(config, r"config: invalid mergekit configuration: models: ")
    Path("bad.yml").write_text("merge_method: [tada\n")
    with pytest.raises(TadaError, match=r"bad.yml: not valid YAML"):
        mergekit_tada.merge("bad.yml", "out", quiet=True)


# ------------------------------------------------ hardening, round 3 (issue 22)


@pytest.mark.parametrize(
    "name",
    [
        "tokenizer.json",
        "README.md",
        "config.json",
        "model.safetensors",
        "gates.png",
        "tada_report.json",
    ],
)
def test_adapter_out_naming_another_output_is_refused_before_work(work, name):
    expect_error(
        tada_config(adapter_out=name),
        rf"adapter_out: '{name}' is the name of another output of this merge",
    )


def test_float16_overflow_is_refused_naming_the_module(work):
    """Factors x1000 overflow a float16 W + dW: refused, nothing committed."""
    from safetensors.torch import load_file

    copy_adapter("lora-task", "lora-big")
    tensors = load_file("lora-big/adapter_model.safetensors")
    factors = {}
    for key, A in tensors.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").removesuffix(
                ".lora_A.weight"
            )
            factors[module] = (
                A * 1000,
                tensors[key.replace("lora_A", "lora_B")] * 1000,
            )
    rewrite_factors("lora-big", factors)
    config = tada_config()
    config["models"][0]["model"] = "./base+./lora-big"
    config["dtype"] = "float16"
    expect_error(
        config,
        r"model\.layers\.\d+\.\S+: W \+ dW overflows torch.float16 .*bfloat16 or float32",
    )
    config["dtype"] = "float32"
    mergekit_tada.merge(config, "out32", quiet=True)  # fine in float32


def test_mixed_task_types_warn_and_take_the_first_inputs(work, caplog):
    """A documented rule (config order) and a warning naming every input's type."""
    copy_adapter("lora-domain", "lora-enc")
    path = Path("lora-enc/adapter_config.json")
    cfg = json.loads(path.read_text())
    cfg["task_type"] = "FEATURE_EXTRACTION"
    path.write_text(json.dumps(cfg))
    out = Path(mergekit_tada.merge(with_domain("lora-enc"), "out", quiet=True))
    assert (
        "tada: the LoRA inputs have different PEFT task types (./base+./lora-task: "
        "CAUSAL_LM, ./base+./lora-enc: FEATURE_EXTRACTION); the output adapter takes "
        "the first input's (config order)"
    ) in caplog.text
    written = json.loads((out / "adapter/adapter_config.json").read_text())
    assert written["task_type"] == "CAUSAL_LM"


def test_cuda_without_cuda_is_one_line(work):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    expect_error(
        tada_config(), r"device cuda: this torch has no CUDA device", device="cuda"
    )


def test_tara_huge_preferences_normalise_safely(work):
    Path("a.txt").write_text(
        "\n".join(f"the answer {i} is then explained" for i in range(8))
    )
    Path("b.txt").write_text(
        "\n".join(f"the protein {i} binding the cell" for i in range(8))
    )
    config = {
        "merge_method": "tara",
        "base_model": "./base",
        "models": [
            {
                "model": "./base+./lora-task",
                "parameters": {"data": "a.txt", "preference": 1e308},
            },
            {
                "model": "./base+./lora-domain",
                "parameters": {"data": "b.txt", "preference": 1e308},
            },
        ],
        "parameters": {"steps": 2, "batch_size": 8, "cache_dir": "cache"},
        "dtype": "float32",
    }
    out = Path(mergekit_tada.merge(config, "out", adapter_only=True, quiet=True))
    training = json.loads((out / "merge_report.json").read_text())["training"]
    assert training["preference"] == [0.5, 0.5]


@pytest.mark.parametrize(
    "name,content",
    [
        (
            "prompts.json",
            json.dumps([{"text": "the protein binding"}, {"text": "a gene"}]),
        ),
        ("prompts.json", json.dumps(["the protein binding", "a gene"])),
        ("PROMPTS.JSONL", '{"text": "the protein binding"}\n{"text": "a gene"}\n'),
    ],
)
def test_json_and_capitalised_jsonl_data_are_read_as_records(work, name, content):
    from mergekit_tada.texts import read_texts

    Path(name).write_text(content)
    assert read_texts(name, "calibration") == ["the protein binding", "a gene"]


def test_json_data_errors_name_the_fields(work):
    from mergekit_tada.texts import read_texts

    Path("rows.jsonl").write_text('{"prompt": "x", "label": 1}\n')
    with pytest.raises(
        TadaError,
        match=r"rows.jsonl contains no usable text \(fields: text; the file's fields: label, prompt\)",
    ):
        read_texts("rows.jsonl", "calibration")
    Path("bad.json").write_text('{"text": "not a list"}')
    with pytest.raises(TadaError, match=r"bad.json: expected a JSON list"):
        read_texts("bad.json", "calibration")


def test_disk_full_is_one_line_and_keeps_earlier_outputs(work):
    """A file-size limit hit while writing: one line naming the folder and the
    free space; the earlier merge is untouched (run in a child: RLIMIT_FSIZE)."""
    import subprocess
    import sys

    mergekit_tada.merge(tada_config(), "out", quiet=True)
    before = {p: p.read_bytes() for p in sorted(Path("out").rglob("*")) if p.is_file()}
    Path("c.json").write_text(json.dumps(tada_config()))
    code = (
        "import json, resource, signal, sys, mergekit_tada\n"
        "from mergekit_tada.errors import TadaError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))\n"
        "try:\n"
        "    mergekit_tada.merge(json.load(open('c.json')), 'out', quiet=True)\n"
        "except TadaError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "output folder out: no space left or file too large" in done.stdout
    assert "GB free there" in done.stdout
    after = {p: p.read_bytes() for p in sorted(Path("out").rglob("*")) if p.is_file()}
    after.pop(Path("out/.mergekit-tada.lock"), None)
    before.pop(Path("out/.mergekit-tada.lock"), None)
    assert after == before


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("rank", "twelve", r"parameters.rank: expected an integer, got 'twelve'"),
        ("rank", 4.5, r"parameters.rank: expected an integer, got 4.5"),
        ("tau", "1,0", r"parameters.tau: expected a number, got '1,0'"),
        ("gates", 3, r"parameters.gates: expected a string, got 3"),
        ("conflict_elimination", "maybe", r"expected true or false, got 'maybe'"),
        ("rank", [4, 7], r"a parameter gradient or filter gives 5.5 at some tensor"),
    ],
)
@pytest.mark.parametrize("path", ["mergekit", "fast"])
def test_wrongly_typed_values_name_the_key(work, key, value, message, path):
    """One line under both paths (the fast path: mergekit-tada --adapter-only)."""
    import subprocess
    import sys

    import yaml

    config = tada_config()
    config["parameters"][key] = value
    if path == "mergekit":
        expect_error(config, message)
        return
    Path("c.yml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mergekit_tada.fastpath import main; main()",
            "c.yml",
            "out",
            "--adapter-only",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    assert __import__("re").search(message, lines[0])


def test_a_lora_input_without_base_plus_shows_the_form(work):
    config = tada_config()
    config["models"][0]["model"] = "./lora-task"
    expect_error(
        config,
        r"model ./lora-task in models\[0\] is not a LoRA input: LoRA inputs are written "
        r"base\+adapter, e.g. model: ./base\+./lora-task",
    )


# ------------------------------------------- round 5 (issue 38): 2025-26 methods


def regmean_pair(data: str, **params) -> dict:
    return {
        "merge_method": "lora_regmean",
        "base_model": "./base",
        "models": [
            {"model": f"./base+./{n}", "parameters": {"data": data}}
            for n in ("lora-task", "lora-domain")
        ],
        "parameters": {"rank": 6, "cache_dir": "cache", **params},
        "dtype": "float32",
    }


def prompts(name: str, lines) -> str:
    Path(name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return name


def test_one_adapter_listed_twice_is_one_line_through_both_clis(work):
    import subprocess
    import sys

    import yaml

    config = tada_config()
    config["merge_method"] = "lora_task_arithmetic"
    config["parameters"] = {"rank": 6}
    config["models"] = [
        {"model": "./base+./lora-task"},
        {"model": "./base+./lora-domain"},
        {"model": "./base+lora-task"},  # the same folder, spelled otherwise
    ]
    expect_error(
        config, r"adapter lora-task is listed twice in models \(entries 0 and 2\)"
    )
    expect_error(config, r"listed twice", adapter_only=True)
    Path("dup.yml").write_text(yaml.safe_dump(config))
    bin_dir = Path(sys.executable).parent
    for cli, extra in (("mergekit-yaml", []), ("mergekit-tada", ["--adapter-only"])):
        done = subprocess.run(
            [str(bin_dir / cli), "dup.yml", "out", *extra],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 1, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert "listed twice in models" in done.stderr.strip().splitlines()[-1]
    assert not Path("out/adapter").exists()


@pytest.mark.parametrize(
    "params, match",
    [
        ({"samples": True}, r"samples: expected an integer, got True"),
        ({"lambda": True}, r"lambda: expected a number, got True"),
        ({"seed": 10**20}, r"seed: 100000000000000000000 is out of range"),
        ({"max_length": 10**20}, r"max_length: 100000000000000000000 is out of range"),
    ],
)
def test_integer_settings_are_integers_in_range(work, params, match):
    expect_error(regmean_pair(prompts("p.txt", ["a question"] * 4), **params), match)


def test_pico_with_match_norm_is_refused(work):
    config = tada_config()
    config["merge_method"] = "lora_iso_c"
    config["models"] = [{"model": m["model"]} for m in config["models"]]
    config["parameters"] = {"rank": 6, "pico": True, "match_norm": "sum"}
    expect_error(config, r"lora_iso_c: pico and match_norm both set")


def test_pico_keeps_the_global_scale(work):
    """Pico's magnitude restoration used to undo lambda: now it is the
    restored merge times lambda, sign included."""
    from conftest import adapter_delta, rel_err

    def config(scale):
        c = tada_config()
        c["merge_method"] = "lora_iso_c"
        c["models"] = [{"model": m["model"]} for m in c["models"]]
        c["parameters"] = {"rank": 10, "pico": True, "lambda": scale}
        return c

    one = adapter_delta(
        Path(mergekit_tada.merge(config(1.0), "one", quiet=True)) / "adapter"
    )
    half = adapter_delta(
        Path(mergekit_tada.merge(config(-0.5), "half", quiet=True)) / "adapter"
    )
    for name, delta in one.items():
        assert rel_err(half[name], -0.5 * delta) < 1e-4, name


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_cache_dir_that_is_a_file_warns_before_any_work(work, where, caplog):
    """As every cache that cannot be used: one warning, said before the pass
    (it used to end the run with NotADirectoryError after the whole pass),
    and the merge a fresh cache gives."""
    Path("somefile").write_text("mine")
    data = prompts("p.txt", ["a question"] * 4)
    fresh = mergekit_tada.merge(
        regmean_pair(data), "fresh", quiet=True, adapter_only=True
    )
    cache = "somefile" if where == "a file" else "somefile/cache"
    with caplog.at_level("WARNING"):
        out = mergekit_tada.merge(
            regmean_pair(data, cache_dir=cache), "out", quiet=True, adapter_only=True
        )
    warnings = [r.getMessage() for r in caplog.records if "somefile" in r.getMessage()]
    assert len(warnings) == 1 and "somefile is a file" in warnings[0], warnings
    assert (Path(out) / "adapter/adapter_model.safetensors").read_bytes() == (
        Path(fresh) / "adapter/adapter_model.safetensors"
    ).read_bytes()
    assert Path("somefile").read_text() == "mine"


def stripping_base(work: Path) -> str:
    """A copy of the toy base whose tokenizer's normalizer deletes every digit."""
    from tokenizers import Regex, normalizers

    from mergekit_tada.toy import build_tokenizer

    folder = work / "base-strip"
    folder.mkdir()
    for item in Path("base").iterdir():
        if not item.name.startswith("tokenizer"):
            (folder / item.name).symlink_to(item.resolve())
    tok = build_tokenizer(folder)
    tok.backend_tokenizer.normalizer = normalizers.Replace(Regex("[0-9]"), "")
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("method", ["lora_regmean", "tada"])
def test_prompts_that_tokenize_to_nothing_are_one_line(work, method):
    base = stripping_base(work)
    path = prompts("digits.txt", ["123 456", "7 8 9"])
    if method == "lora_regmean":
        config = regmean_pair(path)
    else:
        config = tada_config(gates="probe", calibration=path, cache_dir="cache")
        (
            config["parameters"].pop("task_weight"),
            config["parameters"].pop("domain_weight"),
        )
    config["base_model"] = base
    for m in config["models"]:
        m["model"] = m["model"].replace("./base", base)
    expect_error(
        config, r"digits.txt.*tokenize to no tokens with the base model's tokenizer"
    )


def test_prompts_of_unknown_tokens_warn(work, caplog):
    config = regmean_pair(prompts("odd.txt", ["zzqx yyqv", "qqqq wwxx zzzz"]))
    with caplog.at_level("WARNING"):
        mergekit_tada.merge(config, "out", quiet=True, adapter_only=True)
    assert any("is the unknown token" in r.getMessage() for r in caplog.records)


def test_a_base_without_tokenizer_names_the_method_and_key(work):
    folder = work / "base-bare"
    folder.mkdir()
    for item in Path("base").iterdir():
        if not item.name.startswith(("tokenizer", "special_tokens")):
            (folder / item.name).symlink_to(item.resolve())
    config = regmean_pair(prompts("p.txt", ["a question"] * 4))
    config["base_model"] = str(folder)
    for m in config["models"]:
        m["model"] = m["model"].replace("./base", str(folder))
    expect_error(
        config, r"^lora_regmean: data: base model .*base-bare has no usable tokenizer"
    )
