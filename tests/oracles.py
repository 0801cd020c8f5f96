"""Dense float64 references written from the papers' equations, independent of
mergekit_tada and of mergekit: what the parity tests compare against."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: keep the int(density * n) (at least 1) largest |entries|."""
    if density >= 1:
        return delta.clone()
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[torch.argsort(flat.abs(), descending=True)[:k]] = 1
    return (flat * keep).reshape(delta.shape)


def ties(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    normalize: bool = True,
) -> torch.Tensor:
    """TIES-merging (Yadav et al., 2023): trim, elect the sign of the weighted
    sum (the 'sum' election; 0 counts as +), disjoint mean of the agreeing
    weighted entries (the mean over the weights of the entries that agree;
    without ``normalize``, their sum)."""
    trimmed = torch.stack(
        [
            w * trim(d.double(), rho)
            for d, w, rho in zip(deltas, weights, densities, strict=True)
        ]
    )
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).double()
    agree = trimmed.sign() == elected
    w = torch.tensor(list(weights), dtype=torch.float64).view(-1, *[1] * elected.dim())
    divisor = (w * agree).sum(0) if normalize else torch.ones_like(elected)
    divisor[divisor == 0] = 1
    return (trimmed * agree).sum(0) / divisor


def dare_masks(
    deltas: Sequence[torch.Tensor], densities: Sequence[float], seed: int
) -> list[torch.Tensor]:
    """DARE's random drop (Yu et al., 2024): keep each entry with probability
    density, drawn in input order from torch's generator seeded with ``seed``
    (float32 Bernoulli draws, as on the CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [
            torch.bernoulli(torch.full(d.shape, rho, dtype=torch.float32)).double()
            if rho < 1
            else torch.ones(d.shape, dtype=torch.float64)
            for d, rho in zip(deltas, densities, strict=True)
        ]


def l1_rescaled(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The kept entries scaled so the L1 norm is unchanged (mergekit's rescale;
    the DARE paper divides by the density, equal in expectation)."""
    kept = delta * mask
    total = kept.abs().sum()
    return kept * (delta.abs().sum() / total) if total > 0 else kept


def knots_ties(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
) -> torch.Tensor:
    """KnOTS-TIES (Stoica et al., 2024): SVD of the column-stacked updates
    [dW_1 | ... | dW_T] = U S V^T; task t's coefficients are the block
    S V_t^T (r x d_in); TIES merges the blocks; the update is U times them."""
    n = deltas[0].shape[1]
    u, s, vh = torch.linalg.svd(torch.cat([d.double() for d in deltas], 1), False)
    k = int((s > s[0] * 1e-9).sum())
    u, coefficients = u[:, :k], s[:k, None] * vh[:k]
    blocks = [coefficients[:, t * n : (t + 1) * n] for t in range(len(deltas))]
    return u @ ties(blocks, weights, densities)
