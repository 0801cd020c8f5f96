"""Side-by-side performance benchmark: ours against mergekit, PEFT and a plain copy.

    python bench/run.py SIZE [--skip-slow] [--peft-timeout S] [--limit-fraction F]

Generates (once) a Llama-shaped SIZE model, a second one for mergekit's linear
merge, and two rank-16 LoRAs (bench/generate.py) under bench/work/SIZE, then
runs every workload as its own process, one after another, sampling the peak
anonymous memory (RssAnon from /proc, process and children) and wall time.
Prints a table of ratios (to `cp -r` and to mergekit `linear`) and writes
docs/performance-SIZE.md with the table, the machine, the commands and a plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "bench"))


def _anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """The process and its descendants (children of each process's main thread)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return out


def measure(
    cmd: list[str],
    cwd: Path,
    timeout: float | None = None,
    memory_limit: int | None = None,
) -> dict:
    """Wall time and peak RssAnon of a command (sampled every 50 ms)."""
    cgroup = None
    if memory_limit:
        cgroup = Path(f"/sys/fs/cgroup/memory/tada-bench-{os.getpid()}")
        cgroup.mkdir(exist_ok=True)
        (cgroup / "memory.limit_in_bytes").write_text(str(memory_limit))
        (cgroup / "memory.memsw.limit_in_bytes").write_text(str(memory_limit))
        cmd = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *cmd]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak, timed_out = 0, False
    while proc.poll() is None:
        peak = max(peak, sum(_anon_kb(p) for p in _tree(proc.pid)))
        if timeout and time.perf_counter() - start > timeout:
            proc.kill()
            timed_out = True
            break
        time.sleep(0.05)
    output = proc.communicate()[0]
    wall = time.perf_counter() - start
    result = {
        "wall": wall,
        "peak_anon_gb": peak / 1e6,
        "rc": proc.returncode,
        "timed_out": timed_out,
        "tail": output[-2000:],
    }
    if cgroup:
        result["cgroup_peak_gb"] = (
            int((cgroup / "memory.max_usage_in_bytes").read_text()) / 1e9
        )
        cgroup.rmdir()
    return result


