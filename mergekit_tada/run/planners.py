"""Which output tensors a merge has, and each one's resolved parameters.

Two planners give the same answer (``tests/test_planning.py`` compares them):

* :func:`with_mergekit` runs mergekit's own ``MergePlanner`` on a copy of the
  config: every config form (slices, modules, inferred architectures).
* :func:`from_definitions` covers the ``models:`` form on an architecture that
  mergekit defines in JSON: it reads those JSON files and ``config.json`` as
  data and resolves parameters with mergekit's rules (:func:`evaluate_setting`,
  copied from ``mergekit/config.py``), so the adapter-only path needs no
  mergekit, transformers or peft import (their import is most of its time).
  It returns None for anything else: the caller then uses mergekit's planner.
"""

from __future__ import annotations

import importlib.util
import json
import os
import string
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from mergekit_tada.loading import transformers_errors_only
from mergekit_tada.run.plan import PlannedTensor

if TYPE_CHECKING:
    from mergekit_tada.methods.params import MethodSpec, Param
    from mergekit_tada.run.plan import MergePlan


def base_architecture(config: Any, options: Any) -> Any:
    """mergekit's architecture of the base, which is every LoRA input's (checked).

    mergekit's own lookup opens every referenced model, and for an architecture
    without a JSON definition (xlm-roberta) its inference reads each
    ``base+lora`` input's tensor index, which asserts; the base alone suffices.
    Where a definition's required weights are not in the base's checkpoint,
    the architecture is inferred from the checkpoint's own names.
    """
    from mergekit.architecture import arch_info_for_config, infer_architecture_info

    from mergekit_tada.loading import HeaderIndex

    base = config.base_model
    hf_config = base.config(trust_remote_code=options.trust_remote_code)
    found = arch_info_for_config(hf_config)
    if found is not None:
        # a definition whose required weights the checkpoint lacks (mergekit's
        # RobertaModel and DistilBertModel name them "roberta.", "distilbert.";
        # a bare encoder saves them without): the base's own names instead
        present = set(HeaderIndex(base.model.path).index.tensor_paths)
        required = [w for w in found.all_weights(hf_config) if not w.optional]
        if all({w.name, *(w.aliases or ())} & present for w in required):
            return found
    inferred = infer_architecture_info((base,), base, options)
    return _checkpoint_names(inferred, base.model.path)


def _checkpoint_names(arch: Any, base_path: str) -> Any:
    """mergekit infers the weights' names from transformers' model, which
    renames some checkpoint keys on load (gpt_neox's ``embed_out`` is its
    ``lm_head``): such a weight is absent from the checkpoint, taken for
    optional, and left out of the merged model. Each gets the checkpoint's
    name (the model's an alias), as the base has it."""
    from mergekit_tada.loading import HeaderIndex
    from mergekit_tada.streaming import renamed_on_load

    keys = HeaderIndex(base_path).index.tensor_paths
    to_checkpoint = {
        name: key for key, name in renamed_on_load(base_path, keys).items()
    }
    for module in arch.modules.values():
        definition = module.architecture.definition
        for weights in (definition.pre_weights, definition.post_weights):
            for i, w in enumerate(weights):
                if w.name in to_checkpoint:
                    weights[i] = w.model_copy(
                        update={
                            "name": to_checkpoint[w.name],
                            "aliases": (w.name, *(w.aliases or ())),
                            "optional": False,
                        }
                    )
    return arch


def with_mergekit(plan: MergePlan) -> list[PlannedTensor]:
    """mergekit's planner on a copy of the config (run with the plan active:
    ``integration.mergekit_planner``)."""
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.plan import MergePlanner

    config = plan.config.model_copy(deep=True)  # the planner rewrites it
    options = plan.options
    LoaderCache().setup(options=options)
    # mergekit keys its loaders by model reference: one an earlier merge in this
    # process left would read that run's folder under the same relative path
    LoaderCache().loaders.clear()
    arch = base_architecture(config, options)
    with transformers_errors_only():  # mergekit sets the deprecated torch_dtype
        out_cfg = _model_out_config(
            config, arch, trust_remote_code=options.trust_remote_code
        )
    planner = MergePlanner(config, arch, options=options, out_model_config=out_cfg)
    planner._plan()
    planned = []
    for weight, task in planner._tensors:
        gather = task.gather_tensors
        while not hasattr(gather, "weight_info"):  # vocabulary wrappers
            gather = gather.gather_tensors
        infos = gather.weight_info
        names = {
            str(ref): [infos[ref].name, *(infos[ref].aliases or ())]
            for ref in task.model_order
            if ref != task.base_model
        }
        base = infos[task.base_model]
        planned.append(
            PlannedTensor(
                name=weight.name,
                base_names=[base.name, *(base.aliases or ())],
                input_names=names,
                params=dict(task.parameters.items()),
                inputs={
                    str(ref): dict(task.input_parameters[ref].items())
                    for ref in task.model_order
                    if ref != task.base_model
                },
            )
        )
    return planned


# ------------------------------------------------- mergekit's rules, as data


