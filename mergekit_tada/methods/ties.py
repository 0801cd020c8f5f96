"""TIES and DARE-TIES on LoRA updates: mergekit's own kernels, one module at a time.

``lora_ties`` (trim to ``density``, elect signs by summed magnitude, disjoint
mean; mergekit's defaults ``normalize: true``) and ``lora_dare_ties`` (random
drop with rescale, then the sign election; ``normalize: false, rescale:
true``) run mergekit's kernels on the dense per-module updates
(methods/dense.py), so they equal mergekit's own method over ``base+lora``
followed by the best rank-r approximation of each module.
"""

from __future__ import annotations

from mergekit_tada.methods.base import FamilyMethod, family_spec, gta_parameters
from mergekit_tada.methods.dense import dense_merge, module_seed


class LoraTies(FamilyMethod):
    """``lora_ties`` / ``lora_dare_ties``: mergekit's own kernels per module."""

    def __init__(
        self, name: str, kernel: str, pretty: str, normalize: bool, rescale: bool
    ):
        self.kernel = kernel
        self.spec = family_spec(name, pretty, gta_parameters(normalize, rescale))

    def rank_limit(self, source_ranks: list[int], shape: tuple[int, int]) -> int:
        return min(shape)  # sign election and masks make the update dense

    def combine(self, job, updates):
        weights = self.per_input(job, updates, "weight")
        densities = self.per_input(job, updates, "density")
        seed = module_seed(job.seed, job.module)
        merged = dense_merge(
            self.kernel,
            list(updates.values()),
            weights,
            densities,
            job.params,
            seed,
            job.rank,
        )
        return merged, {"weights": weights, "densities": densities}
