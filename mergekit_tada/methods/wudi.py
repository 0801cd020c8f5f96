"""WUDI-Merging, data-free (Cheng et al., ICML 2025, arXiv 2503.08099), closed form.

WUDI's merged update minimises sum_t ||(dW - dW_t) dW_t^T||^2 / ||dW_t||^2:
each task vector's rows stand in for its inputs. That is least squares with
input Grams G_t = dW_t^T dW_t / ||dW_t||^2, so its minimiser is RegMean's
closed form dW = (sum_t dW_t G_t)(sum_t G_t)^-1. Every G_t lives in the row
span of the stacked A's (orthonormal basis V, n x K), so with C_t = A_t V
(r_t x K) the solve is K x K:

    H = sum_t C_t^T (B_t^T B_t) C_t / f_t,   f_t = ||B_t A_t||^2
    dW = [w_1 B_1 ... w_T B_T] . stack_t(C_t C_t^T (B_t^T B_t) C_t / f_t) . H^-1 . V^T

(weights scale each task's term of the numerator; with w = 1, WUDI).
Directions outside the span have no data and get no update (the minimum-norm
solution). H is singular where some task's B kills part of its A's span;
a ridge of ``ridge`` times H's mean diagonal makes it definite (default 1e-6).

The authors run 300 Adam steps from the sum instead of solving
(``nlp_roberta/lamassu.py``); this is the point those steps head for. That
point's update is several times the sum's norm, so here ``match_norm``
defaults to ``sum`` (the other rules': ``none``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from mergekit_tada.errors import TadaError
from mergekit_tada.lowrank import (
    Factored,
    ThinSVD,
    column_basis,
    frobenius_sq,
    gram,
    right_solve,
    svd,
)
from mergekit_tada.methods.base import (
    AUTO_DATA,
    AUTO_SETTINGS,
    MATCH_NORM,
    WEIGHT,
    FamilyMethod,
    family_spec,
    scale_param,
)
from mergekit_tada.methods.params import SHARED, Param


def wudi(
    updates: Sequence[Factored | None],
    weights: Sequence[float],
    scale: float,
    ridge: float,
) -> ThinSVD | None:
    """The closed-form WUDI update (None: H singular even with the ridge)."""
    pairs = [
        (u, w, f)
        for u, w in zip(updates, weights, strict=True)
        if u is not None and (f := frobenius_sq(u)) > 0
    ]
    if not pairs:
        return svd(next(u for u in updates if u is not None))  # every update is 0
    V = column_basis(torch.cat([u.A.float() for u, _, _ in pairs]).T).double()
    H = torch.zeros(V.shape[1], V.shape[1], dtype=torch.float64)
    numerators = []
    for u, _, f in pairs:
        C = u.A.double() @ V
        G = C.T @ gram(u.B, "columns") @ C / f
        H += G
        numerators.append(C @ G)
    H += ridge * float(H.diagonal().mean()) * torch.eye(H.shape[0], dtype=H.dtype)
    solved = right_solve(torch.cat(numerators), H)
    if solved is None:
        return None
    B = torch.cat([w * scale * u.B.float() for u, w, _ in pairs], dim=1)
    return svd(Factored(B, (solved @ V.T).float()))


class LoraWudi(FamilyMethod):
    spec = family_spec(
        "lora_wudi",
        "WUDI-Merging, data-free closed form",
        (
            WEIGHT,
            scale_param(),
            AUTO_DATA,
            *AUTO_SETTINGS,
            Param("ridge", float, SHARED, 1e-6, "ridge, times H's mean diagonal"),
            # sum by default: the closed form's update is 4-8x the sum's norm,
            # and rescaled to it WUDI beats lambda 1 on every seed of both
            # real benchmarks (docs/quality-real.md: SmolLM2 68.0 -> 94.3 %,
            # MiniLM 39.7 -> 70.8 %)
            dataclasses.replace(MATCH_NORM, default="sum"),
        ),
    )

    def check(self, tensor: str, params: dict, inputs: dict[str, dict]) -> None:
        super().check(tensor, params, inputs)
        self.check_bounds(tensor, params, (("ridge", 0, None),))

    def combine(self, job, updates):
        weights = self.per_input(job, updates, "weight")
        merged = wudi(
            list(updates.values()), weights, job.params["lambda"], job.params["ridge"]
        )
        if merged is None:
            raise TadaError(
                f"lora_wudi: the system of {job.module} is singular: raise ridge "
                f"(now {job.params['ridge']})"
            )
        return merged, {"weights": weights}
