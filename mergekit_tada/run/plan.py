"""Planning and validation: everything that can fail before any output exists.

:class:`MergePlan` checks the config (parameter keys, roles, paths), reads
every LoRA input's config and tensor layout (``adapters.LoraAdapter``), asks a
planner (run/planners.py) for every output tensor and its resolved
parameters, matches adapter modules to them, checks the method's parameters
per tensor, shapes against the base's safetensors headers, and every factor
for NaN/Inf. No tensor is read beyond headers and the adapters' factors.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mergekit_tada.adapters import LoraAdapter
from mergekit_tada.errors import TadaError
from mergekit_tada.loading import HeaderIndex
from mergekit_tada.methods import registry
from mergekit_tada.run.folder import LOCK_NAME, STAGE_PREFIX, check_folder_name
from mergekit_tada.run.names import align_names, head_folders, renamed_modules
from mergekit_tada.run.outputs import CARD, MANIFEST_NAME, MERGEKIT_OUTPUTS

if TYPE_CHECKING:  # mergekit is imported only where its executor runs
    from mergekit.common import ModelReference
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

LOG = logging.getLogger(__name__)
# Gives every output tensor with its resolved parameters (run/planners.py).
Planner = Callable[["MergePlan"], "list[PlannedTensor]"]


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor as a planner sees it, before LoRA modules are matched."""

    name: str
    base_names: list[str]  # the base's name for it and its aliases
    input_names: dict[str, list[str]]  # input label -> its names, in config order
    params: dict
    inputs: dict[str, dict]  # input label -> per-input parameters


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where its LoRA factors are and its resolved parameters."""

    out_name: str
    module: str  # output module name (out_name without ".weight")
    base_names: list[str]  # the base's name for this tensor and its aliases
    sources: dict[str, str | None]  # input label -> adapter module (None: absent)
    params: dict
    inputs: dict[str, dict]  # input label -> per-model parameters
    rank: int

    @property
    def is_lora_target(self) -> bool:
        return any(m is not None for m in self.sources.values())


def _parameter_blocks(
    config: MergeConfiguration,
) -> Iterator[tuple[str, ModelReference | None, dict]]:
    """Every ``parameters:`` mapping in the config: where it sits, its model, keys."""
    yield "parameters", None, config.parameters or {}
    for i, m in enumerate(config.models or []):
        yield f"models[{i}]", m.model, m.parameters or {}
    slices = list(config.slices or [])
    for name, module in (config.modules or {}).items():
        yield f"modules.{name}", None, module.parameters or {}
        slices += module.slices or []
        for m in module.models or []:
            yield f"modules.{name}", m.model, m.parameters or {}
    for i, s in enumerate(slices):
        yield f"slices[{i}]", None, s.parameters or {}
        for src in s.sources:
            yield f"slices[{i}]", src.model, src.parameters or {}


def _check_no_duplicates(name: str, config: MergeConfiguration) -> None:
    """One adapter twice in one list of inputs is refused, whatever its
    spelling: mergekit keys inputs by reference (it raised a traceback, and the
    adapter-only path kept one of them); a weight says what a repeat meant."""
    lists = [("models", [m.model for m in config.models or []])]
    slices = list(config.slices or [])
    for module in (config.modules or {}).values():
        lists.append(("modules", [m.model for m in module.models or []]))
        slices += module.slices or []
    lists += [
        (f"slices[{i}]", [src.model for src in s.sources]) for i, s in enumerate(slices)
    ]
    for where, refs in lists:
        seen: dict[str, int] = {}
        for i, ref in enumerate(refs):
            if ref is None or ref.lora is None:
                continue
            key = os.path.realpath(os.path.expanduser(ref.lora.path))
            if key in seen:
                raise TadaError(
                    f"{name}: adapter {ref.lora.path} is listed twice in {where} "
                    f"(entries {seen[key]} and {i}); list it once and give it "
                    "weight: 2 (or the weight you meant)"
                )
            seen[key] = i


def check_model_path(what: str, path: str) -> None:
    """A model path must be a local folder, or a Hub id we may look up.

    Checked before mergekit sees the path: it would ask the Hub about a
    mistyped local path (a long traceback, or a 28 s wait offline).
    """
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise TadaError(f"{what} {path}: not a folder")
        return
    hub_like = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not hub_like or "\\" in path:
        raise TadaError(
            f"{what} {path}: no such folder (relative paths are resolved from "
            f"{os.getcwd()})"
        )
    from huggingface_hub import constants, try_to_load_from_cache

    offline = constants.HF_HUB_OFFLINE or os.environ.get(
        "HF_HUB_OFFLINE", ""
    ).lower() in ("1", "true", "yes", "on")
    if offline and not isinstance(try_to_load_from_cache(path, "config.json"), str):
        raise TadaError(
            f"{what} {path}: no such local folder, and not in the Hugging Face "
            f"cache while HF_HUB_OFFLINE is set (relative paths are resolved from "
            f"{os.getcwd()})"
        )


INT_MAX = 2**31 - 1  # an integer setting beyond this overflowed deep in a pass
_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
}


def _check_type(spec: Any, where: str, key: str, value: Any) -> None:
    """A parameter's value (or every value of its gradient or filter list) has
    the parameter's type: one line naming the key, not pydantic's traceback."""
    import pydantic

    param = next(p for p in spec.parameters if p.name == key)
    if isinstance(value, list | tuple):
        for item in value:
            inner = (
                item.get("value")
                if isinstance(item, dict)
                else getattr(item, "value", item)
            )
            _check_type(spec, where, key, inner)
        return
    if isinstance(value, dict) or hasattr(value, "filter"):
        inner = value.get("value") if isinstance(value, dict) else value.value
        _check_type(spec, where, key, inner)
        return
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_MAX:
        raise TadaError(f"{where}: {value} is out of range (at most {INT_MAX})")
    try:
        # strict for true/false: pydantic would read `samples: true` as 1
        param.validate(value, strict=isinstance(value, bool))
    except pydantic.ValidationError as error:
        kind = error.errors()[0]["type"].split("_")[0]
        expected = _EXPECTED.get(kind, error.errors()[0]["msg"].lower())
        raise TadaError(f"{where}: expected {expected}, got {value!r}") from None


class MergePlan:
    def __init__(
        self,
        config: MergeConfiguration | Any,
        options: MergeOptions | Any,
        source: str | None,
        planner: Planner,
    ) -> None:
        """Validate the merge; nothing is read beyond headers and factors.

        ``config``/``options``: mergekit's, or for the adapter-only path their
        plain stand-ins (:mod:`mergekit_tada.config`). ``planner``: mergekit's
        own (``integration.mergekit_planner``) or mergekit's JSON definitions
        read as data (``fastpath.definitions_planner``).
        """
        self.config = config
        self.options = options
        self.source = source
        self.planner = planner
        method = registry.get(config.merge_method)
        if method is None:
            raise TadaError(f"{config.merge_method} is not a mergekit-tada method")
        self.method = method
        self._check_config()
        self.base = config.base_model
        base_path = self.base.local_path(cache_dir=options.transformers_cache)
        self.base_path = base_path
        self.headers = HeaderIndex(base_path)
        # in config order: the output must not depend on set iteration order
        refs = dict.fromkeys(r for _, r, _ in _parameter_blocks(config) if r)
        self.model_refs = list(dict.fromkeys([self.base, *refs]))
        self.adapters = {
            str(ref): LoraAdapter(ref.lora.path) for ref in refs if ref.lora is not None
        }
        align_names(self.adapters, self.headers.index.tensor_paths)
        self.heads = head_folders(
            self.adapters, self.base_path, self.headers.index.tensor_paths
        )
        self.default_rank = max(a.max_rank for a in self.adapters.values())
        self.plans = self._plan()
        self._validate_plans()
        adapter_out = {p.params["adapter_out"] for p in self.plans.values()}
        if len(adapter_out) != 1:
            raise TadaError(f"adapter_out must be one folder name, got {adapter_out}")
        self.adapter_out = check_folder_name(adapter_out.pop())
        self._check_outputs()
        for adapter in self.adapters.values():
            adapter.check_all_finite()

    @property
    def targets(self) -> list[TensorPlan]:
        """The output tensors a LoRA updates, in plan order."""
        return [p for p in self.plans.values() if p.is_lora_target]

    def base_files(self) -> list[str]:
        """The base's weight files and config.json: what a cache key covers."""
        files = sorted(set(self.headers.index.tensor_paths.values()))
        return [os.path.join(self.base_path, f) for f in [*files, "config.json"]]

    def input_paths(self) -> dict[str, str]:
        """What this merge reads: described -> path (guarded against the output)."""
        paths = {f"base model {self.base}": self.base_path}
        for label, adapter in self.adapters.items():
            paths[f"adapter of {label}"] = adapter.path
        paths.update(self.method.data_paths(self.targets))
        return paths

    def output_names(self) -> list[str]:
        """Names this merge writes into the output folder."""
        return [
            self.adapter_out,
            self.method.report_name,
            *self.method.plot_files,
            CARD,
            MANIFEST_NAME,
        ]

    # ------------------------------------------------------------------ checks

    def _check_outputs(self) -> None:
        """adapter_out names no other output of the run; one task type; a device
        that exists. Before any work: these would fail after the whole merge."""
        others = self.output_names()[1:]  # every output but the adapter
        taken = [*others, *MERGEKIT_OUTPUTS, LOCK_NAME, f"{STAGE_PREFIX}*"]
        if any(fnmatch.fnmatch(self.adapter_out, p) for p in taken):
            raise TadaError(
                f"adapter_out: {self.adapter_out!r} is the name of another output "
                "of this merge; choose a folder name such as 'adapter'"
            )
        task_types = {
            label: a.config.get("task_type") for label, a in self.adapters.items()
        }
        if len(set(task_types.values()) - {None}) > 1:
            listed = ", ".join(f"{label}: {t}" for label, t in task_types.items())
            LOG.warning(
                "%s: the LoRA inputs have different PEFT task types (%s); the "
                "output adapter takes the first input's (config order)",
                self.method.spec.name,
                listed,
            )
        device = str(self.options.device or "cpu")
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise TadaError(
                    f"device {device}: this torch has no CUDA device "
                    f"(torch {torch.__version__}); use --device cpu"
                )

    def _check_config(self) -> None:
        config = self.config
        name = config.merge_method
        if config.base_model is None:
            raise TadaError(
                f"{name}: base_model is required (the model the LoRAs were trained on)"
            )
        if config.base_model.lora is not None:
            raise TadaError(
                f"{name}: base_model must be a plain model, got {config.base_model}"
            )
        check_model_path("base model", config.base_model.model.path)
        known = {p.name for p in self.method.spec.parameters}
        per_model = {p.name for p in self.method.spec.input_parameters}
        for where, ref, block in _parameter_blocks(config):
            unknown = sorted(set(block) - known)
            if unknown:
                raise TadaError(
                    f"{name}: unknown parameter(s) {', '.join(unknown)} in {where}; "
                    f"known: {', '.join(sorted(known))}"
                )
            misplaced = sorted(per_model & set(block))
            if misplaced and ref is not None and ref.lora is None:
                if ref != config.base_model:
                    raise TadaError(
                        f"{name}: model {ref} in {where} is not a LoRA input: LoRA "
                        f"inputs are written base+adapter, e.g. model: "
                        f"{config.base_model}+{ref}"
                    )
                raise TadaError(
                    f"{name}: {', '.join(misplaced)} given to the non-LoRA model "
                    f"{ref} in {where}; set it under each LoRA input's parameters"
                )
            for key, value in block.items():
                _check_type(self.method.spec, f"{where}.{key}", key, value)
        _check_no_duplicates(name, config)
        for ref in config.referenced_models():
            if ref == config.base_model:
                continue
            if ref.lora is None:
                raise TadaError(
                    f"{name}: model {ref} is not a LoRA input; give adapters as "
                    f"'{config.base_model}+path/to/adapter'"
                )
            if ref.model != config.base_model.model:
                raise TadaError(
                    f"{name}: LoRA input {ref} sits on {ref.model}, but base_model is "
                    f"{config.base_model}; LoRA inputs must share the base model"
                )
            if not os.path.isdir(ref.lora.path):
                raise TadaError(
                    f"{name}: adapter {ref.lora.path} of {ref}: no such folder "
                    f"(relative paths are resolved from {os.getcwd()})"
                )
        self.method.check_inputs(
            [r for r in config.referenced_models() if r != config.base_model]
        )

    def _plan(self) -> dict[str, TensorPlan]:
        import pydantic

        try:
            planned = self.planner(self)
        except pydantic.ValidationError as error:  # a gradient between valid values
            problem = error.errors()[0]
            raise TadaError(
                f"{self.method.spec.name}: a parameter gradient or filter gives "
                f"{problem['input']!r} at some tensor, which its type refuses "
                f"({problem['msg']}); integer settings need whole numbers at every layer"
            ) from None
        plans = {}
        capped: list[tuple[str, int, int]] = []
        renamed = renamed_modules(
            self.adapters, planned, self.base_path, self.headers.index.tensor_paths
        )
        for tensor in planned:
            sources = {}
            for label, names in tensor.input_names.items():
                modules = self.adapters[label].modules
                candidates = [
                    n.removesuffix(".weight") for n in names if n.endswith(".weight")
                ]
                candidates += [renamed[c] for c in candidates if c in renamed]
                sources[label] = next((m for m in candidates if m in modules), None)
            # written under the adapters' name for it (PEFT's, which transformers
            # may rename from the checkpoint's: gpt_neox's embed_out is lm_head),
            # unless slices renumber it (output layer 1 from input layer 2)
            module = tensor.name.removesuffix(".weight")
            named = {m for m in sources.values() if m}
            primary = {ns[0] for ns in tensor.input_names.values() if ns}
            if len(named) == 1 and primary == {tensor.name}:
                module = named.pop()
            plans[tensor.name] = TensorPlan(
                out_name=tensor.name,
                module=module,
                base_names=tensor.base_names,
                sources=sources,
                params=tensor.params,
                inputs=tensor.inputs,
                rank=self._capped_rank(tensor.name, tensor.params, sources, capped),
            )
        # Modules with fewer inputs are capped quietly (their record says so);
        # a rank no module can reach is a mistake worth one line.
        targets = sum(p.is_lora_target for p in plans.values())
        if capped and len(capped) == targets:
            asked, largest = capped[0][1], max(limit for _, _, limit in capped)
            LOG.warning(
                "rank %d is more than the merged update can have in any module "
                "(at most the sum of the input ranks and the shorter side of the "
                "weight: %d here); each module is capped at its own limit",
                asked,
                largest,
            )
        return plans

    def base_gives(self, name: str) -> bool:
        """Whether mergekit's loader gets weight ``name`` from the base's
        checkpoint, by name or through transformers' conversion (MoE experts
        stored one by one)."""
        from mergekit.architecture.conversion import can_convert_checkpoint_keys

        return can_convert_checkpoint_keys(*self._base_layout, name)

    @functools.cached_property
    def _base_layout(self) -> tuple[str | None, set[str]]:
        with open(os.path.join(self.base_path, "config.json"), encoding="utf-8") as fh:
            model_type = json.load(fh).get("model_type")
        return model_type, set(self.headers.index.tensor_paths)

    def _capped_rank(
        self,
        weight: str,
        params: dict,
        sources: dict[str, str | None],
        capped: list[tuple[str, int, int]],
    ) -> int:
        """The method's output rank, capped at what the merged update can have."""
        specs = [self.adapters[label].modules[m] for label, m in sources.items() if m]
        ranks = [spec.rank for spec in specs]
        rank = self.method.output_rank(params, self.default_rank, ranks)
        if specs:
            shape = (specs[0].out_features, specs[0].in_features)
            limit = self.method.rank_limit(ranks, shape)
            if rank > limit:
                capped.append((weight, rank, limit))
                return limit
        return rank

    def _validate_plans(self) -> None:
        used: set[tuple[str, str]] = set()
        for plan in self.targets:
            self.method.check(plan.out_name, plan.params, plan.inputs)
            base_name = self.headers.resolve(plan.base_names)
            base_shape = self.headers.meta(base_name)[0] if base_name else None
            for label, module in plan.sources.items():
                if module is None:
                    continue
                used.add((label, module))
                spec = self.adapters[label].modules[module]
                if base_shape != spec.base_shape:
                    rows, cols = spec.base_shape
                    raise TadaError(
                        f"{self.adapters[label].weights_path}: module {module} updates a "
                        f"{rows}x{cols} weight, but "
                        f"{plan.out_name} in {self.base_path} is {base_shape}: "
                        "was the adapter trained on a different base model?"
                    )
            layouts = {
                self.adapters[label].modules[m].transposed
                for label, m in plan.sources.items()
                if m
            }
            if len(layouts) > 1:
                raise TadaError(
                    f"{plan.module}: some LoRA inputs set fan_in_fan_out and others "
                    "do not; adapters of one base module agree on its layout"
                )
        sliced = bool(self.config.slices) or any(
            m.slices for m in (self.config.modules or {}).values()
        )
        for label, adapter in self.adapters.items():
            for module in adapter.modules:
                if (label, module) in used:
                    continue
                message = (
                    f"{adapter.weights_path}: module {module} matches no weight of "
                    f"base model {self.base_path}"
                )
                if not sliced:
                    raise TadaError(
                        message + ": was the adapter trained on a different base model?"
                    )
                LOG.warning(message + " in the selected slices; it is left out")
