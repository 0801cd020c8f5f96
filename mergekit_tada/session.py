"""One merge run of a LoRA-space method, from YAML to outputs.

Data flow (:func:`run`; full model through ``mergekit-yaml``):

1. The output folder is locked (mergekit_tada/output.py).
2. ``MergeSession(config, options, source)`` validates everything before any
   output exists: parameter keys, LoRA inputs (config flags, tensor layout),
   the plan of every output tensor (``planning.py``: mergekit's own planner on
   a copy of the config, or for ``mergekit-tada --adapter-only`` mergekit's
   JSON definitions read as data) with its resolved parameters, shapes against
   the base's safetensors headers, and every factor for NaN/Inf. The run is
   refused if its outputs would replace one of its inputs.
   ``session.prepare()`` then runs (or reads from the cache) the calibration
   passes a method asks for.
3. ``with session.writing(stage):`` mergekit's executor runs into the stage
   folder; for each output tensor it calls our method's registered wrapper
   (``integration.register_all``), which lands in :meth:`merge_tensor`: read
   the module's factors, ``method.merge_module`` -> rank-r (B, A), stream
   them to the adapter writer, return ``W + B A`` to mergekit's writer. Then
   the adapter config, report, plot and model-card section are written into
   the stage.
4. The stage is committed: the complete outputs replace the earlier ones.

``merge_adapter_only`` runs step 3 without mergekit's executor or the base
weights (only their safetensors headers are read).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergekit_tada.adapters import (
    LoraAdapter,
    StreamingAdapterWriter,
    lora_adapter_config,
)
from mergekit_tada.errors import TadaError
from mergekit_tada.integration import activated, check_method_name
from mergekit_tada.loading import HeaderIndex, PlaceholderLoader
from mergekit_tada.lowrank import Truncated, add_product, single_thread
from mergekit_tada.methods import specs
from mergekit_tada.methods.specs import PASS_KEYS, ModuleJob, RunInputs
from mergekit_tada.output import CARD, MANIFEST_NAME, OutputFolder, check_folder_name
from mergekit_tada.planning import PlannedTensor, with_mergekit
from mergekit_tada.report import (
    MergeFacts,
    build_report,
    card_section,
    config_as_written,
    describe_inputs,
    dumps,
    preload_plotting,
    truncation_warning,
)

if TYPE_CHECKING:  # mergekit is imported only where its executor runs
    from mergekit.common import ModelReference
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.options import MergeOptions

LOG = logging.getLogger(__name__)
# A planner that may decline (None): then mergekit's own planner runs.
Planner = Callable[["MergeSession"], "list[PlannedTensor] | None"]


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


def run(
    config: MergeConfiguration,
    options: MergeOptions,
    out_path: str | os.PathLike,
    source: str | None = None,
    mergekit_run: Callable[[MergeConfiguration, str, MergeOptions, str | None], None]
    | None = None,
    extra_files: dict[str, str] | None = None,
    planner: Planner | None = None,
) -> None:
    """One whole merge into ``out_path``: lock, validate, merge into a stage, commit.

    ``mergekit_run``: mergekit's own ``run_merge`` for a full-model merge
    (called with the stage folder as its output); None merges the adapter only.
    ``extra_files``: name -> text, written into the stage (committed with the rest).
    ``planner``: see :class:`MergeSession`.
    """
    folder = OutputFolder(out_path)
    with folder.locked():
        session = MergeSession(config, options, source, planner)
        folder.guard_inputs(
            session.input_paths(), [*session.output_names(), *(extra_files or {})]
        )
        session.prepare()
        target = folder.new_stage()
        if mergekit_run is None:
            with session.writing(target):
                session.merge_adapter_only(device=options.device or "cpu")
        else:
            with session.writing(target, model_card=options.write_model_card):
                mergekit_run(config, str(target), options, source)
        for name, text in (extra_files or {}).items():
            (target / check_folder_name(name, "output file name")).write_text(
                text, encoding="utf-8"
            )
        folder.commit(target)


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


class MergeSession:
    def __init__(
        self,
        config: MergeConfiguration | Any,
        options: MergeOptions | Any,
        source: str | None = None,
        planner: Planner | None = None,
    ) -> None:
        """Validate the merge; nothing is read beyond headers and factors.

        ``config``/``options``: mergekit's, or for the adapter-only path their
        plain stand-ins (:mod:`mergekit_tada.config`) with ``planner``
        :func:`~mergekit_tada.planning.from_definitions`.
        """
        self.config = config
        self.options = options
        self.source = source
        self.planner = planner
        method = specs.get(config.merge_method)
        if method is None:
            check_method_name(config.merge_method)
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
        self.default_rank = max(a.max_rank for a in self.adapters.values())
        self.plans = self._plan()
        self._validate_plans()
        adapter_out = {p.params["adapter_out"] for p in self.plans.values()}
        if len(adapter_out) != 1:
            raise TadaError(f"adapter_out must be one folder name, got {adapter_out}")
        self.adapter_out = check_folder_name(adapter_out.pop())
        for adapter in self.adapters.values():
            adapter.check_all_finite()
        self.calibration_info: dict | None = None
        self.context = None
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.writer: StreamingAdapterWriter | None = None

    def prepare(self) -> None:
        """Run (or read from the cache) what the method needs before merging."""
        targets = [p for p in self.plans.values() if p.is_lora_target]
        stats = self._calibrate(targets)
        run = RunInputs(
            base_path=self.base_path,
            base_files=self._base_files(),
            adapters=self.adapters,
            device=self.options.device or "cpu",
            quiet=self.options.quiet,
        )
        self.context = self.method.prepare(stats, targets, run)

    def _base_files(self) -> list[str]:
        """The base's weight files and config.json: what a cache key covers."""
        files = sorted(set(self.headers.index.tensor_paths.values()))
        return [os.path.join(self.base_path, f) for f in [*files, "config.json"]]

    def input_paths(self) -> dict[str, str]:
        """What this merge reads: described -> path (guarded against the output)."""
        paths = {f"base model {self.base}": self.base_path}
        for label, adapter in self.adapters.items():
            paths[f"adapter of {label}"] = adapter.path
        targets = [p for p in self.plans.values() if p.is_lora_target]
        paths.update(self.method.data_paths(targets))
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
                raise TadaError(
                    f"{name}: {', '.join(misplaced)} given to the non-LoRA model "
                    f"{ref} in {where}; set it under each LoRA input's parameters"
                )
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
        planned = self.planner(self) if self.planner else None
        if planned is None:
            with activated(self):
                planned = with_mergekit(self)
        plans = {}
        capped: list[tuple[str, int, int]] = []
        for tensor in planned:
            sources = {}
            for label, names in tensor.input_names.items():
                modules = self.adapters[label].modules
                candidates = [
                    n.removesuffix(".weight") for n in names if n.endswith(".weight")
                ]
                sources[label] = next((m for m in candidates if m in modules), None)
            plans[tensor.name] = TensorPlan(
                out_name=tensor.name,
                module=tensor.name.removesuffix(".weight"),
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
        targets = [p for p in self.plans.values() if p.is_lora_target]
        for plan in targets:
            self.method.check(plan.out_name, plan.params, plan.inputs)
            base_name = self.headers.resolve(plan.base_names)
            base_shape = self.headers.meta(base_name)[0] if base_name else None
            for label, module in plan.sources.items():
                if module is None:
                    continue
                used.add((label, module))
                spec = self.adapters[label].modules[module]
                if base_shape != [spec.out_features, spec.in_features]:
                    raise TadaError(
                        f"{self.adapters[label].weights_path}: module {module} updates a "
                        f"{spec.out_features}x{spec.in_features} weight, but "
                        f"{plan.out_name} in {self.base_path} is {base_shape}: "
                        "was the adapter trained on a different base model?"
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

    def _calibrate(self, targets: list[TensorPlan]):
        """Run (or fetch from the cache) the calibration pass if the method asks."""
        wanted = {
            json.dumps(c, sort_keys=True)
            for p in targets
            if (c := self.method.calibration(p.params)) is not None
        }
        if not wanted:
            return None
        if len(wanted) > 1:
            keys = ", ".join(json.loads(next(iter(wanted))))
            raise TadaError(
                f"calibration settings ({keys}) must be the same for every "
                "tensor: give them as plain global parameters"
            )
        from mergekit_tada.probe.cache import StatsCache
        from mergekit_tada.probe.calibration import (
            batches_digest,
            check_statistics,
            make_batches,
            read_prompts,
            run_calibration,
            token_count,
            tokenizer_for,
        )

        settings = json.loads(wanted.pop())
        tokenizer = tokenizer_for(self.base_path)
        device = torch.device(self.options.device or "cpu")
        cache = StatsCache(settings["cache_dir"])
        # what every pass depends on besides its own prompts (gate-only
        # settings would only miss)
        common = {
            "adapters": {label: a.hashes for label, a in self.adapters.items()},
            "settings": {k: settings[k] for k in PASS_KEYS},
            "base": cache.file_hashes(self._base_files()),
            "device": device.type,
        }
        stats, infos = {}, []
        for prompts, path in settings["passes"].items():
            texts = read_prompts(path, settings["calibration_samples"])
            batches = make_batches(
                tokenizer,
                texts,
                settings["calibration_max_length"],
                settings["calibration_batch_size"],
            )
            key = cache.key(
                common
                | {
                    "texts": hashlib.sha256(json.dumps(texts).encode()).hexdigest(),
                    "tokens": batches_digest(batches),
                }
            )
            found = cache.load_stats(key)
            hit = found is not None
            if not hit:
                found = run_calibration(
                    self.base_path,
                    batches,
                    self.adapters,
                    device=device,
                    quiet=self.options.quiet,
                )
                check_statistics(found, self.base_path)
                cache.store_stats(key, found)
                LOG.info("calibration statistics computed (cache key %s)", key[:12])
            else:  # said once: the calibration pass was skipped, and why
                LOG.warning(
                    "calibration statistics from cache entry %s (no calibration pass)",
                    cache.entry_path(key),
                )
            stats[prompts] = found
            infos.append(
                {
                    "path": path,
                    "prompts": len(texts),
                    "tokens": token_count(batches),
                    "max_length": settings["calibration_max_length"],
                    "cache_key": key,
                    "cache_hit": hit,
                }
            )
        self.calibration_info = infos[0]
        if len(infos) > 1:
            self.calibration_info["task_prompts"] = infos[1]
        return stats

    # ------------------------------------------------------------------ running

    def placeholder_loader(self, ref: ModelReference) -> PlaceholderLoader:
        from mergekit.common import dtype_from_name

        return PlaceholderLoader(self.headers, dtype_from_name(self.config.dtype))

    @contextlib.contextmanager
    def writing(self, target: Path, model_card: bool = False) -> Iterator[None]:
        """Run the body with this session active, then write adapter, card, report.

        ``target`` is a run's stage folder (see :func:`run`): nothing here needs
        to be atomic on its own.
        """
        target = Path(target)
        target.mkdir(parents=True, exist_ok=True)
        self.writer = StreamingAdapterWriter(
            target / self.adapter_out, torch.float32, self._adapter_layout()
        )
        if self.calibration_info is not None:  # probe gates: a plot at the end
            preload_plotting()
        try:
            with activated(self):
                yield
            self.writer.finalize(self._adapter_config())
        except BaseException:
            self.writer.abort()
            raise
        facts = self.facts()
        report = build_report(facts)
        if warning := truncation_warning(report["summary"], self.output_rank):
            LOG.warning(warning)
        plots = self.method.write_plots(self.records, self.context, target)
        report.update(plots)
        if model_card:
            readme = target / CARD
            text = readme.read_text(encoding="utf-8") if readme.exists() else ""
            readme.write_text(
                text.rstrip("\n") + "\n\n" + card_section(facts, report, plots),
                encoding="utf-8",
            )
        (target / self.method.report_name).write_text(dumps(report), encoding="utf-8")

    def facts(self) -> MergeFacts:
        """This merge as plain data for the report and the model card."""
        return MergeFacts(
            method=self.method,
            config=config_as_written(self.config, self.source),
            output_rank=self.output_rank,
            adapter_out=self.adapter_out,
            inputs=describe_inputs(
                str(self.base.model),
                self.base_path,
                self.adapters,
                self.calibration_info,
            ),
            records=self.records,
            calibration=self.calibration_info,
            context=self.context,
        )

    def merge_tensor(self, group: TensorGroup) -> torch.Tensor:
        """mergekit's per-tensor call: ``W + B A`` for LoRA targets, else ``W``."""
        W = group.base.tensor
        plan = self.plans.get(group.metadata.name)
        if plan is None or not plan.is_lora_target:
            return W
        lora = self._merge_plan(plan, W.device)
        return add_product(W, lora.B, lora.A)

    def merge_adapter_only(
        self, device: str = "cpu", workers: int | None = None
    ) -> None:
        """Merge every LoRA'd module without mergekit's executor or base weights.

        On the CPU, modules run on ``workers`` threads (default: torch's thread
        count), each doing single-threaded small-matrix maths: torch releases
        the GIL, and one thread per core beats one multi-threaded op at a time
        for r x r work. Results do not depend on the order modules finish in.
        """
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        targets = [p for p in self.plans.values() if p.is_lora_target]
        dev = torch.device(device)
        workers = workers or (
            torch.get_num_threads() if dev.type == "cpu" else 1
        )  # before 1-thread
        with (
            single_thread(dev),
            ThreadPoolExecutor(max_workers=workers) as pool,
            tqdm(
                total=len(targets), desc="Merging modules", disable=self.options.quiet
            ) as bar,
        ):
            for _ in pool.map(lambda p: self._merge_plan(p, dev), targets):
                bar.update()

    def _merge_plan(self, plan: TensorPlan, device: torch.device) -> Truncated:
        updates = {
            label: self.adapters[label].factors(module, device) if module else None
            for label, module in plan.sources.items()
        }
        job = ModuleJob(
            module=plan.module,
            updates=updates,
            params=plan.params,
            inputs=plan.inputs,
            sources=plan.sources,
            rank=plan.rank,
            seed=self.options.random_seed or 0,
            context=self.context,
        )
        with single_thread(device):
            result = self.method.merge_module(job)
        with self._lock:
            self.writer.add(plan.module, result.lora.B, result.lora.A)
            self.records[plan.module] = result.record
        return result.lora

    # ------------------------------------------------------------------ outputs

    def _adapter_layout(self) -> dict[str, tuple[int, int, int]]:
        """module -> (output rank, out_features, in_features) of every LoRA target."""
        layout = {}
        for plan in self.plans.values():
            sources = [(label, m) for label, m in plan.sources.items() if m]
            if sources:
                label, module = sources[0]
                spec = self.adapters[label].modules[module]
                layout[plan.module] = (plan.rank, spec.out_features, spec.in_features)
        return layout

    def _adapter_config(self) -> dict:
        ranks = self.writer.ranks
        counts: dict[int, int] = {}
        for r in ranks.values():
            counts[r] = counts.get(r, 0) + 1
        rank = max(sorted(counts), key=lambda r: counts[r])
        self.output_rank = rank
        first = next(iter(self.adapters.values())).config
        return lora_adapter_config(
            rank=rank,
            target_modules=self._target_modules(),
            rank_pattern={m: r for m, r in sorted(ranks.items()) if r != rank},
            base_model=str(self.base.model),
            task_type=first.get("task_type"),
        )

    def _target_modules(self) -> list[str]:
        """Short leaf names when they select exactly the merged modules, else full names."""
        written = set(self.writer.ranks)
        leaves = {m.rsplit(".", 1)[-1] for m in written}
        candidates = {
            p.module
            for p in self.plans.values()
            if p.module.rsplit(".", 1)[-1] in leaves and p.out_name.endswith(".weight")
        }
        return sorted(leaves) if candidates == written else sorted(written)
