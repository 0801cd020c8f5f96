"""Our data-free and RegMean merges against the authors' own functions, on tiny cases.

    python bench/parity_authors.py MIRRORS

MIRRORS holds clones of the authors' repositories (``<owner>+<name>/repo``:
danielm1405/iso-merging, apanariello4/core-space-merging,
ZhengbaoHe/compress-then-merge, nathanielyvo/WUDI-Merging,
tanganke/fusion_bench). Their functions are read from those files and run
as they are (only ``.cuda()`` is made a no-op, and modules they import but
these functions do not use are skipped); nothing of theirs is copied here.
Needs ``tensorly`` (CtM's ``partial_tucker``): ``pip install tensorly``.
Prints one row per method: the relative difference between their merged
update and ours on three random rank-4 LoRAs of one module (docs/parity.md).
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from mergekit_tada.lowrank import Factored
from mergekit_tada.methods.base import ModuleJob
from mergekit_tada.methods.core_space import core_space
from mergekit_tada.methods.ctm import LoraCtm
from mergekit_tada.methods.iso import iso_c, iso_cts
from mergekit_tada.methods.tsv_m import tsv_m
from mergekit_tada.methods.wudi import wudi
from mergekit_tada.probe.grams import _Sums


def functions(repo: Path, path: str, names: list[str], extra: dict) -> dict:
    """The named top-level or class-level functions of a file at HEAD, executed."""
    source = subprocess.run(
        ["git", "-C", str(repo), "show", f"HEAD:{path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    wanted = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name in names:
            wanted.append(node)
    namespace = {"torch": torch, "math": math, **extra}
    exec(compile(ast.Module(wanted, []), path, "exec"), namespace)  # noqa: S102
    return namespace


def dense(s) -> torch.Tensor:
    return (s.U.double() * s.S.double()) @ s.V.double().T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def wudi_on_real(root: Path, adam) -> list[tuple[str, float]]:
    """The authors' 300 Adam steps against the closed form on real adapters
    (bench/real's five SmolLM2 multi-task LoRAs), a few modules."""
    from mergekit_tada.adapters import LoraAdapter

    adapters = [LoraAdapter(str(p)) for p in sorted(root.glob("lora-*"))]
    rows = []
    for module in (
        "model.layers.0.self_attn.q_proj",
        "model.layers.15.mlp.down_proj",
        "model.layers.29.self_attn.o_proj",
    ):
        fs = [a.factors(module) for a in adapters]
        deltas = [f.dense().double() for f in fs]
        closed = dense(wudi(fs, [1.0] * len(fs), 1.0, 1e-6))
        steps = adam("w", torch.stack([d.float() for d in deltas]), iter_num=300)

        def loss(W, deltas=deltas):
            return float(
                sum(
                    ((W.double() - d) @ d.T).norm() ** 2 / d.norm() ** 2 for d in deltas
                )
            )

        total = sum(deltas)
        rows.append(
            (
                f"WUDI on real adapters, {module}: loss sum {loss(total):.3g}, Adam "
                f"{loss(steps):.3g}, closed {loss(closed):.3g}; |Adam - sum| / |sum| "
                f"{rel(steps, total):.2f}",
                rel(closed, steps),
            )
        )
    return rows


def main() -> None:
    mirrors = Path(sys.argv[1])
    repo = {p.name.split("+")[1]: p / "repo" for p in mirrors.glob("*+*")}
    g = torch.Generator().manual_seed(0)
    m, n, r, T = 12, 16, 4, 3  # min(m, n) = sum r: the authors' full-rank sizing
    Bs = [torch.randn(m, r, generator=g, dtype=torch.float64) for _ in range(T)]
    As = [torch.randn(r, n, generator=g, dtype=torch.float64) * 0.1 for _ in range(T)]
    deltas = [b @ a for b, a in zip(Bs, As, strict=True)]
    ours = [Factored(b.float(), a.float()) for b, a in zip(Bs, As, strict=True)]
    ones = [1.0] * T
    rows = []

    # Iso-C / Iso-CTS (iso-merging, src/utils/iso.py)
    iso = functions(repo["iso-merging"], "src/utils/iso.py", ["iso_c", "iso_cts"], {})
    tv = [SimpleNamespace(vector={"w": d}) for d in deltas]
    config = SimpleNamespace(
        device="cpu",
        DATASETS=list(range(T)),
        method=SimpleNamespace(common_space_fraction=0.8),
    )
    rows.append(
        ("Iso-C", rel(dense(iso_c(ours, ones, 1.0)), iso["iso_c"](tv, config)["w"]))
    )
    rows.append(
        (
            "Iso-CTS",
            rel(dense(iso_cts(ours, ones, 0.8, 1.0)), iso["iso_cts"](tv, config)["w"]),
        )
    )
    # the sizing deviation: two rank-4 updates (sum r = 8) of a 12 x 16 module
    rows.append(
        (
            "Iso-C, sum r = 8 < min(m, n) = 12 (theirs: mean over 12 values, 4 of "
            "them 0, and 4 arbitrary null directions)",
            rel(
                dense(iso_c(ours[:2], ones[:2], 1.0)),
                iso["iso_c"](
                    tv[:2], SimpleNamespace(**{**vars(config), "DATASETS": [0, 1]})
                )["w"],
            ),
        )
    )

    # Core space TSV-M (core-space-merging, task_merger.py)
    core = functions(
        repo["core-space-merging"],
        "task_merger.py",
        ["get_core_matrices", "get_tsv_delta_w", "isotropize_matrix"],
        {},
    )
    holder = SimpleNamespace(cache={})
    params = [{"w": (a, b)} for a, b in zip(As, Bs, strict=True)]
    M, U_B, Vh_A = core["get_core_matrices"](holder, params, "w", {})
    theirs = U_B @ core["get_tsv_delta_w"](None, M) @ Vh_A
    space = core_space(ours)
    mine = space.lift(tsv_m([space.project(f) for f in ours], ones, 1.0))
    rows.append(("TSV-M in core space", rel(dense(mine), theirs)))
    theirs = U_B @ core["isotropize_matrix"](sum(M)) @ Vh_A
    rows.append(
        (
            "Iso-C in core space (their isotropize)",
            rel(dense(iso_c(ours, ones, 1.0)), theirs),
        )
    )

    # CtM (compress-then-merge, task_merger.py): Tucker-2 in core space, TA rule
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    ctm = functions(
        repo["compress-then-merge"],
        "task_merger.py",
        ["util_get_core_matrices", "get_low_rank_components_in_core_space"],
        {
            "time": __import__("time"),
            "tl": tl,
            "partial_tucker": partial_tucker,
            "float32_dtype": torch.float64,
        },
    )
    self = SimpleNamespace(device="cpu")
    self.util_get_core_matrices = lambda **kw: ctm["util_get_core_matrices"](self, **kw)
    for beta in (0.0, 1.0):
        U0, U1, cores = ctm["get_low_rank_components_in_core_space"](
            self, As, Bs, rank=5, beta=beta
        )
        theirs = U0 @ sum(cores) @ U1.T
        job = ModuleJob(
            module="w",
            updates={},
            params={
                "beta": beta,
                "tol": 1e-6,
                "max_iter": 1000,
                "rule": "task_arithmetic",
                "lambda": 1.0,
            },
            inputs={str(t): {"weight": 1.0, "density": 1.0} for t in range(T)},
            sources={},
            rank=5,
        )
        merged, _ = LoraCtm().combine(job, {str(t): f for t, f in enumerate(ours)})
        rows.append((f"CtM + TA, r 5, beta {beta:g}", rel(dense(merged), theirs)))

    # WUDI (WUDI-Merging, vit/wudi_main.py): 300 Adam steps vs the closed form
    torch.Tensor.cuda = lambda self, *a, **k: self  # their function calls .cuda()
    wudi_fns = functions(
        repo["WUDI-Merging"],
        "vit/wudi_main.py",
        ["get_redundant_task_vector"],
        {"tqdm": lambda x: x},
    )
    stacked = torch.stack([d.float() for d in deltas])
    adam = wudi_fns["get_redundant_task_vector"]("w", stacked.clone(), iter_num=300)
    closed = dense(wudi(ours, ones, 1.0, 0.0))
    total = sum(deltas)

    def loss(W):
        return float(
            sum(((W.double() - d) @ d.T).norm() ** 2 / d.norm() ** 2 for d in deltas)
        )

    rows.append(
        (
            f"WUDI: Adam (300 steps, lr 1e-5) vs closed form; loss sum {loss(total):.4g}, "
            f"Adam {loss(adam):.4g}, closed {loss(closed):.4g}",
            rel(closed, adam),
        )
    )

    # RegMean (fusion_bench, method/regmean/regmean.py), given the same Grams
    fb = functions(
        repo["fusion_bench"],
        "fusion_bench/method/regmean/regmean.py",
        ["reduce_non_diagonal_elements", "merging_with_regmean_weights"],
        {},
    )
    W0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = [torch.randn(40, n, generator=g, dtype=torch.float64) for _ in range(T)]
    grams = [x.T @ x / len(x) for x in X]
    merged = fb["merging_with_regmean_weights"](
        {"w.weight": [W0 + d for d in deltas]},
        [{"w": gm} for gm in grams],
        reduce_non_diagonal_ratio=0.9,
    )["w.weight"]
    sums = _Sums(n, {t: ours[t].A for t in range(T)}, "cpu")
    for t in range(T):
        sums.gram += grams[t]
        sums.AG[t] += ours[t].A.double() @ grams[t]
        sums.diag[t] += grams[t].diagonal()
    R = sums.reduce(0.9, "w")
    mine = sum(ours[t].B.double() @ R[t].double() for t in range(T))
    rows.append(("RegMean, same Grams (alpha 0.9)", rel(mine, merged - W0)))

    if len(sys.argv) > 2:  # WUDI on real adapters: bench/real's seed-0 folder
        rows += wudi_on_real(Path(sys.argv[2]), wudi_fns["get_redundant_task_vector"])
    print("| method | relative difference, ours vs the authors' function |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.2e} |")


if __name__ == "__main__":
    main()
