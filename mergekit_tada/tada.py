"""The TaDA per-module merge (algorithms.md section 1, steps 4-5).

Given the task and domain updates of one module (factored, scaling folded in)
and their gates:

1. thin SVD of each update from its r x r core;
2. conflict elimination: components i (task) and j (domain) conflict when
   c_ij = (u_i . u'_j)(v_i . v'_j) < -kappa, i.e. they point in opposite
   directions of weight space. Pairs are visited from the most negative c_ij
   up; of each pair whose members are both still kept, the one with the smaller
   gated strength (w_T sigma_i vs w_D sigma'_j) is dropped (a tie drops the
   domain component);
3. gated combination of the kept components, w_T dT' + w_D dD'.

A module present in one adapter only keeps that adapter's gated update. The
result is returned as a thin SVD; truncation to rank r (B = U S^1/2,
A = S^1/2 V^T) is shared with the other methods (methods.LoraMergeMethod).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergekit_tada.lowrank import Factored, ThinSVD, svd, svd_of_parts


@dataclass(frozen=True)
class Conflicts:
    dropped_task: list[int]
    dropped_domain: list[int]


def find_conflicts(
    task: ThinSVD, domain: ThinSVD, task_gate: float, domain_gate: float, kappa: float
) -> Conflicts:
    """Indices (into each SVD, descending sigma order) of the components to drop."""
    if len(task) == 0 or len(domain) == 0:
        return Conflicts([], [])
    c = (task.U.T @ domain.U) * (task.V.T @ domain.V)  # r_T x r_D
    rows, cols = torch.nonzero(c < -kappa, as_tuple=True)
    order = torch.argsort(c[rows, cols], stable=True)
    strength_t = (task.S * task_gate).tolist()
    strength_d = (domain.S * domain_gate).tolist()
    dropped_t: set[int] = set()
    dropped_d: set[int] = set()
    for k in order.tolist():
        i, j = int(rows[k]), int(cols[k])
        if i in dropped_t or j in dropped_d:
            continue
        if strength_t[i] < strength_d[j]:
            dropped_t.add(i)
        else:
            dropped_d.add(j)
    return Conflicts(sorted(dropped_t), sorted(dropped_d))


def tada_combine(
    task: Factored | None,
    domain: Factored | None,
    *,
    task_gate: float,
    domain_gate: float,
    conflict_elimination: bool,
    kappa: float,
) -> tuple[ThinSVD, dict]:
    """The merged update of one module (thin SVD) and its report record."""
    parts: list[ThinSVD] = []
    record: dict = {"task_gate": task_gate, "domain_gate": domain_gate}
    svd_t = svd(task) if task is not None else None
    svd_d = svd(domain) if domain is not None else None
    conflicts = Conflicts([], [])
    if conflict_elimination and svd_t is not None and svd_d is not None:
        conflicts = find_conflicts(svd_t, svd_d, task_gate, domain_gate, kappa)
    for name, s, dropped, gate in (
        ("task", svd_t, conflicts.dropped_task, task_gate),
        ("domain", svd_d, conflicts.dropped_domain, domain_gate),
    ):
        if s is None:
            record[f"dropped_{name}"] = []
            continue
        kept = [i for i in range(len(s)) if i not in set(dropped)]
        parts.append(s.take(kept).scaled(gate))
        record[f"dropped_{name}"] = dropped
        record[f"sigma_{name}"] = [float(f"{x:.6g}") for x in s.S.tolist()]
    return svd_of_parts(parts), record
