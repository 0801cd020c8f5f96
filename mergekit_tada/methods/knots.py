"""KnOTS-TIES on LoRA factors (Stoica et al., 2024).

The stacked updates [dW_1 | ... | dW_T] = U S [V_1; ...; V_T]^T share one
basis U; task t is represented by its coefficients in it, dW_t = U (S V_t^T).
The SVD comes from the factors B_cat and blockdiag(A_t) (never the
d_out x T*d_in matrix); TIES (mergekit's kernel: trim to ``density`` by
magnitude, elect signs by summed magnitude, disjoint mean) merges the
coefficient blocks S V_t^T, so trimming sees each direction's strength sigma;
the merged update is U times the merged coefficients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_tada.lowrank import Factored, ThinSVD, svd
from mergekit_tada.methods.base import FamilyMethod, family_spec, gta_parameters
from mergekit_tada.methods.dense import mergekit_gta, module_seed


def knots_ties(
    updates: Sequence[Factored | None],
    weights: Sequence[float],
    densities: Sequence[float],
    shared: dict,
    seed: int,
) -> ThinSVD:
    """KnOTS: shared basis of the stacked updates from factors, TIES on the
    per-task coefficient blocks S V_t^T (Stoica et al., 2024)."""
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
    # task t's coefficients (S V_t^T)^T = V_t S: TIES trims by their magnitude
    blocks = [
        stacked.V[t * d_in : (t + 1) * d_in] * stacked.S for t in range(len(present))
    ]
    per_input = {
        "weight": [weights[i] for i in keep],
        "density": [densities[i] for i in keep],
    }
    merged = mergekit_gta("ties", blocks, per_input, shared, seed)
    return svd(Factored(stacked.U, merged.T))


class LoraKnotsTies(FamilyMethod):
    spec = family_spec(
        "lora_knots_ties", "KnOTS-TIES on LoRA factors", gta_parameters(True, False)
    )

    def combine(self, job, updates):
        weights = self.per_input(job, updates, "weight")
        densities = self.per_input(job, updates, "density")
        seed = module_seed(job.seed, job.module)
        merged = knots_ties(
            list(updates.values()), weights, densities, job.params, seed
        )
        return merged, {"weights": weights, "densities": densities}
