"""Per-module merge rules of the LoRA-space family (algorithms.md sections 3, 6).

Each rule takes the inputs' factored updates of one module (scaling folded
in; ``None`` where an input lacks the module) and returns the thin SVD of the
merged update, before truncation to the output rank.

* task arithmetic: sum_t w_t dW_t, exactly, from stacked factors;
* TIES / DARE-TIES: mergekit's own kernels (``ties``, ``dare_ties``) applied to
  the dense per-module updates with a zero base, so the semantics are
  mergekit's by construction. Element-wise rules need the dense matrix: it is
  formed one module at a time and then truncated (exact or randomized SVD);
* KnOTS-TIES: SVD of the stacked updates [dW_1 | ... | dW_T] = U S [V_1; ...]^T
  from the factors B_cat and blockdiag(A_t) (never the d_out x T*d_in
  matrix), TIES on the d_in x k coefficient blocks V_t, then U S V_merged^T;
* TSV-M: per-task SVDs truncated to floor(n/T) directions, concatenated, U and
  V orthogonalised by their polar factors, times alpha.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator, Sequence

import torch

from mergekit_tada.lowrank import Factored, ThinSVD, significant, stack, svd

# Above this size a dense SVD of a merged module is slow on CPUs; a randomized
# range finder with generous oversampling and power iterations is used instead.
EXACT_SVD_MAX_DIM = 1024
RANDOMIZED_OVERSAMPLE = 32
RANDOMIZED_POWER_ITERATIONS = 8


def task_arithmetic(
    updates: Sequence[Factored | None], weights: Sequence[float]
) -> ThinSVD:
    pairs = [(u, w) for u, w in zip(updates, weights, strict=True) if u is not None]
    return svd(stack([u for u, _ in pairs], [w for _, w in pairs]))


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


_RNG_LOCK = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global CPU generator seeded for this block, one block at a time.

    Modules merge on worker threads (session.merge_adapter_only) and mergekit's
    kernels draw from the global generator, so seeding and drawing must not
    interleave with another thread's; the caller's generator state is restored.
    """
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def module_seed(seed: int, module: str) -> int:
    """A per-module seed: DARE's masks do not depend on the order modules run in."""
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def mergekit_gta(
    method_name: str,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    shared: dict,
    seed: int,
) -> torch.Tensor:
    """mergekit's generalized task arithmetic kernel on deltas (zero base)."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    method = registry.get(method_name)
    base = torch.zeros_like(deltas[0])
    ids = ["base", *range(len(deltas))]
    group = TensorGroup.from_tensors([base, *deltas], ids=ids, base_index=0)
    params = {
        "weight": dict(enumerate(weights)),
        "density": dict(enumerate(densities)),
        **{k: shared[k] for k in ("normalize", "rescale", "int8_mask", "lambda")},
    }
    with seeded(seed):
        (out,) = method([group], parameters=params)
    return out


def ties_dense(
    method_name: str,
    updates: Sequence[Factored | None],
    weights: Sequence[float],
    densities: Sequence[float],
    shared: dict,
    seed: int,
    rank: int,
) -> ThinSVD:
    """TIES / DARE-TIES on the dense per-module updates (a missing module is 0)."""
    shape = next(u for u in updates if u is not None).shape
    present = next(u for u in updates if u is not None).B
    deltas = [
        u.dense()
        if u is not None
        else torch.zeros(shape, dtype=present.dtype, device=present.device)
        for u in updates
    ]
    merged = mergekit_gta(method_name, deltas, weights, densities, shared, seed)
    return dense_svd(merged, rank)


def knots_ties(
    updates: Sequence[Factored | None],
    weights: Sequence[float],
    densities: Sequence[float],
    shared: dict,
    seed: int,
) -> ThinSVD:
    """KnOTS: shared basis of the stacked updates from factors, TIES on V blocks."""
    present = [u for u in updates if u is not None]
    keep = [i for i, u in enumerate(updates) if u is not None]
    # [dW_1 | ... | dW_T] = B_cat blockdiag(A_1, ..., A_T): a product of thin
    # factors (sum r columns), so its SVD is lowrank.svd's.
    stacked = svd(
        Factored(
            torch.cat([u.B for u in present], dim=1),
            torch.block_diag(*(u.A.float() for u in present)),
        )
    )
    d_in = present[0].A.shape[1]  # V_t: the rows of V for task t (d_in x k)
    blocks = [stacked.V[t * d_in : (t + 1) * d_in] for t in range(len(present))]
    V_merged = mergekit_gta(
        "ties",
        blocks,
        [weights[i] for i in keep],
        [densities[i] for i in keep],
        shared,
        seed,
    )
    return svd(Factored(stacked.U * stacked.S, V_merged.T))


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
    return svd(Factored(_polar(U) * (alpha * sigma), _polar(V).T))


def _polar(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal polar factor P Q^T of a thin matrix X = P S Q^T."""
    p, _, qh = torch.linalg.svd(X.double(), full_matrices=False)
    return (p @ qh).float()
