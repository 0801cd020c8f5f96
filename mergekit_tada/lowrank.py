"""Exact low-rank algebra on factored updates (algorithms.md section 0).

Every update is kept as a product ``B @ A`` (B: m x k, A: k x n, k small). An SVD
of such a product costs O((m + n) k^2): the k x k Gram matrices of both thin
factors (in float64) and two k x k eigendecompositions. Nothing here ever forms
a dense m x n matrix.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

# Singular values below this fraction of the largest are numerical noise: their
# singular vectors are arbitrary and must not take part in any decision.
NULL_TOLERANCE = 1e-6


_THREADS_LOCK = threading.Lock()
_THREADS_DEPTH = 0
_THREADS_SAVED = 0


@contextlib.contextmanager
def single_thread(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run small-matrix maths on one torch thread (re-entrant, thread-safe).

    A no-op for maths on another ``device`` (torch's thread count is the
    CPU's). Also what keeps sums bit-identical whatever the thread count:
    ATen splits long reductions into per-thread partial sums.

    QR of thin factors and SVDs of r x r cores are several times slower with
    torch's default thread pool on a few shared cores; parallelism comes from
    running modules on separate Python threads instead. The first entrant sets
    one thread, the last one out restores the previous count. Every entrant
    sets it for its own OS thread too: OpenMP's thread count is per thread,
    and a fresh worker thread starts from OMP_NUM_THREADS, whatever was set
    in another (its first LAPACK call would then run on that many threads,
    and round differently).
    """
    global _THREADS_DEPTH, _THREADS_SAVED
    if torch.device(device).type != "cpu":
        yield
        return
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


_RNG_LOCK = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global CPU generator seeded for this block, one block at a time.

    Modules merge on worker threads (run/execute.py, adapter-only) and mergekit's
    kernels (and generation) draw from the global generator, so seeding and drawing must not
    interleave with another thread's; the caller's generator state is restored.
    """
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


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
    """``U @ diag(S) @ V.T`` with orthonormal columns in U and V, S descending.

    U and V may be held in the coordinates of thin factors, U = left @ x and
    V = right @ y (x, y: k x p), so that truncation forms only the r columns it
    keeps: those m x k products are most of the cost of a low-rank merge.
    Without coordinates, ``left`` and ``right`` are U and V themselves.
    """

    left: torch.Tensor  # m x k (U when x is None)
    S: torch.Tensor  # p
    right: torch.Tensor  # n x k (V when y is None)
    x: torch.Tensor | None = None  # k x p
    y: torch.Tensor | None = None  # k x p

    @cached_property
    def U(self) -> torch.Tensor:
        return _in_basis(self.left, self.x)

    @cached_property
    def V(self) -> torch.Tensor:
        return _in_basis(self.right, self.y)

    def __len__(self) -> int:
        return self.S.shape[0]

    def head(self, k: int) -> ThinSVD:
        """The k strongest components (views, no copies)."""
        if self.x is None:
            return ThinSVD(self.left[:, :k], self.S[:k], self.right[:, :k])
        return ThinSVD(self.left, self.S[:k], self.right, self.x[:, :k], self.y[:, :k])

    def scaled(self, weight: float) -> ThinSVD:
        """weight times the matrix; a negative weight flips U, so S stays >= 0
        (truncation takes S^1/2)."""
        S = self.S * abs(weight)
        if weight >= 0:
            return ThinSVD(self.left, S, self.right, self.x, self.y)
        if self.x is None:
            return ThinSVD(-self.left, S, self.right)
        return ThinSVD(self.left, S, self.right, -self.x, self.y)

    def energy(self) -> float:
        return float(torch.sum(self.S.double() ** 2))


def _in_basis(basis: torch.Tensor, coords: torch.Tensor | None) -> torch.Tensor:
    return basis if coords is None else basis @ coords.to(basis.dtype)


def significant(
    values: torch.Tensor, tolerance: float = NULL_TOLERANCE
) -> torch.Tensor:
    """Mask of the values above ``tolerance`` times the largest (none if all are 0)."""
    top = float(values.max()) if values.numel() else 0.0
    if top <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    return values > top * tolerance


def gram(factor: torch.Tensor, of: str) -> torch.Tensor:
    """float64 Gram matrix of a thin factor's columns (X^T X) or rows (X X^T).

    float64 because a float32 Gram would lose directions weaker than ~3e-4 of
    the strongest (its eigenvalues are squared singular values).
    """
    x = factor.double()
    return x.T @ x if of == "columns" else x @ x.T


def frobenius_sq(f: Factored) -> float:
    """||B A||_F^2 without forming B A: tr((B^T B)(A A^T)), in float64."""
    return max(float(torch.sum(gram(f.B, "columns") * gram(f.A, "rows"))), 0.0)


def _significant_count(ascending: torch.Tensor, tolerance: float) -> int:
    """How many of the (ascending) values exceed ``tolerance`` times the largest.

    Sorted values make the kept ones a trailing block, taken with a slice (a
    view) instead of a boolean gather: this runs three times per module.
    """
    values = ascending.tolist()
    if not values or values[-1] <= 0:
        return 0
    cut = values[-1] * tolerance
    return sum(v > cut for v in values)


def svd(f: Factored) -> ThinSVD:
    """Exact thin SVD of ``B @ A`` with null directions removed, in O((m + n) k^2).

    Held in the coordinates of the factors (see :func:`svd_coordinates`):
    U = B x, V = A^T y. The Gram matrices are float64 (:func:`gram`); the m x k
    products run in float32 (4-5x faster on CPUs). No Householder QR of the
    thin factors (2-3x slower here) and no dense m x n matrix.
    """
    B = f.B.float()
    A = f.A.float()
    x, s, y = svd_coordinates(gram(B, "columns"), gram(A, "rows"))
    return ThinSVD(B, s.float(), A.T, x, y)


def svd_coordinates(
    gram_b: torch.Tensor, gram_a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of B A in the coordinates of its factors, from their Grams alone.

    Returns float64 (X, S, Y) with B A = (B X) diag(S) (A^T Y)^T, where B X
    and A^T Y have orthonormal columns (X: k x s, Y: k x s). Lets a caller
    chain several SVDs in k x k space and form the m x k products once, at the
    end, for the columns it keeps.

    With B^T B = W diag(r^2) W^T, Q = B W diag(1/r) is orthonormal and
    B A = Q C with C = diag(r) W^T A. The eigendecomposition of the small
    C C^T = (W r)^T (A A^T) (W r) = U_c diag(S^2) U_c^T gives U = Q U_c and
    V = C^T U_c diag(1/S): two k x k eigendecompositions and no SVD call.
    Eigenvalues are squared singular values, so the null cut on them is the
    square of ``NULL_TOLERANCE``, well above float64 resolution.
    """
    tolerance = NULL_TOLERANCE**2
    lam_b, w = torch.linalg.eigh(gram_b)  # ascending
    k = lam_b.shape[0]
    start = k - _significant_count(lam_b, tolerance)
    r = lam_b[start:].sqrt()
    c = w[:, start:] * r
    lam, u_c = torch.linalg.eigh(c.T @ gram_a @ c)
    p = lam.shape[0]
    kept = p - _significant_count(lam, tolerance)
    u_c, s = u_c[:, kept:].flip(1), lam[kept:].flip(0).sqrt()
    return w[:, start:] @ (u_c / r[:, None]), s, c @ (u_c / s)


