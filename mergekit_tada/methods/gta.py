"""mergekit's generalized task arithmetic rules on LoRA updates, one module at a time.

TIES, DARE, Model Breadcrumbs and DELLA trim, drop or sample entries of the
d_out x d_in update, so each module's dense update goes to mergekit's own
kernel (methods/dense.py) with mergekit's parameters and defaults, and the
result is truncated to the output rank. Each method therefore equals
mergekit's method of the same name over ``base+lora`` inputs, followed by the
best rank-r approximation of each module (tests/test_family.py). Random masks
(DARE, DELLA) are seeded per module from ``--random-seed``.

| method | mergekit kernel | sparsification | sign consensus | normalize | rescale |
|---|---|---|---|---|---|
| ``lora_ties`` | ``ties`` | magnitude | sum | yes | no |
| ``lora_dare_ties`` | ``dare_ties`` | random | sum | no | yes |
| ``lora_dare_linear`` | ``dare_linear`` | random | none | no | yes |
| ``lora_breadcrumbs`` | ``breadcrumbs`` | magnitude outliers (``gamma``) | none | no | no |
| ``lora_breadcrumbs_ties`` | ``breadcrumbs_ties`` | magnitude outliers | sum | no | no |
| ``lora_della`` | ``della`` | magnitude-ranked sampling (``epsilon``) | sum | yes | yes |
| ``lora_della_linear`` | ``della_linear`` | magnitude-ranked sampling | none | no | yes |
"""

from __future__ import annotations

from mergekit_tada.errors import TadaError
from mergekit_tada.methods.base import (
    SPACE,
    FamilyMethod,
    family_spec,
    gta_parameters,
)
from mergekit_tada.methods.dense import dense_merge, mergekit_gta, module_seed
from mergekit_tada.methods.params import NON_BASE, Param

GAMMA = Param("gamma", float, NON_BASE, 0.01, "largest fraction removed")
EPSILON = Param("epsilon", float, NON_BASE, 0.15, "spread of keep probabilities")


class LoraGta(FamilyMethod):
    """One of mergekit's generalized-task-arithmetic rules on dense module updates."""

    def __init__(
        self,
        name: str,
        kernel: str,
        pretty: str,
        normalize: bool,
        rescale: bool,
        extra: tuple[Param, ...] = (),
    ):
        self.kernel = kernel
        self.extra = tuple(p.name for p in extra)
        self.spec = family_spec(
            name, pretty, (*gta_parameters(normalize, rescale), *extra, SPACE)
        )

    def check(self, tensor: str, params: dict, inputs: dict[str, dict]) -> None:
        super().check(tensor, params, inputs)
        for label, p in inputs.items():
            gamma, epsilon, density = p.get("gamma"), p.get("epsilon"), p["density"]
            if gamma is not None and not 0 <= gamma < 1:
                raise TadaError(
                    f"{self.spec.name}: gamma must be in [0, 1) (got {gamma}) "
                    f"for {label} at {tensor}"
                )
            if (
                epsilon is not None
                and density < 1
                and not (
                    0 <= epsilon and density - epsilon > 0 and density + epsilon < 1
                )
            ):
                raise TadaError(
                    f"{self.spec.name}: epsilon must keep density - epsilon and "
                    f"density + epsilon in (0, 1) (got density {density}, epsilon "
                    f"{epsilon}) for {label} at {tensor}"
                )

    def rank_limit(self, source_ranks: list[int], shape: tuple[int, int]) -> int:
        return min(shape)  # sign election and masks make the update dense

    def combine(self, job, updates):
        per_input = {
            key: self.per_input(job, updates, key)
            for key in ("weight", "density", *self.extra)
        }
        seed = module_seed(job.seed, job.module)
        merged = dense_merge(
            lambda deltas: mergekit_gta(
                self.kernel, deltas, per_input, job.params, seed
            ),
            list(updates.values()),
            job.rank,
        )
        record = {"weights": per_input["weight"], "densities": per_input["density"]}
        for key in self.extra:  # gammas, epsilons
            record[f"{key}s"] = per_input[key]
        return merged, record


METHODS = (
    LoraGta("lora_ties", "ties", "TIES on LoRA updates", True, False),
    LoraGta("lora_dare_ties", "dare_ties", "DARE-TIES on LoRA updates", False, True),
    LoraGta(
        "lora_dare_linear", "dare_linear", "Linear DARE on LoRA updates", False, True
    ),
    LoraGta(
        "lora_breadcrumbs",
        "breadcrumbs",
        "Model Breadcrumbs on LoRA updates",
        False,
        False,
        (GAMMA,),
    ),
    LoraGta(
        "lora_breadcrumbs_ties",
        "breadcrumbs_ties",
        "Model Breadcrumbs with TIES on LoRA updates",
        False,
        False,
        (GAMMA,),
    ),
    LoraGta("lora_della", "della", "DELLA on LoRA updates", True, True, (EPSILON,)),
    LoraGta(
        "lora_della_linear",
        "della_linear",
        "Linear DELLA on LoRA updates",
        False,
        True,
        (EPSILON,),
    ),
)
