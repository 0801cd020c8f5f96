"""Iso-C and Iso-CTS: isotropic merging (Marczak et al., ICML 2025), on LoRA factors.

Iso-C flattens the spectrum of the summed update: every nonzero singular
value of sum_t w_t dW_t becomes their mean, so no direction of the sum
dominates. Iso-CTS keeps the top directions of the sum as a common space and
gives each task its own strongest directions outside it, then flattens the
whole. Both times a global ``lambda``.

Where this differs from the authors' code (``src/utils/iso.py``): the mean is
over the *nonzero* singular values (theirs averages all min(d_out, d_in) of a
full-rank ViT update; a sum of LoRAs has at most sum r, and averaging the
zeros would shrink it by (sum r) / min(d_out, d_in)); Iso-CTS sizes its
spaces from the stacked rank N = sum r_t in place of min(d_out, d_in), for
the same reason. Everything stays factored (lowrank.py): the sum's SVD from
the stacked factors, each task's residual off the common space as factors,
and the polar factors of thin (m x N, n x N) matrices as TSV-M's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_tada.errors import TadaError
from mergekit_tada.lowrank import Factored, ThinSVD, polar, stack, svd
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
from mergekit_tada.methods.params import SHARED, Param

LAMBDA = (scale_param(), AUTO_DATA, *AUTO_SETTINGS)


def flatten(s: ThinSVD, scale: float) -> ThinSVD:
    """The same singular vectors, every singular value their mean times ``scale``."""
    if len(s) == 0:
        return s
    mean = float(s.S.double().mean())
    return ThinSVD(s.left, torch.full_like(s.S, mean), s.right, s.x, s.y).scaled(scale)


def iso_c(
    updates: Sequence[Factored | None], weights: Sequence[float], scale: float
) -> ThinSVD:
    pairs = [(u, w) for u, w in zip(updates, weights, strict=True) if u is not None]
    return flatten(svd(stack([u for u, _ in pairs], [w for _, w in pairs])), scale)


def space_sizes(stacked_rank: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(common directions, directions per task), the authors' rounding: the
    task-specific total is a multiple of the task count."""
    common = int(stacked_rank * fraction)
    per_task = round((stacked_rank - common) / tasks)
    return stacked_rank - per_task * tasks, per_task


def iso_cts(
    updates: Sequence[Factored | None],
    weights: Sequence[float],
    fraction: float,
    scale: float,
    keep: int | None = None,
) -> ThinSVD:
    """``keep``: the output rank. A flat spectrum ties every direction, so a
    truncation after it would keep an arbitrary (input-order dependent)
    subspace: the ``keep`` directions with the largest singular values before
    flattening (the common space's and each task's own, ranked together) are
    chosen first, and keep the mean of all (the untruncated merge's value)."""
    pairs = [(u, w) for u, w in zip(updates, weights, strict=True) if u is not None]
    stacked_rank = sum(u.rank_bound for u, _ in pairs)
    common, per_task = space_sizes(stacked_rank, len(pairs), fraction)
    shared = svd(stack([u for u, _ in pairs], [w for _, w in pairs])).head(common)
    Uc = shared.U
    lefts, rights, sigmas = [Uc], [shared.V], [shared.S]
    for u, w in pairs:
        B = w * u.B.float()
        own = svd(Factored(B - Uc @ (Uc.T @ B), u.A)).head(per_task)
        lefts.append(own.U)
        rights.append(own.V)
        sigmas.append(own.S)
    sigma = torch.cat(sigmas)
    if sigma.numel() == 0:
        return shared.scaled(scale)
    mean = float(sigma.double().mean())
    U, V = torch.cat(lefts, dim=1), torch.cat(rights, dim=1)
    if keep is not None and keep < sigma.numel():
        # strongest first; a stable sort breaks exact ties by position
        chosen = torch.sort(-sigma.double(), stable=True).indices[:keep]
        U, V = U[:, chosen], V[:, chosen]
    return svd(Factored(polar(U) * mean, polar(V).T)).scaled(scale)


class LoraIsoC(FamilyMethod):
    spec = family_spec(
        "lora_iso_c",
        "Iso-C (isotropic merge of the summed update)",
        (WEIGHT, *LAMBDA, SPACE, MATCH_NORM),
    )

    def combine(self, job, updates):
        weights = self.per_input(job, updates, "weight")
        merged = iso_c(list(updates.values()), weights, job.params["lambda"])
        return merged, {"weights": weights}


class LoraIsoCts(FamilyMethod):
    spec = family_spec(
        "lora_iso_cts",
        "Iso-CTS (isotropic merge with common and task-specific spaces)",
        (
            WEIGHT,
            *LAMBDA,
            Param(
                "common_space_fraction",
                float,
                SHARED,
                0.8,
                "share of the stacked rank given to the sum's top directions",
            ),
            SPACE,
            MATCH_NORM,
        ),
    )

    def check(self, tensor: str, params: dict, inputs: dict[str, dict]) -> None:
        super().check(tensor, params, inputs)
        fraction = params["common_space_fraction"]
        if not 0 < fraction <= 1:
            raise TadaError(
                f"lora_iso_cts: common_space_fraction must be in (0, 1] (got "
                f"{fraction}) for {tensor}"
            )

    def combine(self, job, updates):
        weights = self.per_input(job, updates, "weight")
        merged = iso_cts(
            list(updates.values()),
            weights,
            job.params["common_space_fraction"],
            job.params["lambda"],
            keep=job.rank,
        )
        return merged, {"weights": weights}
