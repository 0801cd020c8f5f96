"""Magnitude prune on LoRA updates: PEFT's ``magnitude_prune`` combination, exact in dW.

Per module, each input's dense update keeps its int(density * n) largest
entries by magnitude (all of them at density 1), and the merge is
sum_t w_t prune(dW_t). PEFT's ``add_weighted_adapter(combination_type=
"magnitude_prune")`` applies this to the A and B factors separately (whose
product is not the pruned update); here it is applied to each dW_t, which is
PEFT's ``merge_utils.magnitude_prune`` on the dense updates (tested), with a
density per input. No sign election, no rescaling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_tada.methods.base import (
    DENSITY,
    SPACE,
    WEIGHT,
    FamilyMethod,
    family_spec,
)
from mergekit_tada.methods.dense import dense_merge


def prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The int(density * n) largest entries by magnitude (ties: the first found)."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    flat = delta.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[torch.topk(flat.abs(), k).indices] = 1
    return (flat * keep).reshape(delta.shape)


def magnitude_prune(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], densities: Sequence[float]
) -> torch.Tensor:
    return sum(
        w * prune(d, rho) for d, w, rho in zip(deltas, weights, densities, strict=True)
    )


class LoraMagnitudePrune(FamilyMethod):
    spec = family_spec(
        "lora_magnitude_prune",
        "Magnitude prune on LoRA updates (PEFT's magnitude_prune, exact)",
        (WEIGHT, DENSITY, SPACE),
    )

    def rank_limit(self, source_ranks: list[int], shape: tuple[int, int]) -> int:
        return min(shape)  # pruning makes the update dense

    def combine(self, job, updates):
        weights = self.per_input(job, updates, "weight")
        densities = self.per_input(job, updates, "density")
        merged = dense_merge(
            lambda deltas: magnitude_prune(deltas, weights, densities),
            list(updates.values()),
            job.rank,
        )
        return merged, {"weights": weights, "densities": densities}
