"""Task arithmetic on LoRA factors: sum_t w_t dW_t, exactly, from stacked factors.

The weighted sum of factored updates is the product of the stacked factors
[w_1 B_1 | ... | w_T B_T] [A_1; ...; A_T], whose thin SVD needs only a QR of
each side and an SVD of the (sum r) x (sum r) core (lowrank.py). With
``lossless`` the output rank is the sum of the input ranks: nothing is cut.
"""

from __future__ import annotations

from collections.abc import Sequence

from mergekit_tada.errors import TadaError
from mergekit_tada.lowrank import Factored, ThinSVD, stack, svd
from mergekit_tada.methods.base import (
    AUTO_DATA,
    AUTO_SETTINGS,
    WEIGHT,
    FamilyMethod,
    family_spec,
    scale_param,
)
from mergekit_tada.methods.params import SHARED, Param


def task_arithmetic(
    updates: Sequence[Factored | None], weights: Sequence[float], scale: float = 1.0
) -> ThinSVD:
    pairs = [(u, w) for u, w in zip(updates, weights, strict=True) if u is not None]
    return svd(stack([u for u, _ in pairs], [w * scale for _, w in pairs]))


class LoraTaskArithmetic(FamilyMethod):
    spec = family_spec(
        "lora_task_arithmetic",
        "Task arithmetic on LoRA factors (exact)",
        (
            WEIGHT,
            Param("lossless", bool, SHARED, False, "rank = sum of input ranks"),
            # auto by default given prompts: it beat lambda 1 on every seed of
            # both benchmarks (docs/quality-real.md, issue 40)
            scale_param(auto_by_default=True),
            AUTO_DATA,
            *AUTO_SETTINGS,
        ),
    )

    def check(self, tensor: str, params: dict, inputs: dict[str, dict]) -> None:
        super().check(tensor, params, inputs)
        if params["lossless"] and params["rank"] is not None:
            raise TadaError(
                f"lora_task_arithmetic: lossless: true writes rank = the sum of the "
                f"input ranks, so rank: {params['rank']} would be ignored: give one "
                f"of the two (at {tensor})"
            )

    def output_rank(self, params: dict, default: int, source_ranks: list[int]) -> int:
        if params["lossless"]:
            return sum(source_ranks)
        return super().output_rank(params, default, source_ranks)

    def combine(self, job, updates):
        weights = self.per_input(job, updates, "weight")
        merged = task_arithmetic(list(updates.values()), weights, job.params["lambda"])
        return merged, {"weights": weights}
