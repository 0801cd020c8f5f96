"""Per-module merge maths as rank and hidden size grow: O((m+n) r^2), not O(mn min(m,n)).

    python bench/scaling.py

Times TaDA's per-module work (thin SVDs of both updates, conflict test, merged
SVD, truncation) on random rank-r factors of an h x h module, single-threaded
as the merge runs it, and a dense SVD of the same h x h update for comparison
(what PEFT's `svd` combination does) at the sizes where it finishes quickly.
Prints log-log slopes.
"""

import math
import time

import torch

from mergekit_tada.lowrank import Factored, single_thread, truncate
from mergekit_tada.methods.tada import tada_combine


def module_time(h: int, r: int, repeats: int = 5) -> float:
    g = torch.Generator().manual_seed(h + r)
    t = Factored(torch.randn(h, r, generator=g), torch.randn(r, h, generator=g))
    d = Factored(torch.randn(h, r, generator=g), torch.randn(r, h, generator=g))

    def once():
        merged, _ = tada_combine(
            t, d, task_gate=0.5, domain_gate=0.5, conflict_elimination=True, kappa=0.3
        )
        truncate(merged, r)

    once()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - start)
    return best


def dense_svd_time(h: int, r: int) -> float:
    g = torch.Generator().manual_seed(h)
    M = torch.randn(h, r, generator=g) @ torch.randn(r, h, generator=g)
    start = time.perf_counter()
    torch.linalg.svd(M, full_matrices=False)
    return time.perf_counter() - start


def slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def _ms_row(times: list[float]) -> str:
    return (
        "| per-module TaDA maths (ms) | "
        + " | ".join(f"{t * 1e3:.1f}" for t in times)
        + " |"
    )


def main() -> None:
    lines = []
    with single_thread():
        ranks = [8, 16, 32, 64, 128]
        times = [module_time(4096, r) for r in ranks]
        lines.append("| h = 4096, rank r | " + " | ".join(map(str, ranks)) + " |")
        lines.append("|---|" + "---|" * len(ranks))
        lines.append(_ms_row(times))
        lines.append(
            f"\nlog-log slope over r = 32..128: {slope(ranks[2:], times[2:]):.2f} "
            "(r^2 work at large r; below that the O((m+n) r) products dominate)\n"
        )
        hidden = [1024, 2048, 4096, 8192]
        times = [module_time(h, 16) for h in hidden]
        dense = [dense_svd_time(h, 16) for h in hidden[:2]]
        lines.append("| rank 16, hidden h | " + " | ".join(map(str, hidden)) + " |")
        lines.append("|---|" + "---|" * len(hidden))
        lines.append(_ms_row(times))
        cells = [f"{t * 1e3:.0f}" for t in dense] + ["(not run)"] * (
            len(hidden) - len(dense)
        )
        lines.append(
            "| dense SVD of the h x h update (ms) | " + " | ".join(cells) + " |"
        )
        lines.append(
            f"\nlog-log slope in h: TaDA {slope(hidden, times):.2f} (linear in m + n); "
            f"dense SVD {slope(hidden[:2], dense):.2f} (cubic: O(mn min(m, n)))"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
