"""The places where stock mergekit is redirected.

Installed by the start-up hook once ``mergekit.merge`` has been imported; every
patch but two bug fixes (BERT aliases, offline model cards) is a no-op unless
the config's ``merge_method`` is ours.

* ``mergekit.merge.run_merge``: runs our methods as a merge run (run/main.py:
  validate first, write adapter + report after; an unknown method name is
  refused with the nearest known ones, for every method). Callers that do
  ``from mergekit.merge import run_merge`` (``mergekit-yaml``, ``mergekit-multi``)
  import it after the hook ran, so they get the wrapper.
* ``LoaderCache.get``: a ``base+lora`` input gets a placeholder loader instead
  of being merged into a full model on disk (no ``--lora-merge-cache``). The
  placeholder is kept by the running merge, never in mergekit's process-wide
  cache.
* ``MergePlanner.plan_tensor``: mergekit 0.1.5 crashes on optional weights
  with aliases (``[name] + aliases`` with a tuple; every BertModel merge);
  aliases are handed over as a tuple that list concatenation accepts. This
  one applies to every method, stock ones included (tested on MiniLM). During
  our runs, an optional weight the base gives only through transformers'
  conversion (fused MoE experts in a model whose layers differ) is planned,
  where mergekit would leave it out of the merged model.
* ``mergekit.merge.get_architecture_info``: during our runs, the base's
  architecture (every LoRA input's): mergekit's inference for an architecture
  without a definition would open each ``base+lora`` input and assert.
* ``mergekit.card.is_hf``: the model card asks the Hugging Face Hub whether a
  local relative path such as ``lora-a`` is a repository, which crashes the
  run after the weights are written when offline; an existing local path is
  local (for every method).
* ``mergekit.merge.generate_card``: the card lists the models in the order of
  a Python set (``referenced_models()``), so its bytes change with
  ``PYTHONHASHSEED``; during our runs it lists them in config order.

mergekit calls a registered method with a tensor group only, and its loader
cache and card with no run at all: the merge in progress reaches them through
one slot (:func:`activated`), filled here around mergekit's planner
(:func:`mergekit_planner`) and executor (:func:`mergekit_executor`), the two
things this module hands to ``run.main.run``. The run itself never imports
this module.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_tada.errors import TadaError

if TYPE_CHECKING:
    from mergekit_tada.run.execute import Execution
    from mergekit_tada.run.plan import MergePlan

_INSTALLED = False
_ORIGINAL_RUN_MERGE: Any = None  # mergekit's own run_merge, before our wrapper
_ACTIVE: Running | None = None  # the merge in progress in this process


class Running:
    """What mergekit's calls need of the merge in progress: its plan, and
    during execution the execution that merges each tensor."""

    def __init__(self, plan: MergePlan, execution: Execution | None = None) -> None:
        self.plan = plan
        self.execution = execution

    def placeholder_loader(self, model: Any) -> Any:
        """Zero-cost placeholders for a ``base+lora`` input (loading.py)."""
        from mergekit.common import dtype_from_name

        from mergekit_tada.loading import PlaceholderLoader

        return PlaceholderLoader(
            self.plan.headers, dtype_from_name(self.plan.config.dtype)
        )

    def merge_tensor(self, group: Any) -> Any:
        """mergekit's per-tensor call: ``W + B A`` for LoRA targets, else ``W``."""
        return self.execution.merge_tensor(group.metadata.name, group.base.tensor)


def current() -> Running | None:
    """The merge running in this process, or None."""
    return _ACTIVE


def active(method_name: str) -> Running:
    """The running merge, for a method's per-tensor call from mergekit."""
    if _ACTIVE is None or _ACTIVE.execution is None:
        raise TadaError(
            f"merge_method {method_name} reads LoRA factors and must run through "
            "mergekit-yaml, mergekit-tada or mergekit_tada.merge with the "
            "mergekit_tada start-up hook active (reinstall mergekit-tada)"
        )
    return _ACTIVE


@contextlib.contextmanager
def activated(running: Running) -> Iterator[None]:
    """Make ``running`` the merge that mergekit's calls reach."""
    global _ACTIVE
    if _ACTIVE is not None and _ACTIVE.plan is not running.plan:
        raise RuntimeError("another mergekit-tada merge is running in this process")
    previous, _ACTIVE = _ACTIVE, running
    try:
        yield
    finally:
        _ACTIVE = previous


def mergekit_planner(plan: MergePlan) -> list:
    """mergekit's own planner on the plan's config (run/planners.py)."""
    from mergekit_tada.run.planners import with_mergekit

    with activated(Running(plan)):
        return with_mergekit(plan)


def mergekit_executor(execution: Execution, target: Path) -> None:
    """mergekit's own ``run_merge`` into the stage folder, this execution active."""
    plan = execution.plan
    with activated(Running(plan, execution)):
        original_run_merge()(plan.config, str(target), plan.options, plan.source)


def run_ours(
    config: Any,
    options: Any,
    out_path: str,
    source: str | None,
    full: bool = True,
    extra_files: dict[str, str] | None = None,
) -> None:
    """One of our methods' merges through mergekit's planner (and executor if
    ``full``; else the adapter only)."""
    from mergekit_tada.methods import registry
    from mergekit_tada.run.main import run

    if registry.get(config.merge_method) is None:
        check_method_name(config.merge_method)
    run(
        config,
        options,
        out_path,
        source,
        planner=mergekit_planner,
        executor=mergekit_executor if full else None,
        extra_files=extra_files,
    )


class _ConcatTuple(tuple):
    """A tuple that ``list + tuple`` accepts (mergekit 0.1.5 plan.py bug)."""

    def __radd__(self, other: Any) -> Any:
        if isinstance(other, list):
            return other + list(self)
        return NotImplemented


