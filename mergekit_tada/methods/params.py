"""What a merge method declares, without importing mergekit: name, inputs, parameters.

mergekit's registry holds a wrapper built from this (``integration.register_all``);
the adapter-only path (``mergekit_tada/fastpath.py``) reads it directly, so a
method can be looked up, validated and run without mergekit's import cost.
Parameter values are validated with a pydantic ``TypeAdapter``, exactly as
mergekit's ``ParameterSpec.validate`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter

SHARED = "shared"  # one value per tensor (mergekit's ParameterScope.SHARED)
NON_BASE = "non_base"  # one value per LoRA input (ParameterScope.NON_BASE)


@dataclass(frozen=True)
class Param:
    name: str
    value_type: Any
    scope: str
    default: Any = None
    description: str | None = None
    _adapter: TypeAdapter = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_adapter", TypeAdapter(self.value_type))

    def validate(self, value: Any, strict: bool = False) -> Any:
        return self._adapter.validate_python(value, strict=strict)


@dataclass(frozen=True)
class MethodSpec:
    """A method's name and parameters; inputs are the base plus LoRA models."""

    name: str
    pretty_name: str
    parameters: tuple[Param, ...]
    min_inputs: int = 2  # LoRA inputs (the base is required and not counted)
    max_inputs: int | None = None

    @property
    def shared_parameters(self) -> tuple[Param, ...]:
        return tuple(p for p in self.parameters if p.scope == SHARED)

    @property
    def input_parameters(self) -> tuple[Param, ...]:
        return tuple(p for p in self.parameters if p.scope == NON_BASE)
