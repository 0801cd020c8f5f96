"""Tiny models and adapters built once per session, and independent oracles.

The oracles never use mergekit_tada code: a LoRA's dense update comes from
PEFT's own ``merge_and_unload`` (W' - W), and merged outputs are compared with
dense torch maths on these tiny shapes.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# the default cache_dir of every merge the tests run (set before the package
# is imported): a folder of this session's, not the user's ~/.cache
os.environ["MERGEKIT_TADA_CACHE"] = tempfile.mkdtemp(prefix="mergekit-tada-tests-")
atexit.register(shutil.rmtree, os.environ["MERGEKIT_TADA_CACHE"], True)

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mergekit_tada.toy import LLAMA_TARGETS, build_llama, build_lora  # noqa: E402

TASK_TARGETS = LLAMA_TARGETS
DOMAIN_TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


def build_toy(root: Path) -> None:
    """base (3 layers), lora-task (r=4, all projections), lora-domain (r=6, four)."""
    build_llama(root / "base", layers=3, seed=0)
    build_lora(
        root / "base", root / "lora-task", r=4, alpha=8, seed=1, targets=TASK_TARGETS
    )
    build_lora(
        root / "base",
        root / "lora-domain",
        r=6,
        alpha=12,
        seed=2,
        targets=DOMAIN_TARGETS,
    )


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> Path:
    """The toy models of :func:`build_toy`, built once per session."""
    root = tmp_path_factory.mktemp("toy")
    build_toy(root)
    return root


@pytest.fixture()
def work(toy: Path, tmp_path: Path, monkeypatch) -> Path:
    """A scratch folder holding links to the toy models; the cwd for relative paths."""
    for name in os.listdir(toy):
        (tmp_path / name).symlink_to(toy / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tada_config(**parameters) -> dict:
    params = {
        "rank": 10,
        "gates": "fixed",
        "task_weight": 1.0,
        "domain_weight": 1.0,
        "conflict_elimination": False,
    }
    params.update(parameters)
    return {
        "merge_method": "tada",
        "base_model": "./base",
        "models": [
            {"model": "./base+./lora-task", "parameters": {"role": "task"}},
            {"model": "./base+./lora-domain", "parameters": {"role": "domain"}},
        ],
        "parameters": params,
        "dtype": "float32",
    }


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def peft_delta(base: str | Path, adapter: str | Path) -> dict[str, torch.Tensor]:
    """Dense update of every weight, computed by PEFT: merge_and_unload() - base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    after = merged.state_dict()
    return {
        k: (after[k] - before[k]).double()
        for k in before
        if not torch.equal(after[k], before[k])
    }


def adapter_delta(adapter: str | Path) -> dict[str, torch.Tensor]:
    """Dense s*B@A per module of an adapter we wrote, read straight from its files."""
    adapter = Path(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, A in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        B = tensors[key.replace(".lora_A.", ".lora_B.")]
        r = cfg["rank_pattern"].get(module, cfg["r"])
        alpha = cfg["alpha_pattern"].get(module, cfg["lora_alpha"])
        assert A.shape[0] == r
        out[module + ".weight"] = (alpha / r) * (B.double() @ A.double())
    return out


def assert_adapter_matches_model(out: str | Path, base: str | Path = "base") -> None:
    """PEFT loads out/adapter and its merge_and_unload() equals the merged model out/."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    merged = PeftModel.from_pretrained(
        model, str(Path(out) / "adapter")
    ).merge_and_unload()
    written = load_weights(out)
    for name, tensor in merged.state_dict().items():
        assert torch.allclose(tensor, written[name], atol=1e-6, rtol=1e-5), name


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.norm(a - b) / max(torch.linalg.norm(b), 1e-30))


def rewrite_factors(
    adapter: str | Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
):
    """Replace (A, B) of modules in a real PEFT adapter folder (same keys, new values)."""
    path = Path(adapter) / "adapter_model.safetensors"
    tensors = load_file(path)
    for module, (A, B) in factors.items():
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = A.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


def copy_adapter(src: str | Path, dst: str | Path) -> Path:
    dst = Path(dst)
    if dst.is_symlink():
        dst.unlink()
    shutil.copytree(Path(src).resolve(), dst)
    return dst


def count_calls(monkeypatch, module, name: str) -> list:
    """Replace module.name by a wrapper that records each call; the record."""
    calls: list = []
    real = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def outputs_under_settings(
    config: dict, inputs: Sequence[str], adapter_only: bool = False
) -> list[dict[str, bytes]]:
    """Every output file's bytes from fresh processes with other hash seeds and
    thread counts (1, 2, 2 threads), each in its own folder and cache."""
    import subprocess
    import sys

    Path("c.json").write_text(json.dumps(config))
    code = (
        "import json, sys, torch, mergekit_tada\n"
        "torch.set_num_threads(int(sys.argv[1]))\n"
        "mergekit_tada.merge(json.load(open('c.json')), 'out', quiet=True,"
        f" adapter_only={adapter_only})\n"
    )
    outputs = []
    for seed, threads in (("0", "1"), ("1", "2"), ("5", "2")):
        run = Path(f"run{seed}")  # same relative paths, own cache and output
        run.mkdir()
        for name in (*inputs, "c.json"):
            (run / name).symlink_to(Path(name).resolve())
        env = dict(os.environ, PYTHONHASHSEED=seed, OMP_NUM_THREADS=threads)
        done = subprocess.run([sys.executable, "-c", code, threads], env=env, cwd=run)
        assert done.returncode == 0
        outputs.append(output_files(run / "out", relative_to=run))
    return outputs


def output_files(folder: Path, relative_to: Path | None = None) -> dict[str, bytes]:
    """Every file a merge left under ``folder`` (its lock file aside): path
    (relative to ``relative_to``, default ``folder``) -> bytes."""
    return {
        str(p.relative_to(relative_to or folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".mergekit-tada.lock"
    }


@pytest.fixture()
def three(work):
    """A third LoRA beside the toy two; every input's dense update by PEFT."""
    from family import INPUTS

    build_lora(
        "base",
        "lora-third",
        r=5,
        alpha=5,
        seed=9,
        targets=("q_proj", "o_proj", "up_proj"),
    )
    return {name: peft_delta("base", name) for name in INPUTS}
