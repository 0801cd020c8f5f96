"""Rank-1 directions with one coefficient each: TARA's algebra (algorithms.md section 4).

TARA keeps every rank-1 direction of every adapter and gives each its own
coefficient phi, learned from unlabeled text (mergekit_tada/training/);
TaDA's learned gates tie those coefficients per adapter. Shared by both, so
it sits below the methods. Both TARA variants are held in one form,
:class:`Directions`:

    dW(phi) = B @ sum_g diag(phi_g) A_g          (A = [A_1; ...; A_G], phi = [phi_1 ... phi_G])

* Variant A (``directions(..., "a")``): B = [B_1 ... B_T], A = [s_1 A_1; ...;
  s_T A_T] (scalings folded in), one group: dW(phi) = B_cat diag(phi) A_cat,
  sum_t r_t coefficients. phi = 1 is task arithmetic.
* Variant B (``"b"``): the stacked updates M = [dW_1 | ... | dW_T] = U S V^T
  with V^T = [V_1^T | ... | V_T^T], computed from the factors (B_cat and
  blockdiag(A_t), never a dense SVD), null directions dropped (R <= sum r_t).
  B = U S, group t is V_t^T: dW(phi) = sum_t U S diag(phi_t) V_t^T, T * R
  coefficients. phi = 1 gives U S sum_t V_t^T = sum_t dW_t: task arithmetic.

In both, ``single(i)`` is the phi that gives input i's own update, which is
how the training loop evaluates each adapter alone (its baseline z_i).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergekit_tada.lowrank import Factored, svd

VARIANTS = ("a", "b")


@dataclass(frozen=True)
class Directions:
    """One module's rank-1 directions and how coefficients combine them."""

    B: torch.Tensor  # m x R
    A: torch.Tensor  # (groups * R) x n
    groups: int
    owners: tuple[int, ...]  # per coefficient: the input (config order) it belongs to

    @property
    def size(self) -> int:
        """Number of coefficients."""
        return self.A.shape[0]

    def combined_A(self, phi: torch.Tensor) -> torch.Tensor:
        """sum_g diag(phi_g) A_g: the R x n right factor of dW(phi)."""
        rows = phi.to(self.A.dtype)[:, None] * self.A
        return rows.view(self.groups, -1, self.A.shape[1]).sum(0)

    def merged(self, phi: torch.Tensor) -> Factored:
        """dW(phi) as factors (rank <= R); never a dense m x n matrix."""
        return Factored(self.B, self.combined_A(phi))

    def single(self, index: int) -> torch.Tensor:
        """The coefficients that give input ``index``'s own update (1 on its own)."""
        return torch.tensor([1.0 if o == index else 0.0 for o in self.owners])


def directions(updates: Sequence[Factored | None], variant: str) -> Directions | None:
    """The module's directions from the inputs' scaled factors (None: absent input)."""
    present = [(i, u) for i, u in enumerate(updates) if u is not None]
    if not present:
        return None
    if variant == "a":
        B = torch.cat([u.B.float() for _, u in present], dim=1)
        A = torch.cat([u.A.float() for _, u in present], dim=0)
        owners = tuple(i for i, u in present for _ in range(u.A.shape[0]))
        return Directions(B, A, 1, owners)
    if variant != "b":
        raise ValueError(f"unknown TARA variant {variant!r}")
    stacked = svd(
        Factored(
            torch.cat([u.B.float() for _, u in present], dim=1),
            torch.block_diag(*(u.A.float() for _, u in present)),
        )
    )
    n = present[0][1].A.shape[1]
    V = stacked.V  # (T * n) x R: rows of input t's block are V_t
    rank = V.shape[1]
    A = torch.cat([V[t * n : (t + 1) * n].T for t in range(len(present))], dim=0)
    owners = tuple(i for i, _ in present for _ in range(rank))
    return Directions(stacked.U * stacked.S, A.contiguous(), len(present), owners)


def initial_coefficients(
    d: Directions, init_lambda: float, inputs: int
) -> torch.Tensor:
    """phi_0 = lambda / T for every coefficient (T: the number of inputs)."""
    return torch.full((d.size,), init_lambda / inputs)
