"""Core space: any merge rule on small shared-basis matrices (Panariello et al., 2025).

Every update of a module lives in the column span of the stacked B's and the
row span of the stacked A's. With U_B (m x K) and V_A (n x K) orthonormal
bases of those spans (K <= sum r), each update is exactly
U_B M_t V_A^T with the K x K core M_t = (U_B^T B_t)(A_t V_A). A rule run on the
cores (``space: core``) and mapped back as U_B M V_A^T costs K x K maths
instead of d_out x d_in. Rules that are invariant to orthonormal changes of
basis (task arithmetic, TSV-M, Iso-C/CTS, WUDI) give the same update in
either space; element-wise rules (TIES, DARE, ...) decide on core entries,
which is the paper's point. This transform wraps a rule's ``combine``
(``LoraMergeMethod.merge_module``); no rule knows which space it runs in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergekit_tada.lowrank import Factored, ThinSVD, column_basis

SPACES = ("full", "core")


@dataclass(frozen=True)
class CoreSpace:
    """Orthonormal bases of the modules' shared spans: left (m x K), right (n x K)."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def dim(self) -> tuple[int, int]:
        return self.left.shape[1], self.right.shape[1]

    def project(self, update: Factored | None) -> Factored | None:
        """The update's core U_B^T (B A) V_A, kept as factors (K x r, r x K)."""
        if update is None:
            return None
        return Factored(self.left.T @ update.B.float(), update.A.float() @ self.right)

    def lift(self, merged: ThinSVD) -> ThinSVD:
        """A merged core's thin SVD, back in the module's coordinates (exact)."""
        return ThinSVD(
            self.left @ merged.left.float(),
            merged.S,
            self.right @ merged.right.float(),
            merged.x,
            merged.y,
        )


def core_space(updates: Sequence[Factored | None]) -> CoreSpace:
    """The core basis of one module's updates (missing inputs are skipped)."""
    present = [u for u in updates if u is not None]
    B = torch.cat([u.B.float() for u in present], dim=1)
    A = torch.cat([u.A.float() for u in present], dim=0)
    return CoreSpace(column_basis(B), column_basis(A.T))
