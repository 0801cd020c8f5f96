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

from mergekit_tada.lowrank import Factored, ThinSVD, gram, svd, svd_coordinates


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
    rows, cols = torch.nonzero(cosines < -kappa, as_tuple=True)
    if rows.numel() == 0:
        return Conflicts([], [])
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


def _kept(
    x: torch.Tensor, s: torch.Tensor, y: torch.Tensor, dropped: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD coordinates without the dropped components (views if none)."""
    if not dropped:
        return x, s, y
    keep = torch.tensor([i for i in range(len(s)) if i not in set(dropped)])
    return x[:, keep], s[keep], y[:, keep]


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
    kept components. The only m x k and k x n products are the Grams; the
    singular vectors stay in coordinates until truncation forms the kept ones.
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
    gram_b, gram_a = gram(B, "columns"), gram(A, "rows")
    t, d = slice(0, task.B.shape[1]), slice(task.B.shape[1], B.shape[1])
    x_t, s_t, y_t = svd_coordinates(gram_b[t, t], gram_a[t, t])
    x_d, s_d, y_d = svd_coordinates(gram_b[d, d], gram_a[d, d])
    conflicts = Conflicts([], [])
    if conflict_elimination:
        cosines = (x_t.T @ gram_b[t, d] @ x_d) * (y_t.T @ gram_a[t, d] @ y_d)
        conflicts = find_conflicts(cosines, s_t, s_d, task_gate, domain_gate, kappa)
    kx_t, ks_t, ky_t = _kept(x_t, s_t, y_t, conflicts.dropped_task)
    kx_d, ks_d, ky_d = _kept(x_d, s_d, y_d, conflicts.dropped_domain)
    # merged = B P Q^T A with block-diagonal coordinates P (scaled) and Q
    P = torch.block_diag(kx_t * (task_gate * ks_t), kx_d * (domain_gate * ks_d))
    Q = torch.block_diag(ky_t, ky_d)
    x, s, y = svd_coordinates(P.T @ gram_b @ P, Q.T @ gram_a @ Q)
    merged = ThinSVD(B, s.float(), A.T, P @ x, Q @ y)
    record.update(
        dropped_task=conflicts.dropped_task,
        sigma_task=_sigmas(s_t),
        dropped_domain=conflicts.dropped_domain,
        sigma_domain=_sigmas(s_d),
    )
    return merged, record