def column_basis(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (float32, m x s) of the column span of a thin X (m x k).

    From the float64 Gram's eigendecomposition, null directions cut as in
    :func:`svd_coordinates`: the left singular vectors of X, strongest first
    (up to sign).
    """
    lam, w = torch.linalg.eigh(gram(X, "columns"))  # ascending
    start = lam.shape[0] - _significant_count(lam, NULL_TOLERANCE**2)
    basis = X.double() @ (w[:, start:] / lam[start:].sqrt())
    return basis.flip(1).float()


def polar(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal polar factor P Q^T of a thin matrix X = P S Q^T."""
    p, _, qh = torch.linalg.svd(X.double(), full_matrices=False)
    return (p @ qh).float()


def right_solve(N: torch.Tensor, G: torch.Tensor) -> torch.Tensor | None:
    """``N G^-1`` for a symmetric positive definite G (float64, Cholesky);
    None where G is not positive definite."""
    L, info = torch.linalg.cholesky_ex(G.double())
    if int(info) != 0:
        return None
    return torch.cholesky_solve(N.double().T, L).T


def add_product(
    W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, rows: int = 256
) -> torch.Tensor:
    """``W + B A`` computed in float32 and rounded once to W's dtype.

    In blocks of rows through one float32 buffer that stays in cache: 3-4x
    faster on CPUs than converting the whole of W to float32 and back, which
    also allocates (and page-faults in) two full-size temporaries per weight.
    """
    out = torch.empty_like(W)
    buffer = torch.empty(min(rows, W.shape[0]), W.shape[1], device=W.device)
    for start in range(0, W.shape[0], rows):
        stop = min(start + rows, W.shape[0])
        block = buffer[: stop - start]
        block.copy_(W[start:stop])
        block.addmm_(B[start:stop], A)
        out[start:stop].copy_(block)
    return out


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
    rank_99: int = 0  # the smallest rank that keeps 99 % of the energy

    def factored(self) -> Factored:
        return Factored(self.B, self.A)


def truncate(s: ThinSVD, rank: int) -> Truncated:
    """Best rank-r approximation (Eckart-Young), split as B = U S^1/2, A = S^1/2 V^T.

    Fewer nonzero directions than ``rank`` are padded with zero columns/rows so
    every module of the output adapter has exactly rank r. Singular vectors
    held in coordinates are formed here, for the r kept columns only.
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    total = s.energy()
    kept = s.head(min(rank, len(s)))
    dropped = total - kept.energy()
    root = kept.S.double().sqrt()
    if kept.x is None:
        B = _padded(kept.left, root, rank)
        A = _padded(kept.right, root, rank).T
    else:
        B = kept.left @ _padded(kept.x, root, rank).to(kept.left.dtype)
        A = _padded(kept.y, root, rank).T.to(kept.right.dtype) @ kept.right.T
    fraction = max(dropped, 0.0) / total if total > 0 else 0.0
    return Truncated(B.float(), A.float(), fraction, rank_for_energy(s.S, 0.99))


def rank_for_energy(S: torch.Tensor, keep: float) -> int:
    """The smallest k whose top-k singular values hold ``keep`` of the energy."""
    energy = S.double() ** 2
    total = float(energy.sum())
    if total <= 0:
        return 0
    cumulative = torch.cumsum(energy, 0)
    return int(torch.searchsorted(cumulative, keep * total * (1 - 1e-12))) + 1


def _padded(columns: torch.Tensor, scale: torch.Tensor, rank: int) -> torch.Tensor:
    """``columns * scale`` followed by zero columns up to ``rank``."""
    out = columns.new_zeros(columns.shape[0], rank)
    out[:, : columns.shape[1]] = columns * scale.to(columns.dtype)
    return out
