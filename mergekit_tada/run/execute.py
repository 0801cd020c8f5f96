"""Execution: every module merged and streamed out, then the report and pictures.

An :class:`Execution` merges each planned LoRA target with the method
(``merge_module``: factors in, rank-r factors out), streams the factors to the
adapter writer, and returns ``W + B A`` where mergekit's executor asks for a
tensor (through ``integration``); the adapter-only path iterates over the
targets itself. Inside :meth:`writing` the body runs first (mergekit's
executor, or :meth:`merge_adapter_only`); then the adapter config, report,
plots and model-card section are written into the run's stage folder.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from mergekit_tada.adapter_writer import (
    StreamingAdapterWriter,
    lora_adapter_config,
    write_head_adapter,
)
from mergekit_tada.adapters import HEAD_TASK_MODELS
from mergekit_tada.errors import TadaError
from mergekit_tada.lowrank import Truncated, add_product, single_thread
from mergekit_tada.run.outputs import CARD
from mergekit_tada.run.plan import MergePlan, TensorPlan
from mergekit_tada.run.plots import draw, preload_plotting
from mergekit_tada.run.prepare import Prepared, module_job
from mergekit_tada.run.report import (
    MergeFacts,
    build_report,
    card_section,
    config_as_written,
    describe_inputs,
    dumps,
    truncation_warning,
    zero_update_warning,
)

LOG = logging.getLogger(__name__)


class Execution:
    """One merge's execution into a stage folder, from its plan and preparation."""

    def __init__(self, plan: MergePlan, prepared: Prepared) -> None:
        self.plan = plan
        self.method = plan.method
        self.context = prepared.context
        self.calibration = prepared.calibration
        self.scale = prepared.scale
        self.records: dict[str, dict] = {}
        self.output_rank = 0
        self._lock = threading.Lock()
        self.writer: StreamingAdapterWriter | None = None

    @contextlib.contextmanager
    def writing(self, target: Path, model_card: bool = False) -> Iterator[None]:
        """Run the body (the merge), then write adapter, card, report, plots.

        ``target`` is a run's stage folder (run/main.py): nothing here needs
        to be atomic on its own.
        """
        target = Path(target)
        target.mkdir(parents=True, exist_ok=True)
        self.writer = StreamingAdapterWriter(
            target / self.plan.adapter_out, torch.float32, self._adapter_layout()
        )
        if self.calibration is not None:  # probe gates: a plot at the end
            preload_plotting()
        try:
            yield
            config = self._adapter_config()
            self.writer.finalize(config)
        except BaseException:
            self.writer.abort()
            raise
        self._write_heads(target / self.plan.adapter_out, config)
        facts = self.facts()
        report = build_report(facts)
        for warning in (
            truncation_warning(report["summary"], self.output_rank),
            zero_update_warning(self.records),
        ):
            if warning:
                LOG.warning(warning)
        plots = draw(self.method.plots(self.records, self.context), target)
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
        plan, method, records = self.plan, self.method, self.records
        return MergeFacts(
            method=method.spec.name,
            report_name=method.report_name,
            config=config_as_written(plan.config, plan.source),
            output_rank=self.output_rank,
            adapter_out=plan.adapter_out,
            inputs=describe_inputs(
                str(plan.base.model), plan.base_path, plan.adapters, self.calibration
            ),
            records=records,
            summary=method.summary(dict(sorted(records.items()))),
            card_lines=method.card_lines(records, self.calibration, self.context),
            training=self._training(),
            head_adapters={
                label: f"{plan.adapter_out}/{folder}"
                for label, folder in plan.heads.items()
            },
        )

    def _training(self) -> dict | None:
        """What the method's prepare did, and the scale lambda: auto chose."""
        training = self.method.run_report(self.context)
        if self.scale is None:
            return training
        return {**(training or {}), "scale_search": self.scale}

    def merge_tensor(self, name: str, W: torch.Tensor) -> torch.Tensor:
        """mergekit's per-tensor call: ``W + B A`` for LoRA targets, else ``W``."""
        plan = self.plan.plans.get(name)
        if plan is None or not plan.is_lora_target:
            return W
        lora = self._merge_plan(plan, W.device)
        if self._transposed(plan):  # a Conv1D weight (in x out): W + (B A)^T
            merged = add_product(W, lora.A.T.contiguous(), lora.B.T.contiguous())
        else:
            merged = add_product(W, lora.B, lora.A)
        if not torch.isfinite(merged).all():
            raise TadaError(
                f"{plan.module}: W + dW overflows {W.dtype} (the merged update is "
                "finite, its sum with the base weight is not); set dtype: "
                "bfloat16 or float32, or lower the scale"
            )
        return merged

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

        targets = self.plan.targets
        dev = torch.device(device)
        workers = workers or (
            torch.get_num_threads() if dev.type == "cpu" else 1
        )  # before 1-thread
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            with (
                single_thread(dev),
                tqdm(
                    total=len(targets),
                    desc="Merging modules",
                    disable=self.plan.options.quiet,
                ) as bar,
            ):
                for _ in pool.map(lambda p: self._merge_plan(p, dev), targets):
                    bar.update()
        finally:
            # an error or Ctrl-C stops at the modules already running: the
            # queued ones are cancelled, not merged into an output never written
            pool.shutdown(cancel_futures=True)

    def _merge_plan(self, plan: TensorPlan, device: torch.device) -> Truncated:
        job = module_job(self.plan, plan, self.context, device)
        with single_thread(device):
            result = self.method.merge_module(job)
        if not (
            torch.isfinite(result.lora.B).all() and torch.isfinite(result.lora.A).all()
        ):
            # the inputs were checked finite: the settings took the maths out of
            # range (or a rule failed); never written as an adapter of NaN
            raise TadaError(
                f"{self.method.spec.name}: the merged update of {plan.module} is "
                "not finite (inf or NaN) with these settings; check the scale "
                "(lambda, alpha, weights) and the inputs"
            )
        with self._lock:
            self.writer.add(plan.module, result.lora.B, result.lora.A)
            self.records[plan.module] = result.record
        return result.lora

    # ------------------------------------------------------------------ outputs

    def _adapter_layout(self) -> dict[str, tuple[int, int, int]]:
        """module -> (output rank, out_features, in_features) of every LoRA target."""
        layout = {}
        for plan in self.plan.plans.values():
            sources = [(label, m) for label, m in plan.sources.items() if m]
            if sources:
                label, module = sources[0]
                spec = self.plan.adapters[label].modules[module]
                layout[plan.module] = (plan.rank, spec.out_features, spec.in_features)
        return layout

    def _write_heads(self, adapter_dir: Path, config: dict) -> None:
        """Beside the merged adapter, one per input with a head (a classifier's):
        the merged LoRA and that input's head, an adapter of its task model."""
        for label, folder in self.plan.heads.items():
            adapter = self.plan.adapters[label]
            write_head_adapter(
                adapter_dir,
                folder,
                adapter.prefix,
                adapter.head_tensors(),
                {
                    **config,
                    "task_type": adapter.config.get("task_type"),
                    "modules_to_save": adapter.config["modules_to_save"],
                },
            )

    def _transposed(self, plan: TensorPlan) -> bool:
        """The module's base weight is in x out (fan_in_fan_out; plan.py checks
        that every input agrees)."""
        label, module = next((t, m) for t, m in plan.sources.items() if m)
        return self.plan.adapters[label].modules[module].transposed

    def _adapter_config(self) -> dict:
        ranks = self.writer.ranks
        counts: dict[int, int] = {}
        for r in ranks.values():
            counts[r] = counts.get(r, 0) + 1
        rank = max(sorted(counts), key=lambda r: counts[r])
        self.output_rank = rank
        first = next(iter(self.plan.adapters.values())).config
        return lora_adapter_config(
            rank=rank,
            target_modules=self._target_modules(),
            rank_pattern={m: r for m, r in sorted(ranks.items()) if r != rank},
            base_model=str(self.plan.base.model),
            # the first input's (plan.py warns), but never a head's: the merged
            # adapter has none (each head's adapter lies beside it)
            task_type=None
            if first.get("task_type") in HEAD_TASK_MODELS
            else first.get("task_type"),
            fan_in_fan_out=any(self._transposed(p) for p in self.plan.targets),
        )

    def _target_modules(self) -> list[str]:
        """Short leaf names when they select exactly the merged modules, else full names."""
        written = set(self.writer.ranks)
        leaves = {m.rsplit(".", 1)[-1] for m in written}
        candidates = {
            p.module
            for p in self.plan.plans.values()
            if p.module.rsplit(".", 1)[-1] in leaves and p.out_name.endswith(".weight")
        }
        return sorted(leaves) if candidates == written else sorted(written)
