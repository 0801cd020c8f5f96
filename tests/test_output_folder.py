"""The output folder: nothing lost, never mixed, cleaned after interruptions."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import tada_config

import mergekit_tada
from mergekit_tada.errors import TadaError
from mergekit_tada.run.folder import LOCK_NAME, STAGE_PREFIX, OutputFolder

ADAPTER = "adapter/adapter_model.safetensors"


def snapshot(folder: str | Path) -> dict[str, bytes]:
    """Every visible file under a folder (hidden bookkeeping files left out)."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.parts)
    }


def hidden(folder: str | Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------- adapter_out


@pytest.mark.parametrize("value", ["../sibling", "/ABS", ".", "", "a/b", ".hidden"])
def test_adapter_out_must_be_a_plain_sub_folder(work, value):
    Path("sibling").mkdir()
    Path("sibling/mine.txt").write_text("keep me")
    Path("out").mkdir()
    Path("out/notes.txt").write_text("keep me too")
    if value == "/ABS":
        value = str(work / "sibling")
    with pytest.raises(TadaError, match="adapter_out must be a plain sub-folder name"):
        mergekit_tada.merge(tada_config(adapter_out=value), "out", quiet=True)
    assert Path("sibling/mine.txt").read_text() == "keep me"
    assert sorted(os.listdir("sibling")) == ["mine.txt"]
    assert Path("out/notes.txt").read_text() == "keep me too"
    assert sorted(p for p in os.listdir("out") if p != LOCK_NAME) == ["notes.txt"]


# ----------------------------------------------------------------- inputs


def test_output_that_would_replace_an_input_is_refused(work):
    mergekit_tada.merge(tada_config(), "o", adapter_only=True, quiet=True)
    before = snapshot("o")
    config = tada_config()
    config["models"][1]["model"] = "./base+./o/adapter"  # merge the last result again
    with pytest.raises(
        TadaError, match=r"output folder o would replace the adapter of"
    ):
        mergekit_tada.merge(config, "o", adapter_only=True, quiet=True)
    assert snapshot("o") == before
    # into another folder it is fine
    mergekit_tada.merge(config, "o2", adapter_only=True, quiet=True)
    assert Path("o2", ADAPTER).exists()


def test_output_folder_that_is_the_base_is_refused(work):
    with pytest.raises(TadaError, match=r"output folder base is the base model"):
        mergekit_tada.merge(tada_config(), "base", quiet=True)


def test_output_path_that_is_a_file(work):
    Path("out").write_text("a file")
    with pytest.raises(TadaError, match=r"output folder out is an existing file"):
        mergekit_tada.merge(tada_config(), "out", quiet=True)
    assert Path("out").read_text() == "a file"


# ----------------------------------------------------------------- spaces


def test_paths_with_spaces(work):
    os.symlink(work / "base", "my base")
    os.symlink(work / "lora-task", "task lora")
    config = tada_config()
    config["base_model"] = "./my base"
    config["models"][0]["model"] = "./my base+./task lora"
    config["models"][1]["model"] = "./my base+./lora-domain"
    mergekit_tada.merge(config, "out dir", quiet=True)
    report = json.loads(Path("out dir/tada_report.json").read_text())
    assert report["settings"]["config"]["models"][0]["model"] == "./my base+./task lora"
    assert Path("out dir", ADAPTER).exists() and Path("out dir/README.md").exists()


# ----------------------------------------------------------------- reruns


def test_failing_rerun_keeps_the_earlier_outputs(work, monkeypatch):
    from mergekit_tada.methods.tada import TadaMethod

    mergekit_tada.merge(tada_config(), "out", quiet=True)
    Path("out/notes.txt").write_text("mine")
    before = snapshot("out")
    real = TadaMethod.merge_module
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TadaMethod, "merge_module", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        mergekit_tada.merge(tada_config(rank=4), "out", quiet=True)
    assert snapshot("out") == before  # every earlier output, byte for byte
    assert not [n for n in hidden("out") if n.startswith(STAGE_PREFIX)]


def test_adapter_only_into_an_earlier_full_merge(work):
    mergekit_tada.merge(tada_config(rank=8), "out", quiet=True)
    Path("out/notes.txt").write_text("mine")
    assert Path("out/model.safetensors").exists()
    mergekit_tada.merge(tada_config(rank=4), "out", adapter_only=True, quiet=True)
    visible = sorted(p for p in os.listdir("out") if not p.startswith("."))
    # the earlier full model (weights, config, card) would contradict the new
    # rank-4 adapter: it is gone; the user's file stays
    assert visible == ["adapter", "notes.txt", "tada_report.json"]
    config = json.loads(Path("out/adapter/adapter_config.json").read_text())
    assert config["r"] == 4


@pytest.mark.parametrize("adapter_only", [True, False])
def test_rerun_keeps_the_users_files_inside_the_adapter_folder(work, adapter_only):
    """Outputs move file by file: the adapter folder is not ours as a whole."""
    mergekit_tada.merge(
        tada_config(rank=8), "out", adapter_only=adapter_only, quiet=True
    )
    Path("out/adapter/training_args.txt").write_text("mine")
    Path("out/adapter/checkpoints").mkdir()
    Path("out/adapter/checkpoints/step-1.bin").write_bytes(b"\x00\x01")
    mergekit_tada.merge(
        tada_config(rank=4), "out", adapter_only=adapter_only, quiet=True
    )
    assert Path("out/adapter/training_args.txt").read_text() == "mine"
    assert Path("out/adapter/checkpoints/step-1.bin").read_bytes() == b"\x00\x01"
    config = json.loads(Path("out/adapter/adapter_config.json").read_text())
    assert config["r"] == 4  # the new merge's adapter did arrive
    # another adapter_out: ours leave the old folder, the user's files stay
    mergekit_tada.merge(tada_config(rank=4, adapter_out="lora"), "out", quiet=True)
    assert sorted(os.listdir("out/adapter")) == ["checkpoints", "training_args.txt"]
    assert Path("out/lora/adapter_model.safetensors").exists()
    # and a folder only ours were in is removed with them
    mergekit_tada.merge(tada_config(rank=4), "out", quiet=True)
    assert not Path("out/lora").exists()


def test_an_older_manifest_naming_the_adapter_folder_keeps_user_files(work):
    """Manifests before version 2 listed 'adapter' whole: only PEFT files go."""
    mergekit_tada.merge(tada_config(), "out", adapter_only=True, quiet=True)
    manifest = Path("out/.mergekit-tada-outputs.json")
    manifest.write_text(json.dumps({"outputs": ["adapter", "tada_report.json"]}))
    Path("out/adapter/notes.md").write_text("mine")
    mergekit_tada.merge(
        tada_config(adapter_out="lora"), "out", adapter_only=True, quiet=True
    )
    assert sorted(os.listdir("out/adapter")) == ["notes.md"]


def test_a_user_file_where_the_adapter_folder_goes_is_refused(work):
    Path("out").mkdir()
    Path("out/adapter").write_text("a file of mine")
    with pytest.raises(TadaError, match=r"adapter is a file, not the folder"):
        mergekit_tada.merge(tada_config(), "out", adapter_only=True, quiet=True)
    assert Path("out/adapter").read_text() == "a file of mine"


def test_rerun_with_other_shards_leaves_no_stale_shards(work):
    mergekit_tada.merge(tada_config(), "out", quiet=True, out_shard_size=20_000)
    assert Path("out/model.safetensors.index.json").exists()
    mergekit_tada.merge(tada_config(), "out", quiet=True)
    shards = sorted(p.name for p in Path("out").glob("model*"))
    assert shards == ["model.safetensors"]


def test_stock_mergekit_folder_is_replaced_but_user_files_stay(work):
    """A folder written by stock mergekit (no manifest): its files are known."""
    mergekit_tada.merge(tada_config(), "out", quiet=True, out_shard_size=20_000)
    os.remove("out/.mergekit-tada-outputs.json")
    Path("out/notes.txt").write_text("mine")
    Path("out/README.md").write_text("my own readme, not a card")
    mergekit_tada.merge(tada_config(), "out", adapter_only=True, quiet=True)
    visible = sorted(p for p in os.listdir("out") if not p.startswith("."))
    assert visible == ["README.md", "adapter", "notes.txt", "tada_report.json"]
    assert Path("out/README.md").read_text() == "my own readme, not a card"


# ----------------------------------------------------------------- the lock


def test_second_run_into_a_locked_folder_fails_at_once(work):
    with OutputFolder("out").locked():
        t0 = time.monotonic()
        with pytest.raises(
            TadaError,
            match=rf"output folder out is in use by another merge \(pid {os.getpid()}\)",
        ):
            mergekit_tada.merge(tada_config(), "out", quiet=True)
        assert time.monotonic() - t0 < 30
    mergekit_tada.merge(tada_config(), "out", quiet=True)  # released


def test_parallel_runs_never_mix(work):
    """Two processes into one folder: one wins, the other fails cleanly."""
    Path("run.py").write_text(
        textwrap.dedent(
            """
            import sys, yaml, mergekit_tada
            from mergekit_tada.errors import TadaError
            cfg = yaml.safe_load(open(sys.argv[1]))
            try:
                mergekit_tada.merge(cfg, "out", quiet=True)
            except TadaError as e:
                print("REFUSED", e)
                sys.exit(3)
            """
        )
    )
    import yaml

    for rank in (4, 8):
        Path(f"r{rank}.yml").write_text(yaml.safe_dump(tada_config(rank=rank)))
    procs = [
        subprocess.Popen(
            [sys.executable, "run.py", f"r{rank}.yml"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in (4, 8)
    ]
    codes = [p.wait(timeout=300) for p in procs]
    outs = [p.stdout.read() for p in procs]
    assert 0 in codes, outs
    report = json.loads(Path("out/tada_report.json").read_text())
    rank = report["settings"]["output_rank"]
    assert json.loads(Path("out/adapter/adapter_config.json").read_text())["r"] == rank
    assert f"rank-{rank} PEFT adapter" in Path("out/README.md").read_text()
    for code, out in zip(codes, outs, strict=True):
        assert code == 0 or (code == 3 and "in use by another merge" in out), out


# ----------------------------------------------------------------- interruptions

HANG = textwrap.dedent(
    """
    import os, signal, sys, time, mergekit_tada
    # a job started with & by a non-interactive shell ignores SIGINT, and a
    # child inherits that: Ctrl-C's default here, however pytest was started
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from mergekit_tada.methods.tada import TadaMethod
    sys.path.insert(0, {tests!r})
    from conftest import tada_config
    real = TadaMethod.merge_module
    calls = []
    def slow(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            open("started", "w").close()
            time.sleep(600)
        return real(self, *args, **kwargs)
    TadaMethod.merge_module = slow
    mergekit_tada.merge(tada_config(rank={rank}), {out!r}, quiet=True)
    """
)


def start_hanging_run(out: str, rank: int = 4) -> subprocess.Popen:
    Path("started").unlink(missing_ok=True)
    script = HANG.format(tests=str(Path(__file__).parent), rank=rank, out=out)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while not Path("started").exists():
        assert proc.poll() is None, "the run ended before it hung"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_removes_its_temporaries(work, sig):
    mergekit_tada.merge(tada_config(), "out", quiet=True)
    before = snapshot("out")
    proc = start_hanging_run("out")
    proc.send_signal(sig)
    assert proc.wait(timeout=60) != 0
    assert snapshot("out") == before
    assert hidden("out") == [".mergekit-tada-outputs.json", LOCK_NAME]
    # a new folder interrupted: nothing left at all
    proc = start_hanging_run("fresh")
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert not Path("fresh").exists()


def test_kill_9_leaves_the_earlier_outputs_and_the_next_run_cleans_up(work):
    mergekit_tada.merge(tada_config(), "out", quiet=True)
    before = snapshot("out")
    proc = start_hanging_run("out")
    proc.kill()
    proc.wait(timeout=60)
    assert snapshot("out") == before  # still the earlier merge, whole
    assert [n for n in hidden("out") if n.startswith(STAGE_PREFIX)]  # its stage
    mergekit_tada.merge(tada_config(rank=4), "out", quiet=True)
    assert not [n for n in hidden("out") if n.startswith(STAGE_PREFIX)]
    assert json.loads(Path("out/adapter/adapter_config.json").read_text())["r"] == 4


def test_kill_during_commit_is_rolled_forward(work):
    """Killed between the renames of a commit: the next run finishes that commit."""
    mergekit_tada.merge(tada_config(rank=8), "out", quiet=True)
    script = textwrap.dedent(
        f"""
        import os, sys, mergekit_tada
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import tada_config
        real, count = os.rename, []
        def dying(src, dst):
            if "{STAGE_PREFIX}" in str(src):
                count.append(1)
                if len(count) == 4:
                    os._exit(9)
            return real(src, dst)
        os.rename = dying
        mergekit_tada.merge(tada_config(rank=4), "out", quiet=True)
        """
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    with OutputFolder("out").locked():  # any later run first finishes the commit
        pass
    report = json.loads(Path("out/tada_report.json").read_text())
    assert report["settings"]["output_rank"] == 4
    assert json.loads(Path("out/adapter/adapter_config.json").read_text())["r"] == 4
    assert "rank-4 PEFT adapter" in Path("out/README.md").read_text()
    assert not [n for n in hidden("out") if n.startswith(STAGE_PREFIX)]


# ----------------------------------------------------------------- permissions


def test_outputs_follow_the_umask(work):
    from test_probe import probe_config, write_prompts

    write_prompts()
    old = os.umask(0o022)
    try:
        mergekit_tada.merge(probe_config(), "out", quiet=True)
    finally:
        os.umask(old)
    for name in ("README.md", "gates.png", "tada_report.json", "model.safetensors"):
        assert oct(os.stat(Path("out", name)).st_mode & 0o777) == "0o644", name
    assert oct(os.stat("out/adapter").st_mode & 0o777) == "0o755"
    for name in os.listdir("out/adapter"):
        assert oct(os.stat(Path("out/adapter", name)).st_mode & 0o777) == "0o644"


def test_an_empty_journal_does_not_block_the_folder(work):
    """A kill while an older version wrote commit.json left it empty: the next
    run treats the stage as unfinished, removes it and merges."""
    from mergekit_tada.run.folder import JOURNAL_NAME

    mergekit_tada.merge(tada_config(), "out", quiet=True)
    stage = Path("out") / f"{STAGE_PREFIX}99999999-abc"
    stage.mkdir()
    (stage / JOURNAL_NAME).write_text("")
    mergekit_tada.merge(tada_config(), "out", quiet=True)
    assert not stage.exists()
    assert Path("out/tada_report.json").exists()


def test_a_live_runs_stage_is_never_removed(work):
    """Its lock file deleted, a second run finds a stage whose owner is alive."""
    import subprocess

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        Path("out").mkdir()
        stage = Path("out") / f"{STAGE_PREFIX}{sleeper.pid}-abc"
        stage.mkdir()
        (stage / "partial").write_text("x")
        mergekit_tada.merge(tada_config(), "out", quiet=True)
        assert (stage / "partial").exists()
    finally:
        sleeper.kill()


def test_refused_input_folder_is_left_as_found(work):
    """Output = an input folder: refused, and no lock file left in the input."""
    before = sorted(os.listdir("lora-task/"))
    with pytest.raises(TadaError, match=r"output folder lora-task is the adapter of"):
        mergekit_tada.merge(tada_config(), "lora-task", quiet=True)
    assert sorted(os.listdir("lora-task/")) == before


def test_a_second_merge_in_one_process_reads_its_own_base(tmp_path, monkeypatch):
    """Two merges in one process, each from a folder of its own with a base
    at the same relative path: the second reads its base, not the first's
    (mergekit keeps its loaders by model reference for the process)."""
    from conftest import assert_adapter_matches_model, load_weights

    from mergekit_tada.toy import build_llama, build_lora

    for n, seed in (("one", 0), ("two", 5)):
        folder = tmp_path / n
        folder.mkdir()
        monkeypatch.chdir(folder)
        build_llama("base", seed=seed)
        build_lora("base", "lora-a", r=2, seed=seed + 1)
        build_lora("base", "lora-b", r=2, seed=seed + 2)
        config = {
            "merge_method": "lora_task_arithmetic",
            "base_model": "base",
            "models": [{"model": "base+lora-a"}, {"model": "base+lora-b"}],
            "dtype": "float32",
        }
        mergekit_tada.merge(config, "out", quiet=True)
        assert_adapter_matches_model("out")
    base, first = (
        load_weights(tmp_path / "two" / "base"),
        load_weights(tmp_path / "one" / "base"),
    )
    written = load_weights(tmp_path / "two" / "out")
    name = "model.embed_tokens.weight"  # no LoRA: the base's own
    assert not torch.equal(base[name], first[name])
    assert torch.equal(written[name], base[name])
