"""Start-up costs, side by side in alternating rounds (these machines are noisy).

    python bench/startup.py [N]
        `python -c pass` with and without the mergekit-tada .pth hook.
    python bench/startup.py adapter-only DIR [N]
        the whole `mergekit-tada CONFIG OUT --adapter-only` process on the
        benchmark model in DIR (bench/generate.py) against bench/plain_adapter.py,
        a torch + safetensors script that reads the same factors and writes an
        adapter (the floor for such a process).
Prints the medians and their ratio.
"""

import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

if len(sys.argv) > 1 and sys.argv[1] == "adapter-only":
    folder = Path(sys.argv[2]).resolve()
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    (folder / "startup.yml").write_text(
        "merge_method: lora_task_arithmetic\nbase_model: ./base\nmodels:\n"
        "  - model: ./base+./lora-a\n  - model: ./base+./lora-b\n"
        "parameters: {lossless: true}\ndtype: bfloat16\n"
    )
    bindir = Path(sys.executable).parent
    plain_script = Path(__file__).with_name("plain_adapter.py")
    commands = {
        "mergekit-tada --adapter-only": [
            str(bindir / "mergekit-tada"),
            "startup.yml",
            "out-startup",
            "--adapter-only",
            "--quiet",
        ],
        "plain torch + safetensors": [
            sys.executable,
            str(plain_script),
            "lora-a",
            "lora-b",
            "out-plain",
        ],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(n):
        for name, cmd in commands.items():
            start = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=folder, capture_output=True)
            times[name].append(time.perf_counter() - start)
    ours, plain = (statistics.median(t) for t in times.values())
    print(
        f"{folder.name}, median of {n}: mergekit-tada --adapter-only {ours:.2f} s, "
        f"plain script {plain:.2f} s, ratio {ours / plain:.2f}"
    )
    sys.exit()

N = int(sys.argv[1]) if len(sys.argv) > 1 else 60
pth = Path(sysconfig.get_paths()["purelib"]) / "mergekit_tada_hook.pth"
if not pth.exists():
    sys.exit(f"{pth} not found: install mergekit-tada first")
parked = Path(tempfile.mkdtemp()) / pth.name


def once() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


with_hook, without = [], []
try:
    for _ in range(N):
        with_hook.append(once())
        shutil.move(pth, parked)
        without.append(once())
        shutil.move(parked, pth)
finally:
    if parked.exists():
        shutil.move(parked, pth)
a, b = statistics.median(with_hook), statistics.median(without)
print(
    f"python -c pass, median of {N}: with hook {a * 1e3:.1f} ms, "
    f"without {b * 1e3:.1f} ms, ratio {a / b:.3f}"
)
