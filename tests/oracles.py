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


# ------------------------------------------------ data-free and data-aware merges


def nonzero_svd(M: torch.Tensor, tolerance: float = 1e-6):
    """SVD of a dense matrix without its (numerically) zero singular values."""
    u, s, vh = torch.linalg.svd(M.double(), full_matrices=False)
    keep = s > s[0] * tolerance if s.numel() and s[0] > 0 else s > 0
    return u[:, keep], s[keep], vh[keep]


def iso_c(deltas, weights, scale: float = 1.0) -> torch.Tensor:
    """Iso-C (Marczak et al., 2025): the sum's singular values all set to their
    mean (nonzero ones: a sum of LoRAs), times a global scale."""
    total = sum(w * d.double() for d, w in zip(deltas, weights, strict=True))
    u, s, vh = nonzero_svd(total)
    return scale * s.mean() * u @ vh


def polar(X: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(X.double(), full_matrices=False)
    return p @ qh


def iso_cts(
    deltas,
    weights,
    fraction: float,
    stacked_rank: int,
    scale: float = 1.0,
    keep: int | None = None,
):
    """Iso-CTS: the sum's top directions as the common space, each task's top
    directions off it, polar-orthogonalised, spectrum flattened; the space
    sizes from ``stacked_rank`` (sum r) as min(d_out, d_in) in the paper.
    ``keep``: only the directions with the ``keep`` largest singular values
    (before flattening) are orthogonalised, at the mean of all."""
    T = len(deltas)
    common = int(stacked_rank * fraction)
    per_task = round((stacked_rank - common) / T)
    common = stacked_rank - per_task * T
    weighted = [w * d.double() for d, w in zip(deltas, weights, strict=True)]
    u, s, vh = nonzero_svd(sum(weighted))
    Uc, Sc, Vc = u[:, :common], s[:common], vh[:common]
    us, ss, vs = [Uc], [Sc], [Vc.T]
    for d in weighted:
        ut, st, vt = nonzero_svd(d - Uc @ Uc.T @ d)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vs.append(vt[:per_task].T)
    values = torch.cat(ss)
    U, V = torch.cat(us, 1), torch.cat(vs, 1)
    if keep is not None and keep < len(values):
        order = sorted(range(len(values)), key=lambda i: -float(values[i]))[:keep]
        U, V = U[:, order], V[:, order]
    return scale * values.mean() * polar(U) @ polar(V).T


def least_squares_merge(deltas, grams, weights=None) -> torch.Tensor:
    """argmin_W sum_t ||X_t W^T - X_t dW_t^T||^2 with X_t^T X_t = G_t (weights
    on each task's target), through the pseudo-inverse: RegMean's closed form."""
    weights = weights or [1.0] * len(deltas)
    numerator = sum(
        w * d.double() @ g.double()
        for d, g, w in zip(deltas, grams, weights, strict=True)
    )
    return numerator @ torch.linalg.pinv(sum(g.double() for g in grams))


def wudi(deltas, weights, scale: float = 1.0) -> torch.Tensor:
    """WUDI (Cheng et al., 2025): the minimiser of
    sum_t ||(W - dW_t) dW_t^T||^2 / ||dW_t||^2."""
    grams = [d.double().T @ d.double() / d.double().norm() ** 2 for d in deltas]
    return scale * least_squares_merge(deltas, grams, list(weights))


def wudi_loss(W: torch.Tensor, deltas) -> float:
    return float(
        sum(
            ((W.double() - d.double()) @ d.double().T).norm() ** 2
            / d.double().norm() ** 2
            for d in deltas
        )
    )


def regmean_grams(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """RegMean's regularised Gram: off-diagonal entries times alpha."""
    g = gram.double()
    return alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))


def core_bases(Bs, As):
    """Core space (Panariello et al., 2025): left singular vectors of the
    stacked B's, right singular vectors of the stacked A's (dense SVDs)."""
    u, s, _ = torch.linalg.svd(
        torch.cat([b.double() for b in Bs], 1), full_matrices=False
    )
    _, t, vh = torch.linalg.svd(
        torch.cat([a.double() for a in As], 0), full_matrices=False
    )
    return u[:, s > s[0] * 1e-6], vh[t > t[0] * 1e-6].T


def tucker2(tensors, rank: int, tol: float = 1e-6, max_iter: int = 1000):
    """Tucker-2 of the m x n x T stack by HOOI from the HOSVD (dense SVDs of the
    unfoldings), stopped when the relative error changes by less than tol."""
    X = [t.double() for t in tensors]
    total = sum(float(x.norm() ** 2) for x in X)

    def top(blocks):
        return torch.linalg.svd(torch.cat(blocks, 1), full_matrices=False)[0][:, :rank]

    P, Q = top(X), top([x.T for x in X])
    error = 1.0
    for _ in range(max_iter):
        P = top([x @ Q for x in X])
        Q = top([x.T @ P for x in X])
        previous = error
        error = (
            max(total - sum(float((P.T @ x @ Q).norm() ** 2) for x in X), 0) / total
        ) ** 0.5
        if abs(previous - error) < tol:
            break
    return P, Q


def regmean_plusplus(n_blocks, states, deltas, alpha, run_block, weights=None):
    """RegMean++ (Nguyen et al., TMLR 2026) as a plain loop over blocks.

    ``states``: model -> its prompts' inputs to block 0 (one tensor per prompt);
    ``deltas``: model -> {module: dense dW} (a module a model lacks: absent);
    ``run_block(l, dws, h, seen)``: block l with W + dws[module] on states h,
    its linears' inputs appended to ``seen[module]``; returns the block's output.
    At each block: every model's own block on the *merged* states of its
    prompts gives its Grams (per-token mean); each module is merged by the
    closed form; every model's states go through the merged block. Returns
    {module: merged dW}.
    """
    names = list(states)
    weights = weights or [1.0] * len(names)
    merged: dict[str, torch.Tensor] = {}
    for block in range(n_blocks):
        grams: dict[str, dict[str, torch.Tensor]] = {}
        for t in names:
            seen: dict[str, list] = {}
            for h in states[t]:
                run_block(block, deltas[t], h, seen)
            for module, rows in seen.items():
                x = torch.cat(rows).double()
                grams.setdefault(module, {})[t] = regmean_grams(x.T @ x / len(x), alpha)
        for module, per_model in grams.items():
            if not any(module in deltas[t] for t in names):
                continue
            zero = torch.zeros_like(
                next(deltas[t][module] for t in names if module in deltas[t])
            )
            merged[module] = least_squares_merge(
                [deltas[t].get(module, zero) for t in names],
                [per_model[t] for t in names],
                weights,
            )
        block_merge = {m: d for m, d in merged.items()}
        states = {
            t: [run_block(block, block_merge, h, {}) for h in hs]
            for t, hs in states.items()
        }
    return merged
