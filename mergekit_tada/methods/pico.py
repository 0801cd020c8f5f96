"""Pico: calibrate shared directions in B-space before a merge (algorithms.md section 2).

Per module, with the scalings folded into B:
1. B_all = [B_1 | ... | B_T] = U S V^T (thin, d_out x sum r);
2. sharing score s_j = S_j^2 / sum_k S_k^2, keep factor a_j = 1 / (1 + (T - 1) s_j);
3. B~_t = B_t + U diag(a - 1) U^T B_t (directions outside span U untouched), A_t kept;
4. any merge rule runs on the calibrated adapters;
5. the merged update is scaled by gamma = mean_t ||dW_t||_F / ||dW_merged||_F with
   the original (uncalibrated) norms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergekit_tada.lowrank import Factored, ThinSVD, frobenius_sq


def calibrate(
    updates: Sequence[Factored | None],
) -> tuple[list[Factored | None], list[float]]:
    """The calibrated updates (None kept) and the sharing scores s_j."""
    present = [u for u in updates if u is not None]
    T = len(present)
    B_all = torch.cat([u.B.double() for u in present], dim=1)
    U, S, _ = torch.linalg.svd(B_all, full_matrices=False)
    energy = S**2
    total = float(energy.sum())
    if total == 0:
        return list(updates), [0.0] * S.numel()
    sharing = energy / total
    alpha = 1.0 / (1.0 + (T - 1) * sharing)
    out: list[Factored | None] = []
    for u in updates:
        if u is None:
            out.append(None)
            continue
        B = u.B.double()
        B_cal = B + U @ ((alpha - 1.0)[:, None] * (U.T @ B))
        out.append(Factored(B_cal.to(u.B.dtype), u.A))
    return out, [float(x) for x in sharing]


def restore_magnitude(
    merged: ThinSVD, originals: Sequence[Factored | None], scale: float = 1.0
) -> tuple[ThinSVD, float]:
    """Scale the merged update to the mean Frobenius norm of the original
    updates, times ``scale`` (the size of the rule's global scale, which the
    restoration would otherwise undo; its sign is in ``merged`` already)."""
    norms = [math.sqrt(frobenius_sq(u)) for u in originals if u is not None]
    merged_norm = math.sqrt(merged.energy())
    if merged_norm == 0:
        return merged, 1.0
    gamma = abs(scale) * (sum(norms) / len(norms)) / merged_norm
    return merged.scaled(gamma), gamma