def _is_ours(method_name: str) -> bool:
    from mergekit_tada.methods.registry import METHOD_NAMES

    return method_name in METHOD_NAMES


def register_all() -> None:
    """Put a mergekit wrapper of each of our methods in its registry (idempotent).

    The wrapper carries mergekit's form of the method's spec; its per-tensor
    call lands in the running merge (the parameters mergekit resolves are the
    ones the plan resolved and validated).
    """
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import (
        BasePolicy,
        GroupMergeMethod,
        InputContract,
        MergeMethodSpec,
        OptionalTensorPolicy,
        ParameterScope,
        ParameterSpec,
    )

    from mergekit_tada.methods.params import SHARED
    from mergekit_tada.methods.registry import METHODS

    class LoraMethodForMergekit(GroupMergeMethod):
        def __init__(self, spec: MergeMethodSpec) -> None:
            self.spec = spec

        def merge_group(self, group: Any, /, **_parameters: Any) -> Any:
            return active(self.spec.name).merge_tensor(group)

    known = {m.spec.name for m in registry.registered_methods()}
    for method in METHODS:
        spec = method.spec
        if spec.name in known:
            continue
        parameters = tuple(
            ParameterSpec(
                p.name,
                p.value_type,
                ParameterScope.SHARED if p.scope == SHARED else ParameterScope.NON_BASE,
                p.default,
                p.description,
            )
            for p in spec.parameters
        )
        contract = InputContract(
            base=BasePolicy.REQUIRED,
            min_non_base=spec.min_inputs,
            max_non_base=spec.max_inputs,
        )
        registry.register(
            LoraMethodForMergekit(
                MergeMethodSpec(
                    name=spec.name,
                    pretty_name=spec.pretty_name,
                    contract=contract,
                    optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_BASE_SINGLETON,
                    parameters=parameters,
                )
            )
        )


def check_method_name(name: str) -> None:
    """An unknown merge_method, with the nearest known names, before any work.

    mergekit itself resolves the name only after materializing every
    ``base+lora`` input, and then fails on something else entirely.
    """
    import difflib

    from mergekit.merge_methods import registry

    known = sorted(m.spec.name for m in registry.registered_methods())
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise TadaError(f"unknown merge_method {name!r}; {hint}Known: {', '.join(known)}")


def original_run_merge() -> Any:
    """mergekit's own ``run_merge`` (run into a merge's stage folder)."""
    import mergekit.merge  # noqa: F401  (installs the wrapper, keeping the original)

    return _ORIGINAL_RUN_MERGE


def install() -> None:
    """Patch mergekit (idempotent)."""
    global _INSTALLED, _ORIGINAL_RUN_MERGE
    if _INSTALLED:
        return
    import mergekit.card
    from mergekit.io.tasks import LoaderCache
    from mergekit.plan import MergePlanner

    # Called while ``mergekit.merge`` finishes importing: the parent package has
    # no ``merge`` attribute yet, sys.modules has the module.
    merge_module = sys.modules["mergekit.merge"]
    original_run_merge = _ORIGINAL_RUN_MERGE = merge_module.run_merge

    @functools.wraps(original_run_merge)
    def run_merge(merge_config, out_path, options, config_source=None):
        if not _is_ours(merge_config.merge_method):
            check_method_name(merge_config.merge_method)
            return original_run_merge(merge_config, out_path, options, config_source)
        run_ours(merge_config, options, out_path, config_source)

    original_architecture = merge_module.get_architecture_info

    @functools.wraps(original_architecture)
    def get_architecture_info(config, options):
        if current() is None:
            return original_architecture(config, options)
        from mergekit_tada.run.planners import base_architecture

        return base_architecture(config, options)

    merge_module.get_architecture_info = get_architecture_info

    original_get = LoaderCache.get

    @functools.wraps(original_get)
    def get(self, model):
        running = current()
        if running is not None and model.lora is not None:
            return running.placeholder_loader(model)
        return original_get(self, model)

    original_plan_tensor = MergePlanner.plan_tensor

    @functools.wraps(original_plan_tensor)
    def plan_tensor(self, weight, weights_in, models, cfg_reader):
        # For every method (the bug is mergekit's; the tuple subclass behaves
        # as the tuple it replaces everywhere else).
        weights_in = [
            w.model_copy(update={"aliases": _ConcatTuple(w.aliases)})
            if w.aliases
            else w
            for w in weights_in
        ]
        running = current()
        # mergekit skips an optional weight no input has by name, though the
        # base gives it through transformers' conversion (a MoE layer's
        # experts where layers differ): it would be left out
        if weight.optional and running is not None:
            if running.plan.base_gives(weight.name):
                weight = weight.model_copy(update={"optional": False})
        return original_plan_tensor(self, weight, weights_in, models, cfg_reader)

    original_is_hf = mergekit.card.is_hf

    @functools.wraps(original_is_hf)
    def is_hf(path: str) -> bool:
        if os.path.exists(path):  # every method: a local path is local
            return False
        return original_is_hf(path)

    original_generate_card = merge_module.generate_card

    @functools.wraps(original_generate_card)
    def generate_card(config, config_yaml, name=None):
        running = current()
        if running is not None:
            config = config.model_copy()
            ordered = list(running.plan.model_refs)
            object.__setattr__(config, "referenced_models", lambda: ordered)
        return original_generate_card(config, config_yaml, name=name)

    merge_module.run_merge = run_merge
    merge_module.generate_card = generate_card
    LoaderCache.get = get
    MergePlanner.plan_tensor = plan_tensor
    mergekit.card.is_hf = is_hf
    _INSTALLED = True
