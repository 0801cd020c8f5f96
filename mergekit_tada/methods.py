"""Our merge methods as mergekit sees them: a spec and a per-tensor entry point.

mergekit calls ``merge_group`` once per output tensor with the base weight and
zero-cost placeholders for the LoRA inputs. The work happens in the active
:class:`~mergekit_tada.session.MergeSession`, which reads the LoRA factors,
asks the method for the merged rank-r factors of the module (``merge_module``)
and returns ``W + B A``.
"""

from __future__ import annotations

from typing import Any

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    OptionalTensorPolicy,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)

from mergekit_tada.errors import TadaError
from mergekit_tada.lowrank import Factored
from mergekit_tada.tada import ModuleMerge, tada_merge_module

SHARED = ParameterScope.SHARED
NON_BASE = ParameterScope.NON_BASE

# Parameters every LoRA-space method takes.
COMMON_PARAMETERS = (
    ParameterSpec("rank", int | None, SHARED, None, "output LoRA rank"),
    ParameterSpec("adapter_out", str, SHARED, "adapter", "adapter sub-folder"),
)
ROLES = ("task", "domain")
GATE_MODES = ("uniform", "fixed")


class LoraMergeMethod(GroupMergeMethod):
    """A merge done on LoRA factors; mergekit sees only ``W -> W + dW``."""

    def merge_group(self, group: TensorGroup, /, **_parameters: Any) -> torch.Tensor:
        # The session resolved and validated the same parameters when it planned
        # the merge (same config, same resolver), so it uses its own copy.
        from mergekit_tada.session import active_session

        return active_session(self.spec.name).merge_tensor(group)

    def check(self, tensor: str, params: dict, inputs: dict[str, dict]) -> None:
        """Validate one tensor's resolved parameters; raise TadaError naming it."""
        rank = params.get("rank")
        if rank is not None and rank <= 0:
            raise TadaError(
                f"rank must be a positive integer (got {rank}) for {tensor}"
            )

    def merge_module(
        self,
        updates: dict[str, Factored | None],
        params: dict,
        inputs: dict[str, dict],
        rank: int,
    ) -> ModuleMerge:
        """Merged rank-r factors of one module from the inputs' factored updates.

        ``updates`` and ``inputs`` are keyed by input label (``str`` of the model
        reference), in config order; a missing module is ``None``.
        """
        raise NotImplementedError


class TadaMethod(LoraMergeMethod):
    spec = MergeMethodSpec(
        name="tada",
        pretty_name="TaDA (task-domain LoRA merging)",
        contract=InputContract(
            base=BasePolicy.REQUIRED, min_non_base=2, max_non_base=2
        ),
        optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_BASE_SINGLETON,
        parameters=(
            ParameterSpec("role", str | None, NON_BASE, None, "task | domain"),
            *COMMON_PARAMETERS,
            ParameterSpec("gates", str, SHARED, "uniform", "uniform | fixed"),
            ParameterSpec("task_weight", float, SHARED, 0.5),
            ParameterSpec("domain_weight", float, SHARED, 0.5),
            ParameterSpec("conflict_elimination", bool, SHARED, True),
            ParameterSpec("conflict_threshold", float, SHARED, 0.3, "kappa"),
        ),
    )

    def check(self, tensor: str, params: dict, inputs: dict[str, dict]) -> None:
        super().check(tensor, params, inputs)
        roles = {label: p.get("role") for label, p in inputs.items()}
        for label, role in roles.items():
            if role not in ROLES:
                raise TadaError(
                    f"tada: model {label} needs parameters: {{role: task}} or "
                    f"{{role: domain}} (got role={role!r}) for {tensor}"
                )
        if sorted(roles.values()) != sorted(ROLES):
            raise TadaError(
                "tada: exactly one model must have role 'task' and one role "
                f"'domain'; got {roles} for {tensor}"
            )
        if params["gates"] not in GATE_MODES:
            raise TadaError(
                f"tada: gates must be one of {', '.join(GATE_MODES)} "
                f"(got {params['gates']!r}) for {tensor}"
            )
        if params["conflict_threshold"] < 0:
            raise TadaError(
                f"tada: conflict_threshold must be >= 0 (got "
                f"{params['conflict_threshold']}) for {tensor}"
            )
        for key in ("task_weight", "domain_weight"):
            if params[key] < 0:
                raise TadaError(
                    f"tada: {key} must be >= 0 (got {params[key]}) for {tensor}"
                )

    @staticmethod
    def gates(params: dict) -> tuple[float, float]:
        if params["gates"] == "uniform":
            return 0.5, 0.5
        return float(params["task_weight"]), float(params["domain_weight"])

    def merge_module(
        self,
        updates: dict[str, Factored | None],
        params: dict,
        inputs: dict[str, dict],
        rank: int,
    ) -> ModuleMerge:
        by_role = {inputs[label]["role"]: update for label, update in updates.items()}
        task_gate, domain_gate = self.gates(params)
        return tada_merge_module(
            by_role["task"],
            by_role["domain"],
            task_gate=task_gate,
            domain_gate=domain_gate,
            rank=rank,
            conflict_elimination=params["conflict_elimination"],
            kappa=params["conflict_threshold"],
        )


METHODS: tuple[LoraMergeMethod, ...] = (TadaMethod(),)
METHOD_NAMES = frozenset(m.spec.name for m in METHODS)


def register_all() -> None:
    """Add our methods to mergekit's registry (idempotent)."""
    from mergekit.merge_methods import registry

    known = {m.spec.name for m in registry.registered_methods()}
    for method in METHODS:
        if method.spec.name not in known:
            registry.register(method)