def evaluate_setting(
    tensor_name: str, setting: Any, t: float, validate: Callable[[Any], Any]
) -> Any:
    """mergekit's ``evaluate_setting`` on plain YAML data (conditions are dicts).

    Numeric gradients interpolate at ``t``; other gradients pick an element;
    a list of ``{filter, value}`` takes the first whose filter is a substring
    of the tensor name (or ``*`` / absent).
    """
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (float, int, bool, str)):
        return validate(setting)
    if not setting:
        return None
    if all(isinstance(e, (float, int, bool, str)) for e in setting):
        values = [validate(e) for e in setting]
        if not all(
            isinstance(e, (int, float)) and not isinstance(e, bool) for e in values
        ):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return validate((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
            return evaluate_setting(tensor_name, cond["value"], t, validate)
    return None


def resolve(
    param: Param, scopes: Iterable[dict | None], tensor_name: str, t: float
) -> Any:
    """The first scope's value that resolves (mergekit's ``resolve_parameter``)."""
    for scope in scopes:
        if scope is not None and param.name in scope:
            value = evaluate_setting(tensor_name, scope[param.name], t, param.validate)
            if value is not None:
                return value
    return param.validate(param.default)


class _Template(string.Template):
    idpattern = r"(?a:[_a-z][_a-z0-9]*([+-]1)?)"  # mergekit's ${layer_index+1}


def _substitute(text: str, num_layers: int, layer: int | None) -> str:
    if "{" not in text:
        return text
    values = {
        "num_layers": num_layers,
        "num_layers+1": num_layers + 1,
        "num_layers-1": num_layers - 1,
    }
    if layer is not None:
        values |= {
            "layer_index": layer,
            "layer_index+1": layer + 1,
            "layer_index-1": layer - 1,
        }
    return _Template(text).substitute(values)


# mergekit builds these in code, not from their JSON files
_CODE_DEFINED = ("AfmoeForCausalLM", "Glm4MoeForCausalLM")


def architecture_definition(model_config: dict) -> dict | None:
    """mergekit's JSON definition of a single-module architecture, or None."""
    names = model_config.get("architectures") or []
    if len(names) != 1 or names[0] in _CODE_DEFINED:
        return None
    spec = importlib.util.find_spec("mergekit._data.architectures")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = spec.submodule_search_locations[0]
    candidates = []
    for file in sorted(os.listdir(folder)):
        if file.lower().endswith(".json"):
            with open(os.path.join(folder, file), encoding="utf-8") as fh:
                data = json.load(fh)
            if names[0] in data.get("architectures", ()):
                candidates.append(data)
    if len(candidates) > 1:
        candidates = [
            c
            for c in candidates
            if c.get("model_type") == model_config.get("model_type")
        ][:1]
    if len(candidates) != 1 or candidates[0].get("kind", "module") != "module":
        return None
    return candidates[0]


def from_definitions(
    config: Any, spec: MethodSpec, base_path: str, base_tensors: Iterable[str]
) -> list[PlannedTensor] | None:
    """The plan of a ``models:`` config from mergekit's JSON definitions, or None.

    ``config`` is a :class:`mergekit_tada.config.PlainConfig`; ``base_tensors``
    the base's tensor names (an optional weight none of whose names is there is
    skipped, as mergekit does). Same order as mergekit's planner: the
    definition's pre-weights (t = 0), each layer's weights (t = i / (n - 1)),
    post-weights (t = 0).
    """
    with open(os.path.join(base_path, "config.json"), encoding="utf-8") as fh:
        model_config = json.load(fh)
    definition = architecture_definition(model_config)
    if definition is None:
        return None
    num_layers = definition.get("override_num_layers")
    if num_layers is None:
        num_layers = model_config
        for part in (definition.get("num_layers_config_key") or "").split("."):
            if not isinstance(num_layers, dict) or part not in num_layers:
                return None
            num_layers = num_layers[part]
    if not isinstance(num_layers, int) or isinstance(num_layers, bool):
        return None
    present = set(base_tensors)
    inputs = [
        (str(m.model), m.parameters)
        for m in config.models
        if m.model != config.base_model
    ]
    weights = [(w, None, 0.0) for w in definition["pre_weights"]]
    for i in range(num_layers):
        t = i / (num_layers - 1) if num_layers > 1 else 1
        weights += [(w, i, t) for w in definition["layer_templates"]["weights"]]
    weights += [(w, None, 0.0) for w in definition["post_weights"]]
    planned = []
    for weight, layer, t in weights:
        names = [
            _substitute(n, num_layers, layer)
            for n in [weight["name"], *(weight.get("aliases") or ())]
        ]
        if weight.get("optional") and not present.intersection(names):
            continue
        name = names[0]
        planned.append(
            PlannedTensor(
                name=name,
                base_names=names,
                input_names={label: names for label, _ in inputs},
                params={
                    p.name: resolve(p, [config.parameters], name, t)
                    for p in spec.shared_parameters
                },
                inputs={
                    label: {
                        p.name: resolve(p, [own, config.parameters], name, t)
                        for p in spec.input_parameters
                    }
                    for label, own in inputs
                },
            )
        )
    return planned
