"""The objective that learns merge coefficients from unlabeled text.

Task i's unlabeled text gives H_i(phi): the mean entropy of the next-token
distribution softmax(logits) over its non-padding positions (every position's
prediction). z_i is the same for input i alone (its own update), computed
once over all of task i's batches. With preference rho (summing to 1) and
alpha = 1 by default:

    stch:    Psi(phi) = alpha * log sum_i exp(rho_i (H_i(phi) - z_i) / alpha)
    linear:  Psi(phi) = sum_i rho_i (H_i(phi) - z_i)

The sum over positions runs on one torch thread on the CPU, so its bits do
not depend on the thread count.
"""

from __future__ import annotations

import torch

from mergekit_tada.lowrank import single_thread

OBJECTIVES = ("stch", "linear")


def objective_value(
    gaps: torch.Tensor, preference: torch.Tensor, objective: str, alpha: float
) -> torch.Tensor:
    """Psi from the per-task gaps H_i - z_i (see this module's docstring)."""
    if objective == "linear":
        return (preference * gaps).sum()
    return alpha * torch.logsumexp(preference * gaps / alpha, dim=0)


def entropy_sum(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token entropies over positions where mask is 1, and their count."""
    # at least float32 (bf16 logits lose the entropy), float64 kept for tests
    logp = torch.log_softmax(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1
    )
    entropy = -(logp.exp() * logp).sum(-1)
    valid = mask.bool()
    # a sum over every position: on one thread, so its bits do not depend on
    # the thread count. The rest of a training step keeps its threads: matmuls
    # and per-row reductions (softmax, norms) do not sum across threads
    # (measured identical on 1 and 2 threads; tests/test_tara.py).
    with single_thread(logits.device):
        total = entropy[valid].sum()
    return total, int(valid.sum())