def write_configs(work: Path, prompts: Path) -> None:
    lora = [
        {"model": "./base+./lora-a", "parameters": {"role": "task"}},
        {"model": "./base+./lora-b", "parameters": {"role": "domain"}},
    ]
    tada = {
        "merge_method": "tada",
        "base_model": "./base",
        "models": lora,
        "parameters": {
            "rank": 16,
            "gates": "probe",
            "calibration": str(prompts),
            "cache_dir": "./tada-cache",
        },
        "dtype": "bfloat16",
    }
    linear = {
        "merge_method": "linear",
        "models": [
            {"model": "./base", "parameters": {"weight": 0.5}},
            {"model": "./base2", "parameters": {"weight": 0.5}},
        ],
        "dtype": "bfloat16",
    }
    ties = {
        "merge_method": "ties",
        "base_model": "./base",
        "models": [
            {"model": "./base+./lora-a", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "./base+./lora-b", "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        "dtype": "bfloat16",
    }
    for name, cfg in (("tada", tada), ("linear", linear), ("ties", ties)):
        (work / f"{name}.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def prepare(size: str) -> Path:
    from generate import make_base, make_lora

    work = ROOT / "bench" / "work" / size
    if not (work / "base2" / "model.safetensors.index.json").exists():
        shutil.rmtree(work, ignore_errors=True)
        base = make_base(work / "base", size, seed=0)
        make_base(work / "base2", size, seed=1)
        make_lora(base, work / "lora-a", size, seed=1)
        make_lora(base, work / "lora-b", size, seed=2)
    words = (
        "the protein binding of a receptor in the cell with gene dose for the "
        "patient trial and tumor enzyme then first second step"
    ).split()
    prompts = work / "prompts.txt"
    prompts.write_text(
        "\n".join(
            " ".join(words[(i * 7 + j) % len(words)] for j in range(60 + i))
            for i in range(32)
        )
        + "\n"
    )
    write_configs(work, prompts)
    return work


def model_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("size", choices=["tiny", "small", "medium"])
    ap.add_argument(
        "--skip-slow", action="store_true", help="skip mergekit ties and PEFT svd"
    )
    ap.add_argument("--peft-timeout", type=float, default=900)
    ap.add_argument(
        "--limit-fraction",
        type=float,
        default=0.6,
        help="hard memory limit for the constrained run, as a fraction of the model",
    )
    args = ap.parse_args()
    work = prepare(args.size)
    size_b = model_bytes(work / "base")
    yml, tada = str(BIN / "mergekit-yaml"), str(BIN / "mergekit-tada")
    py = sys.executable

    def clean(*names):
        for n in names:
            shutil.rmtree(work / n, ignore_errors=True)

    runs: dict[str, dict] = {}

    def run(key, cmd, *, pre=(), **kw):
        clean(*pre)
        print(f"--- {key}: {' '.join(cmd)}", flush=True)
        runs[key] = res = measure(cmd, work, **kw)
        res["cmd"] = " ".join(
            Path(c).name if c.startswith(str(BIN)) else c for c in cmd
        )
        state = "TIMEOUT" if res["timed_out"] else f"rc={res['rc']}"
        print(
            f"    {res['wall']:.1f} s, peak anon {res['peak_anon_gb']:.2f} GB, {state}",
            flush=True,
        )
        if res["rc"] not in (0, None) and not res["timed_out"]:
            print(res["tail"])

    run(
        "python + mergekit import",
        [py, "-c", "import mergekit.merge, peft, transformers"],
    )
    run("cp -r base", ["cp", "-r", "base", "out-cp"], pre=["out-cp"])
    run("mergekit linear", [yml, "linear.yml", "out-linear"], pre=["out-linear"])
    run(
        "mergekit linear 500M",
        [yml, "linear.yml", "out-linear", "--out-shard-size", "500M"],
        pre=["out-linear"],
    )
    run(
        "tada probe (cold cache)",
        [yml, "tada.yml", "out-tada"],
        pre=["out-tada", "tada-cache"],
    )
    run("tada warm cache", [yml, "tada.yml", "out-tada"], pre=["out-tada"])
    run(
        "tada probe cold 500M",
        [yml, "tada.yml", "out-tada", "--out-shard-size", "500M"],
        pre=["out-tada", "tada-cache"],
    )
    run(
        "tada warm 500M",
        [yml, "tada.yml", "out-tada", "--out-shard-size", "500M"],
        pre=["out-tada"],
    )
    limit = int(args.limit_fraction * size_b)
    if limit >= 1.2e9:  # below that the interpreter and torch alone do not fit
        run(
            f"tada warm 500M, memory limit {limit / 1e9:.2f} GB",
            [yml, "tada.yml", "out-tada", "--out-shard-size", "500M"],
            pre=["out-tada"],
            memory_limit=limit,
        )
    run(
        "tada adapter-only",
        [tada, "tada.yml", "out-adapter", "--adapter-only"],
        pre=["out-adapter"],
    )
    run(
        "calibration pass",
        [
            py,
            str(ROOT / "bench/calib.py"),
            "tada",
            "base",
            "prompts.txt",
            "lora-a",
            "lora-b",
        ],
    )
    run(
        "plain block-streamed forward",
        [
            py,
            str(ROOT / "bench/calib.py"),
            "plain",
            "base",
            "prompts.txt",
            "lora-a",
            "lora-b",
        ],
    )
    run(
        "PEFT add_weighted_adapter cat",
        [
            py,
            str(ROOT / "bench/peft_merge.py"),
            "base",
            "lora-a",
            "lora-b",
            "cat",
            "out-peft-cat",
        ],
        pre=["out-peft-cat"],
    )
    if not args.skip_slow:
        run(
            "mergekit ties base+lora",
            [yml, "ties.yml", "out-ties", "--lora-merge-cache", "lora-cache"],
            pre=["out-ties", "lora-cache"],
        )
        run(
            "PEFT add_weighted_adapter svd",
            [
                py,
                str(ROOT / "bench/peft_merge.py"),
                "base",
                "lora-a",
                "lora-b",
                "svd",
                "out-peft-svd",
            ],
            pre=["out-peft-svd"],
            timeout=args.peft_timeout,
        )
    clean(
        "out-cp", "out-linear", "out-ties", "lora-cache", "out-peft-cat", "out-peft-svd"
    )
    for key in ("calibration pass", "plain block-streamed forward"):
        try:
            runs[key]["pass_seconds"] = json.loads(
                runs[key]["tail"].strip().splitlines()[-1]
            )["seconds"]
        except (ValueError, IndexError, KeyError):
            pass
    report(args.size, size_b, runs, limit)


def report(size: str, size_b: int, runs: dict, limit: int) -> None:
    cp = runs["cp -r base"]["wall"]
    lin = runs["mergekit linear"]["wall"]
    base_anon = runs["python + mergekit import"]["peak_anon_gb"]
    rows = [
        "| workload | wall (s) | × cp | × mergekit linear | peak anon (GB) | above import baseline (GB) |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in runs.items():
        wall = (
            f"> {r['wall']:.0f} (timed out)" if r["timed_out"] else f"{r['wall']:.1f}"
        )
        if r["rc"] not in (0, None) and not r["timed_out"]:
            wall += f" (rc {r['rc']})"
        rows.append(
            f"| {key} | {wall} | {r['wall'] / cp:.2f} | {r['wall'] / lin:.2f} | "
            f"{r['peak_anon_gb']:.2f} | {r['peak_anon_gb'] - base_anon:+.2f} |"
        )
    cal, plain = runs["calibration pass"], runs["plain block-streamed forward"]
    extra = []
    if "pass_seconds" in cal and "pass_seconds" in plain:
        extra.append(
            f"- calibration pass alone: {cal['pass_seconds']:.1f} s against "
            f"{plain['pass_seconds']:.1f} s for a plain block-streamed forward over the "
            f"same prompts: ratio {cal['pass_seconds'] / plain['pass_seconds']:.2f}"
        )
    warm, warm500 = runs["tada warm cache"], runs["tada warm 500M"]
    extra.append(
        f"- tada (warm cache) / mergekit linear: {warm['wall'] / lin:.2f}; "
        f"tada warm 500M / linear 500M: "
        f"{warm500['wall'] / runs['mergekit linear 500M']['wall']:.2f}"
    )
    if "mergekit ties base+lora" in runs:
        extra.append(
            f"- mergekit ties base+lora / tada warm: "
            f"{runs['mergekit ties base+lora']['wall'] / warm['wall']:.1f}× slower"
        )
    limited = next((r for k, r in runs.items() if "memory limit" in k), None)
    if limited:
        extra.append(
            f"- under a hard cgroup memory limit of {limit / 1e9:.2f} GB "
            f"({limit / size_b:.0%} of the {size_b / 1e9:.2f} GB model): rc "
            f"{limited['rc']}, {limited['wall']:.1f} s; the cgroup's own peak (page "
            f"cache included) {limited.get('cgroup_peak_gb', 0):.2f} GB"
        )
    extra.append(
        f"- tada cold 500M peak anon above import baseline: "
        f"{runs['tada probe cold 500M']['peak_anon_gb'] - base_anon:.2f} GB = "
        f"{(runs['tada probe cold 500M']['peak_anon_gb'] - base_anon) * 1e9 / size_b:.2f} "
        f"× model bytes"
    )
    text = "\n".join(rows) + "\n\n" + "\n".join(extra) + "\n"
    print(text)
    doc = ROOT / "docs" / f"performance-{size}.md"
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
        f"Python {platform.python_version()}"
    )
    plot = _plot(size, runs)
    cmds = "\n".join(f"- {k}: `{r['cmd']}`" for k, r in runs.items())
    doc.write_text(
        f"# Performance, {size} model ({size_b / 1e9:.2f} GB bf16)\n\n"
        f"Machine: {machine}. Generated by `python bench/run.py {size}`; every row is its own "
        f"process, run one after another in one session. Peak anonymous memory is RssAnon "
        f"sampled every 50 ms (file-backed mmap pages excluded).\n\n{text}\n"
        f"![wall time and memory]({plot.name})\n\nCommands (in bench/work/{size}):\n\n{cmds}\n"
    )
    (ROOT / "docs" / f"performance-{size}.json").write_text(
        json.dumps(
            {
                k: {kk: vv for kk, vv in r.items() if kk != "tail"}
                for k, r in runs.items()
            },
            indent=2,
        )
    )
    print(f"wrote {doc}")


def _plot(size: str, runs: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in runs if k != "python + mergekit import"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    axes[0].barh(keys, [runs[k]["wall"] for k in keys], color="tab:blue")
    axes[0].set_xlabel("wall time (s)")
    axes[0].set_xscale("log")
    axes[1].barh(keys, [runs[k]["peak_anon_gb"] for k in keys], color="tab:orange")
    axes[1].set_xlabel("peak anonymous memory (GB)")
    axes[1].set_yticks([])
    fig.suptitle(f"mergekit-tada vs mergekit, PEFT and cp ({size} model)")
    fig.tight_layout()
    path = ROOT / "docs" / f"performance-{size}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
