"""The element-wise rules on one module's dense update: mergekit's own kernels.

TIES, DARE and their relatives trim, elect signs and drop entries of the
d_out x d_in update, so they need the dense matrix. It is formed one module at
a time, handed to mergekit's kernel with a zero base (so the semantics are
mergekit's by construction) and the result truncated by an exact or
randomized SVD. Every element-wise method goes through :func:`dense_merge`;
masks are seeded per module from ``--random-seed`` (:func:`module_seed`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from mergekit_tada.lowrank import Factored, ThinSVD, seeded, significant

# Above this size a dense SVD of a merged module is slow on CPUs; a randomized
# range finder with generous oversampling and power iterations is used instead.
EXACT_SVD_MAX_DIM = 1024
RANDOMIZED_OVERSAMPLE = 32
RANDOMIZED_POWER_ITERATIONS = 8


def dense_svd(M: torch.Tensor, rank: int) -> ThinSVD:
    """SVD of a dense merged module: exact when small, randomized (to rank) when large."""
    M = M.to(torch.float32)
    if min(M.shape) <= EXACT_SVD_MAX_DIM:
        u, s, vh = torch.linalg.svd(M.double(), full_matrices=False)
        keep = significant(s)
        return ThinSVD(u[:, keep].float(), s[keep].float(), vh[keep].T.float())
    q = min(rank + RANDOMIZED_OVERSAMPLE, min(M.shape))
    with seeded(0):  # the range finder's test matrix: deterministic
        u, s, v = torch.svd_lowrank(M, q=q, niter=RANDOMIZED_POWER_ITERATIONS)
    keep = significant(s)
    return ThinSVD(u[:, keep], s[keep], v[:, keep])


def module_seed(seed: int, module: str) -> int:
    """A per-module seed: DARE's masks do not depend on the order modules run in."""
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


# mergekit's shared generalized-task-arithmetic parameters
GTA_SHARED = ("normalize", "rescale", "int8_mask", "lambda")


def mergekit_gta(
    method_name: str,
    deltas: Sequence[torch.Tensor],
    per_input: dict[str, Sequence[float]],
    shared: dict,
    seed: int,
) -> torch.Tensor:
    """mergekit's generalized task arithmetic kernel on deltas (zero base).

    ``per_input``: parameter -> one value per delta (weight, density, gamma,
    epsilon); ``shared``: the shared parameters (``GTA_SHARED``).
    """
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    method = registry.get(method_name)
    base = torch.zeros_like(deltas[0])
    ids = ["base", *range(len(deltas))]
    group = TensorGroup.from_tensors([base, *deltas], ids=ids, base_index=0)
    params = {k: dict(enumerate(v)) for k, v in per_input.items()}
    params |= {k: shared[k] for k in GTA_SHARED}
    with seeded(seed):
        (out,) = method([group], parameters=params)
    return out


def dense_merge(
    kernel: Callable[[list[torch.Tensor]], torch.Tensor],
    updates: Sequence[Factored | None],
    rank: int,
) -> ThinSVD:
    """``kernel`` on the dense per-module updates (a missing module is 0),
    as a thin SVD (exact, or randomized to ``rank`` when large)."""
    shape = next(u for u in updates if u is not None).shape
    present = next(u for u in updates if u is not None).B
    deltas = [
        u.dense()
        if u is not None
        else torch.zeros(shape, dtype=present.dtype, device=present.device)
        for u in updates
    ]
    return dense_svd(kernel(deltas), rank)
