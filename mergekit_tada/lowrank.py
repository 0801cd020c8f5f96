"""Exact low-rank algebra on factored updates (algorithms.md section 0).

Every update is kept as a product ``B @ A`` (B: m x k, A: k x n, k small). An SVD
of such a product costs O((m + n) k^2): QR of both thin factors and an SVD of
the k x k core. Nothing here ever forms a dense m x n matrix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

# Singular values below this fraction of the largest are numerical noise: their
# singular vectors are arbitrary and must not take part in any decision.
NULL_TOLERANCE = 1e-6


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run small-matrix maths on one thread.

    QR of thin factors and SVDs of r x r cores are 5-40x slower with torch's
    default thread pool on a few shared cores (bench/lowrank_threads.py).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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

    def take(self, index: torch.Tensor | Sequence[int]) -> ThinSVD:
        index = torch.as_tensor(index, dtype=torch.long, device=self.S.device)
        return ThinSVD(self.U[:, index], self.S[index], self.V[:, index])

    def scaled(self, weight: float) -> ThinSVD:
        return ThinSVD(self.U, self.S * weight, self.V)

    def energy(self) -> float:
        return float(torch.sum(self.S.double() ** 2))


def svd(f: Factored) -> ThinSVD:
    """Exact thin SVD of ``B @ A`` with null directions removed.

    B = Q_B R_B, A^T = Q_A R_A, R_B R_A^T = U_c S V_c^T, so
    B A = (Q_B U_c) S (Q_A V_c)^T.
    """
    B = f.B.to(torch.float32)
    A = f.A.to(torch.float32)
    q_b, r_b = torch.linalg.qr(B)
    q_a, r_a = torch.linalg.qr(A.T)
    core = r_b.double() @ r_a.double().T
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    largest = float(s[0]) if s.numel() else 0.0
    keep = (
        s > largest * NULL_TOLERANCE
        if largest > 0
        else torch.zeros_like(s, dtype=torch.bool)
    )
    u = q_b @ u_c[:, keep].to(torch.float32)
    v = q_a @ vh_c[keep].T.to(torch.float32)
    return ThinSVD(u, s[keep].to(torch.float32), v)


def combine(parts: Sequence[ThinSVD]) -> Factored:
    """Stack weighted SVD pieces into one factored sum ``sum_i U_i S_i V_i^T``."""
    B = torch.cat([p.U * p.S for p in parts], dim=1)
    A = torch.cat([p.V.T for p in parts], dim=0)
    return Factored(B, A)


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
