"""The TaDA per-module merge (algorithms.md section 1, steps 4-5).

Given the task and domain updates of one module (factored, scaling folded in)
and their gates:

1. thin SVD of each update from its r x r core (in the coordinates of the
   stacked factors, see ``tada_combine``);
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

from mergekit_tada.lowrank import Factored, ThinSVD, svd, svd_coordinates


@dataclass(frozen=True)
class Conflicts:
    dropped_task: list[int]
    dropped_domain: list[int]


def find_conflicts(
    cosines: torch.Tensor,
    sigma_task: torch.Tensor,
    sigma_domain: torch.Tensor,
    task_gate: float,
    domain_gate: float,
    kappa: float,
) -> Conflicts:
    """Indices (into each SVD, descending sigma order) of the components to drop.

    ``cosines[i, j]`` = (u_i . u'_j)(v_i . v'_j), r_T x r_D.
    """
    if cosines.numel() == 0:
        return Conflicts([], [])
    rows, cols = torch.nonzero(cosines < -kappa, as_tuple=True)
    order = torch.argsort(cosines[rows, cols], stable=True)
    strength_t = (sigma_task * task_gate).tolist()
    strength_d = (sigma_domain * domain_gate).tolist()
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


def _sigmas(s: torch.Tensor) -> list[float]:
    return [float(f"{x:.6g}") for x in s.tolist()]


def tada_combine(
    task: Factored | None,
    domain: Factored | None,
    *,
    task_gate: float,
    domain_gate: float,
    conflict_elimination: bool,
    kappa: float,
) -> tuple[ThinSVD, dict]:
    """The merged update of one module (thin SVD) and its report record.

    With both adapters present, everything runs in the coordinates of the
    stacked factors B = [B_T | B_D], A = [A_T; A_D]: one float64 Gram per side
    gives both adapters' SVDs (their diagonal blocks), the conflict cosines
    (U_T^T U_D = X_T^T (B_T^T B_D) X_D) and the SVD of the gated sum of the
    kept components; the only m x k and k x n products are the Grams and the
    final singular vectors.
    """
    record: dict = {"task_gate": task_gate, "domain_gate": domain_gate}
    if task is None or domain is None:
        role, update, gate = (
            ("task", task, task_gate)
            if domain is None
            else ("domain", domain, domain_gate)
        )
        single = svd(update)
        record.update(dropped_task=[], dropped_domain=[])
        record[f"sigma_{role}"] = _sigmas(single.S)
        return single.scaled(gate), record
    B = torch.cat([task.B.float(), domain.B.float()], dim=1)
    A = torch.cat([task.A.float(), domain.A.float()], dim=0)
    B64, A64 = B.double(), A.double()
    gram_b, gram_a = B64.T @ B64, A64 @ A64.T
    t, d = slice(0, task.B.shape[1]), slice(task.B.shape[1], B.shape[1])
    x_t, s_t, y_t = svd_coordinates(gram_b[t, t], gram_a[t, t])
    x_d, s_d, y_d = svd_coordinates(gram_b[d, d], gram_a[d, d])
    conflicts = Conflicts([], [])
    if conflict_elimination:
        cosines = (x_t.T @ gram_b[t, d] @ x_d) * (y_t.T @ gram_a[t, d] @ y_d)
        conflicts = find_conflicts(cosines, s_t, s_d, task_gate, domain_gate, kappa)
    keep_t = [i for i in range(len(s_t)) if i not in set(conflicts.dropped_task)]
    keep_d = [j for j in range(len(s_d)) if j not in set(conflicts.dropped_domain)]
    # merged = B P Q^T A with block-diagonal coordinates P (scaled) and Q
    k, n_t = B.shape[1], len(keep_t)
    P = torch.zeros(k, n_t + len(keep_d), dtype=torch.float64, device=B.device)
    Q = torch.zeros_like(P)
    P[t, :n_t] = x_t[:, keep_t] * (task_gate * s_t[keep_t])
    P[d, n_t:] = x_d[:, keep_d] * (domain_gate * s_d[keep_d])
    Q[t, :n_t] = y_t[:, keep_t]
    Q[d, n_t:] = y_d[:, keep_d]
    x, s, y = svd_coordinates(P.T @ gram_b @ P, Q.T @ gram_a @ Q)
    merged = ThinSVD(B @ (P @ x).float(), s.float(), A.T @ (Q @ y).float())
    record.update(
        dropped_task=conflicts.dropped_task,
        sigma_task=_sigmas(s_t),
        dropped_domain=conflicts.dropped_domain,
        sigma_domain=_sigmas(s_d),
    )
    return merged, record
