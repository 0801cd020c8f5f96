"""The stock command line, our console script and the start-up hook, as subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import adapter_delta, peft_delta, rel_err, tada_config


def sh(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a console script of this environment (the venv need not be activated)."""
    exe = Path(sys.executable).parent / script
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_stock_mergekit_yaml(work):
    Path("tada.yml").write_text(yaml.safe_dump(tada_config()))
    done = sh("mergekit-yaml", "tada.yml", "out", "--quiet", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "out/adapter/adapter_model.safetensors").exists()
    assert (
        json.loads((work / "out/tada_report.json").read_text())["settings"][
            "merge_method"
        ]
        == "tada"
    )
    d = peft_delta(work / "base", work / "lora-task")
    ours = adapter_delta(work / "out/adapter")
    name = "model.layers.2.self_attn.o_proj.weight"  # task-only module
    assert rel_err(ours[name], d[name]) < 1e-5


def test_both_clis_keep_the_users_files_in_the_adapter_folder(work):
    Path("tada.yml").write_text(yaml.safe_dump(tada_config()))
    for cli, extra in (("mergekit-yaml", []), ("mergekit-tada", ["--adapter-only"])):
        (work / "out/adapter").mkdir(parents=True, exist_ok=True)
        (work / "out/adapter/training_args.txt").write_text(cli)
        done = sh(cli, "tada.yml", "out", "--quiet", *extra, cwd=work)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (work / "out/adapter/training_args.txt").read_text() == cli
        assert (work / "out/adapter/adapter_model.safetensors").exists()


def test_mergekit_tada_adapter_only_and_clear_errors(work):
    Path("tada.yml").write_text(yaml.safe_dump(tada_config(rank=4, gates="uniform")))
    done = sh("mergekit-tada", "tada.yml", "out", "--adapter-only", "--quiet", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    visible = [p.name for p in (work / "out").iterdir() if p.name[0] != "."]
    assert sorted(visible) == ["adapter", "tada_report.json"]
    Path("bad.yml").write_text(yaml.safe_dump(tada_config(rank=0)))
    bad = sh("mergekit-tada", "bad.yml", "out2", "--adapter-only", cwd=work)
    assert bad.returncode == 1
    assert "Error: rank must be a positive integer (got 0)" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_stock_cli_prints_our_errors_as_one_line(work):
    """Under mergekit-yaml too: `Error: ...`, exit 1, no traceback."""
    Path("bad.yml").write_text(yaml.safe_dump(tada_config(adapter_out="../x")))
    bad = sh("mergekit-yaml", "bad.yml", "out", cwd=work)
    assert bad.returncode == 1, bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr
    lines = [line for line in bad.stderr.splitlines() if line.startswith("Error: ")]
    assert lines and "adapter_out must be a plain sub-folder name" in lines[0]


def test_startup_hook_imports_nothing_heavy():
    code = (
        "import sys\n"
        "assert any(type(f).__name__ == 'MergekitTadaStub' for f in sys.meta_path)\n"
        "heavy = [m for m in ('torch', 'mergekit', 'mergekit_tada', 'typing') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_method_registered_in_a_fresh_interpreter():
    code = (
        "from mergekit.merge_methods import registry\n"
        "import mergekit.merge, mergekit.scripts.run_yaml as ry\n"
        "names = ('tada', 'lora_task_arithmetic', 'lora_ties', 'lora_dare_ties',"
        " 'lora_knots_ties', 'lora_tsv_m', 'tara')\n"
        "print(*[registry.get(n).spec.name for n in names], ry.run_merge is mergekit.merge.run_merge,"
        " hasattr(ry.run_merge, '__wrapped__'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "tada",
        "lora_task_arithmetic",
        "lora_ties",
        "lora_dare_ties",
        "lora_knots_ties",
        "lora_tsv_m",
        "tara",
        "True",
        "True",
    ]
