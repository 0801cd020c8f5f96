"""TSV-M, task singular vectors merge, on LoRA factors (algorithms.md section 3).

Per module: the SVD of each update (from its factors), its top
floor(min(m, n) / T) triplets kept, U's and V's concatenated and orthogonalised
by their polar factors, the singular values (times each input's weight) kept,
times a global ``alpha``. ``match_norm: mean`` rescales each module's merged
update to the mean norm of the weighted input updates (times ``alpha``): a
scale from the adapters alone, measured in docs/quality-real.md (better on
MiniLM on every seed, not on SmolLM2), so not the default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_tada.lowrank import Factored, ThinSVD, polar, svd
from mergekit_tada.methods.base import (
    AUTO_DATA,
    AUTO_SETTINGS,
    MATCH_NORM,
    SPACE,
    WEIGHT,
    FamilyMethod,
    family_spec,
    scale_param,
)


def tsv_m(
    updates: Sequence[Factored | None], weights: Sequence[float], alpha: float
) -> ThinSVD:
    """Task singular vectors merge: concatenate per-task SVDs, orthogonalise U and V."""
    pairs = [
        (svd(u), w) for u, w in zip(updates, weights, strict=True) if u is not None
    ]
    m, n = pairs[0][0].U.shape[0], pairs[0][0].V.shape[0]
    per_task = min(m, n) // len(pairs)
    kept = [(s.head(per_task), w) for s, w in pairs]
    U = torch.cat([s.U for s, _ in kept], dim=1)
    V = torch.cat([s.V for s, _ in kept], dim=1)
    sigma = torch.cat([s.S * w for s, w in kept])
    return svd(Factored(polar(U) * (alpha * sigma), polar(V).T))


class LoraTsvM(FamilyMethod):
    scale_key = "alpha"
    spec = family_spec(
        "lora_tsv_m",
        "TSV-M (task singular vectors merge) on LoRA factors",
        (
            WEIGHT,
            scale_param("alpha"),
            AUTO_DATA,
            *AUTO_SETTINGS,
            SPACE,
            MATCH_NORM,
        ),
    )

    def combine(self, job, updates):
        weights = self.per_input(job, updates, "weight")
        merged = tsv_m(list(updates.values()), weights, job.params["alpha"])
        return merged, {"weights": weights}
