"""Interpreter start-up with and without the mergekit-tada .pth hook, side by side.

Runs `python -c pass` N times in alternating rounds (these machines are noisy)
and prints the medians and their ratio. Usage: python bench/startup.py [N]
"""

import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

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
