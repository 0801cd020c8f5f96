"""Exact low-rank algebra on factored updates (algorithms.md section 0).

Every update is kept as a product ``B @ A`` (B: m x k, A: k x n, k small). An SVD
of such a product costs O((m + n) k^2): orthonormal bases of both thin factors
(here from their k x k Gram matrices, in float64) and an SVD of the k x k core.
Nothing here ever forms a dense m x n matrix.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

# Singular values below this fraction of the largest are numerical noise: their
# singular vectors are arbitrary and must not take part in any decision.
NULL_TOLERANCE = 1e-6


_THREADS_LOCK = threading.Lock()
_THREADS_DEPTH = 0
_THREADS_SAVED = 0


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run small-matrix maths on one torch thread (re-entrant, thread-safe).

    QR of thin factors and SVDs of r x r cores are several times slower with
    torch's default thread pool on a few shared cores; parallelism comes from
    running modules on separate Python threads instead. The first entrant sets
    one thread, the last one out restores the previous count.
    """
    global _THREADS_DEPTH, _THREADS_SAVED
    with _THREADS_LOCK:
        if _THREADS_DEPTH == 0:
            _THREADS_SAVED = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_DEPTH += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_DEPTH -= 1
            if _THREADS_DEPTH == 0:
                torch.set_num_threads(_THREADS_SAVED)


@dataclass(frozen=True)
class Factored:
    """A matrix held as ``B @ A``."""

    B: torch.Tensor  # m x k
    A: torch.Tensor  # k x n

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    @property
    def rank_bound(self) -> int:
        return self.B.shape[1]

    def dense(self) -> torch.Tensor:
        """Dense product; only for small test oracles and the merged model."""
        return self.B @ self.A


@dataclass(frozen=True)
class ThinSVD:
    """``U @ diag(S) @ V.T`` with orthonormal columns in U and V, S descending."""

    U: torch.Tensor  # m x p
    S: torch.Tensor  # p
    V: torch.Tensor  # n x p

    def __len__(self) -> int:
        return self.S.shape[0]

    def take(self, index: Sequence[int]) -> ThinSVD:
        index = list(index)
        if index == list(range(len(index))):  # a leading block: views, no copies
            k = len(index)
            return ThinSVD(self.U[:, :k], self.S[:k], self.V[:, :k])
        idx = torch.tensor(index, dtype=torch.long, device=self.S.device)
        return ThinSVD(
            self.U.index_select(1, idx), self.S[idx], self.V.index_select(1, idx)
        )

    def scaled(self, weight: float) -> ThinSVD:
        return ThinSVD(self.U, self.S * weight, self.V)

    def energy(self) -> float:
        return float(torch.sum(self.S.double() ** 2))


def significant(
    values: torch.Tensor, tolerance: float = NULL_TOLERANCE
) -> torch.Tensor:
    """Mask of the values above ``tolerance`` times the largest (none if all are 0)."""
    top = float(values.max()) if values.numel() else 0.0
    if top <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    return values > top * tolerance


def frobenius_sq(f: Factored) -> float:
    """||B A||_F^2 without forming B A: tr((B^T B)(A A^T)), in float64."""
    B, A = f.B.double(), f.A.double()
    return max(float(torch.sum((B.T @ B) * (A @ A.T))), 0.0)


def _gram_root(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G = W diag(lambda) W^T (k x k, float64): W and sqrt(lambda), null part dropped."""
    lam, W = torch.linalg.eigh(G)
    keep = significant(
        lam, NULL_TOLERANCE**2
    )  # eigenvalues are squared singular values
    return W[:, keep], lam[keep].sqrt()


def svd(f: Factored) -> ThinSVD:
    """Exact thin SVD of ``B @ A`` with null directions removed, in O((m + n) k^2).

    With B^T B = W_B L_B W_B^T and A A^T = W_A L_A W_A^T (k x k), the matrices
    Q_B = B W_B L_B^-1/2 and Q_A = A^T W_A L_A^-1/2 have orthonormal columns and
    B A = Q_B (L_B^1/2 W_B^T W_A L_A^1/2) Q_A^T; the SVD of that small core,
    U_c S V_c^T, gives U = B (W_B L_B^-1/2 U_c) and V = A^T (W_A L_A^-1/2 V_c).

    Precision: the Gram matrices are formed in float64 (a float32 Gram would
    lose directions weaker than ~3e-4 of the strongest); the m x k products
    run in float32 (4-5x faster on CPUs). No Householder QR of the thin factors
    (2-3x slower here) and no dense m x n matrix.
    """
    B = f.B.float()
    A = f.A.float()
    B64, A64 = B.double(), A.double()
    return _svd_from_grams(B, A, B64.T @ B64, A64 @ A64.T)


def svd_coordinates(
    gram_b: torch.Tensor, gram_a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of B A in the coordinates of its factors, from their Grams alone.

    Returns float64 (X, S, Y) with B A = (B X) diag(S) (A^T Y)^T, where B X
    and A^T Y have orthonormal columns (X: k x s, Y: k x s). Lets a caller
    chain several SVDs in k x k space and form one m x k product at the end.
    """
    w_b, r_b = _gram_root(gram_b)
    w_a, r_a = _gram_root(gram_a)
    core = (r_b[:, None] * (w_b.T @ w_a)) * r_a[None, :]
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    keep = significant(s)
    x = w_b @ (u_c[:, keep] / r_b[:, None])
    y = w_a @ (vh_c[keep].T / r_a[:, None])
    return x, s[keep], y


def _svd_from_grams(
    B: torch.Tensor, A: torch.Tensor, gram_b: torch.Tensor, gram_a: torch.Tensor
) -> ThinSVD:
    """Thin SVD of B A (float32 factors) given float64 Grams B^T B and A A^T."""
    x, s, y = svd_coordinates(gram_b, gram_a)
    return ThinSVD(B @ x.float(), s.float(), A.T @ y.float())


def stack(updates: Sequence[Factored], weights: Sequence[float]) -> Factored:
    """The factored sum ``sum_t w_t B_t A_t`` (exact, rank <= sum of ranks)."""
    B = torch.cat(
        [w * u.B.to(torch.float32) for u, w in zip(updates, weights, strict=True)], 1
    )
    A = torch.cat([u.A.to(torch.float32) for u in updates], dim=0)
    return Factored(B, A)


@dataclass(frozen=True)
class Truncated:
    """A rank-r LoRA pair (scaling 1) and the energy that truncation dropped."""

    B: torch.Tensor  # m x r
    A: torch.Tensor  # r x n
    truncation_energy: float  # dropped / total squared Frobenius norm

    def factored(self) -> Factored:
        return Factored(self.B, self.A)


def truncate(s: ThinSVD, rank: int) -> Truncated:
    """Best rank-r approximation (Eckart-Young), split as B = U S^1/2, A = S^1/2 V^T.

    Fewer nonzero directions than ``rank`` are padded with zero columns/rows so
    every module of the output adapter has exactly rank r.
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    total = s.energy()
    kept = s.take(range(min(rank, len(s))))
    dropped = total - kept.energy()
    root = kept.S.sqrt()
    m, n = s.U.shape[0], s.V.shape[0]
    B = torch.zeros(m, rank, dtype=torch.float32, device=s.S.device)
    A = torch.zeros(rank, n, dtype=torch.float32, device=s.S.device)
    B[:, : len(kept)] = kept.U * root
    A[: len(kept)] = (kept.V * root).T
    fraction = max(dropped, 0.0) / total if total > 0 else 0.0
    return Truncated(B, A, fraction)
