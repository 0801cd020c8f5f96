"""Compress-then-Merge, CtM (He et al., ICML 2026, arXiv 2606.03723), on LoRA factors.

Per module, in core space (methods/core_space.py): the cores M_t (K x K) are
stacked into a K x K x T tensor and compressed by a Tucker-2 decomposition
of rank r on the first two modes, M_t ~ P C_t Q^T (P, Q: K x r orthonormal);
a merge rule runs on the r x r cores C_t = P^T M_t Q, and the update is
U_B P C Q^T V_A^T: rank r by construction, nothing truncated afterwards.

Tucker-2 by HOOI from an HOSVD start (P, Q: the top-r left singular vectors
of the mode unfoldings), alternating P <- top-r of [M_t Q]_t and
Q <- top-r of [M_t^T P]_t. Stopping rule, the authors' (tensorly's
``partial_tucker`` with ``tol=1e-6``, ``n_iter_max=1000``): stop when the
relative reconstruction error ||M - M_hat|| / ||M|| changes by less than
``tol`` between sweeps. Written here (about 20 lines of K x K eigh) rather
than with tensorly: no new dependency, float64, one thread, deterministic.

``beta`` (the authors' default 0): before the fit each core is rescaled to
||M_t|| beta + mean_s ||M_s|| (1 - beta), so at 0 every task weighs the same
in the shared basis; the cores C_t are then taken from the unscaled M_t.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mergekit_tada.lowrank import Factored
from mergekit_tada.methods.base import (
    AUTO_DATA,
    AUTO_SETTINGS,
    DENSITY,
    WEIGHT,
    FamilyMethod,
    family_spec,
    scale_param,
)
from mergekit_tada.methods.core_space import CoreSpace, core_space
from mergekit_tada.methods.gta import METHODS as GTA
from mergekit_tada.methods.iso import LoraIsoC
from mergekit_tada.methods.params import SHARED, Param
from mergekit_tada.methods.task_arithmetic import LoraTaskArithmetic
from mergekit_tada.methods.tsv_m import LoraTsvM

# the rules CtM applies to the r x r cores: the family's own methods
RULES = {
    "task_arithmetic": LoraTaskArithmetic(),
    "ties": next(m for m in GTA if m.spec.name == "lora_ties"),
    "tsv_m": LoraTsvM(),
    "iso_c": LoraIsoC(),
}


def _top_left(blocks: list[torch.Tensor], rank: int) -> torch.Tensor:
    """The top-``rank`` left singular vectors of [X_1 ... X_T] (from its K x K Gram)."""
    G = sum(X @ X.T for X in blocks)
    _, vectors = torch.linalg.eigh(G)  # ascending
    return vectors[:, -rank:].flip(1)


def tucker2(
    cores: list[torch.Tensor], rank: int, tol: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """HOOI for M_t ~ P C_t Q^T: (P, Q, sweeps, relative error), float64."""
    rank = min(rank, cores[0].shape[0], cores[0].shape[1])
    total = sum(float(torch.sum(M * M)) for M in cores)
    P = _top_left(cores, rank)
    Q = _top_left([M.T for M in cores], rank)
    error, sweeps = 1.0, 0
    while sweeps < max_iter:
        sweeps += 1
        P = _top_left([M @ Q for M in cores], rank)
        Q = _top_left([M.T @ P for M in cores], rank)
        kept = sum(float(torch.sum((P.T @ M @ Q) ** 2)) for M in cores)
        previous = error
        error = (max(total - kept, 0.0) / total) ** 0.5 if total > 0 else 0.0
        if abs(previous - error) < tol:
            break
    return P, Q, sweeps, error


class LoraCtm(FamilyMethod):
    spec = family_spec(
        "lora_ctm",
        "Compress-then-Merge: a rule on rank-r Tucker cores",
        (
            WEIGHT,
            DENSITY,
            Param("rule", str, SHARED, "task_arithmetic", ", ".join(RULES)),
            Param("beta", float, SHARED, 0.0, "0: equal task norms for the fit"),
            scale_param(),
            AUTO_DATA,
            *AUTO_SETTINGS,
            Param("tol", float, SHARED, 1e-6, "HOOI: stop below this error change"),
            Param("max_iter", int, SHARED, 1000, "HOOI sweeps at most"),
        ),
    )

    def check(self, tensor: str, params: dict, inputs: dict[str, dict]) -> None:
        super().check(tensor, params, inputs)
        self.check_choices(tensor, params, (("rule", tuple(RULES)),))
        self.check_bounds(
            tensor,
            params,
            (("beta", 0, 1), ("tol", 0, None, True), ("max_iter", 1, None)),
        )

    def combine(self, job, updates):
        labels = [label for label, u in updates.items() if u is not None]
        space = core_space(list(updates.values()))
        cores = [space.project(updates[label]).dense().double() for label in labels]
        norms = [float(M.norm()) for M in cores]
        mean = sum(norms) / len(norms)
        beta = job.params["beta"]
        fitted = [
            M * ((n * beta + mean * (1 - beta)) / n) if n > 0 else M
            for M, n in zip(cores, norms, strict=True)
        ]
        P, Q, sweeps, error = tucker2(
            fitted, job.rank, job.params["tol"], job.params["max_iter"]
        )
        small = {
            label: Factored((P.T @ M @ Q).float(), torch.eye(P.shape[1]))
            for label, M in zip(labels, cores, strict=True)
        }
        rule = RULES[job.params["rule"]]
        merged, extra = rule.combine(self._rule_job(rule, job, labels), small)
        compressed = CoreSpace(space.left @ P.float(), space.right @ Q.float())
        merged = compressed.lift(merged).scaled(job.params["lambda"])
        record = {
            **extra,
            "rule": job.params["rule"],
            "tucker_sweeps": sweeps,
            "tucker_error": float(f"{error:.6g}"),
        }
        return merged, record

    @staticmethod
    def _rule_job(rule: FamilyMethod, job, labels: list[str]):
        """The rule's own parameters at their defaults (its global scale 1: CtM's
        ``lambda`` applies after), each input's weight and density from ours."""
        params = {p.name: p.default for p in rule.spec.shared_parameters}
        params |= {"rank": job.rank, "space": "full", rule.scale_key: 1.0}
        inputs = {}
        for label in labels:
            inputs[label] = {p.name: p.default for p in rule.spec.input_parameters}
            inputs[label] |= {
                k: job.inputs[label][k] for k in inputs[label] if k in job.inputs[label]
            }
        return replace(job, params=params, inputs=inputs, updates={})
