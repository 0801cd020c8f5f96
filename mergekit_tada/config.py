"""The ``models:`` form of a mergekit config as plain data (no mergekit import).

mergekit's ``MergeConfiguration`` lives in a module that imports peft and
transformers (seconds of start-up). The adapter-only path reads the common form
itself: ``merge_method``, ``base_model``, ``models`` (``base+adapter`` strings
with ``parameters``), ``parameters``, ``dtype``, ``out_dtype``; local folders
only. The classes answer the attributes :class:`~mergekit_tada.run.plan.MergePlan`
reads as mergekit's do (``str()`` of a reference is mergekit's label).
:func:`read_plain_config` returns None for anything else, or anything it is not
sure mergekit reads the same way; the caller then uses mergekit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

_SCALAR = (bool, int, float, str)


@dataclass(frozen=True)
class ModelPath:
    path: str

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class Reference:
    """``path`` or ``path+lora_path``, as mergekit's ``ModelReference``."""

    model: ModelPath
    lora: ModelPath | None = None

    def __str__(self) -> str:
        return f"{self.model}+{self.lora}" if self.lora else str(self.model)

    def local_path(self, cache_dir: str | None = None) -> str:
        return self.model.path


@dataclass(frozen=True)
class InputModel:
    model: Reference
    parameters: dict | None = None


@dataclass(frozen=True)
class PlainConfig:
    merge_method: str
    base_model: Reference
    models: list[InputModel]
    parameters: dict | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    slices: None = None  # the forms this reader leaves to mergekit
    modules: None = None

    def referenced_models(self) -> list[Reference]:
        return list(dict.fromkeys([self.base_model, *(m.model for m in self.models)]))


@dataclass(frozen=True)
class PlainOptions:
    """The ``MergeOptions`` fields a merge run reads, at mergekit's defaults."""

    device: str = "cpu"
    quiet: bool = False
    verbosity: int = 0
    num_threads: int | None = None
    random_seed: int | None = None
    transformers_cache: str | None = None
    trust_remote_code: bool = False
    write_model_card: bool = True


def _reference(value: Any) -> Reference | None:
    if not isinstance(value, str) or "@" in value:
        return None
    chunks = value.split("+")
    if len(chunks) > 2 or not all(os.path.isdir(c) for c in chunks):
        return None  # Hub ids, missing folders: mergekit's path explains them
    return Reference(
        ModelPath(chunks[0]), ModelPath(chunks[1]) if len(chunks) == 2 else None
    )


def _is_gradient(value: Any) -> bool:
    return isinstance(value, _SCALAR) or (
        isinstance(value, list) and all(isinstance(e, _SCALAR) for e in value)
    )


def _is_condition(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and "value" in value
        and set(value) <= {"filter", "value"}
        and (value.get("filter") is None or isinstance(value["filter"], str))
        and _is_gradient(value["value"])
    )


def _is_setting(value: Any) -> bool:
    """A value mergekit's ``ParameterSetting`` takes as it stands."""
    if _is_gradient(value) or _is_condition(value):
        return True
    return isinstance(value, list) and all(_is_condition(e) for e in value)


def _parameters(value: Any) -> tuple[bool, dict | None]:
    if value is None:
        return True, None
    ok = isinstance(value, dict) and all(
        isinstance(k, str) and _is_setting(v) for k, v in value.items()
    )
    return ok, value if ok else None


def read_plain_config(data: Any) -> PlainConfig | None:
    """The config if it is the plain ``models:`` form on local folders, else None."""
    top = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}
    if not isinstance(data, dict) or not set(data) <= top:
        return None
    method, models = data.get("merge_method"), data.get("models")
    base = _reference(data.get("base_model"))
    if not isinstance(method, str) or base is None or not isinstance(models, list):
        return None
    if not models or not all(
        isinstance(data.get(k), str | None) for k in ("dtype", "out_dtype")
    ):
        return None
    inputs = []
    for item in models:
        if not isinstance(item, dict) or not set(item) <= {"model", "parameters"}:
            return None
        ref = _reference(item.get("model"))
        ok, params = _parameters(item.get("parameters"))
        if ref is None or not ok:
            return None
        inputs.append(InputModel(ref, params))
    ok, params = _parameters(data.get("parameters"))
    if not ok:
        return None
    return PlainConfig(
        merge_method=method,
        base_model=base,
        models=inputs,
        parameters=params,
        dtype=data.get("dtype"),
        out_dtype=data.get("out_dtype"),
    )
