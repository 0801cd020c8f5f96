"""Our merge methods: each one's parameters, checks and per-module merge.

No mergekit here (the adapter-only path runs without it). mergekit's registry
holds a wrapper per method (``integration.register_all``) whose per-tensor call
lands in the active :class:`~mergekit_tada.session.MergeSession`, which reads
the LoRA factors, asks the method for the merged rank-r factors of the module
(``merge_module``) and returns ``W + B A``.

``merge_module`` is shared: optional Pico calibration of the inputs, the
method's own ``combine`` (the merged update as a thin SVD), Pico's magnitude
restoration, truncation to the output rank. Methods differ only in
``combine``, their parameters and their checks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_tada.cache import DEFAULT_CACHE_DIR
from mergekit_tada.errors import TadaError
from mergekit_tada.lowrank import Factored, ThinSVD, Truncated, svd, truncate
from mergekit_tada.methods import pico, rules, tara
from mergekit_tada.methods.params import NON_BASE, SHARED, MethodSpec, Param
from mergekit_tada.methods.tada import tada_combine
from mergekit_tada.probe.gates import (
    GATE_GRANULARITIES,
    GATE_NORMALIZATIONS,
    PROBE_BALANCES,
    PROBE_CENTRINGS,
    PROBE_STATISTICS,
    ProbeTable,
    gates_from_delta,
)

LOG = logging.getLogger(__name__)

# Parameters every LoRA-space method takes.
COMMON_PARAMETERS = (
    Param("rank", int | None, SHARED, None, "output LoRA rank"),
    Param("adapter_out", str, SHARED, "adapter", "adapter sub-folder"),
    Param("pico", bool, SHARED, False, "Pico B-space calibration first"),
)
ROLES = ("task", "domain")
TARA_PLOT = "tara_loss.png"
GATE_MODES = ("probe", "uniform", "fixed", "learned")
LEARNED_GRANULARITIES = ("module", "layer", "global")
# Settings read once per merge (the calibration data and pass, and how probes
# become deltas), so they must not vary per tensor; the gate formula's may.
CALIBRATION_KEYS = (
    "gate_granularity",
    "probe_statistic",
    "probe_centring",
    "probe_prompts",
    "probe_balance",
    "calibration",
    "task_calibration",
    "calibration_samples",
    "calibration_max_length",
    "calibration_batch_size",
    "cache_dir",
)
# What a calibration pass's statistics depend on besides data, adapters, base
PASS_KEYS = ("calibration_samples", "calibration_max_length", "calibration_batch_size")
# Which prompts the probe reads: prompt set -> the parameter naming its file
PROBE_PASSES = {
    "domain": {"domain": "calibration"},
    "task": {"task": "task_calibration"},
    "contrast": {"domain": "calibration", "task": "task_calibration"},
}


def same_for_every_tensor(values: list, message: str) -> Any:
    """The one value that per-tensor resolution gave every tensor, else an error.

    Settings read once per merge (data, a training) must not vary per tensor
    (gradients, filters).
    """
    if any(v != values[0] for v in values):
        raise TadaError(message)
    return values[0]


@dataclass(frozen=True)
class ModuleJob:
    """Everything a method needs to merge one module.

    ``updates``, ``inputs`` and ``sources`` are keyed by input label (the model
    reference as written in the config), in config order; a module an input
    lacks has update and source ``None``. ``context`` is what the method's
    ``prepare`` returned (e.g. TaDA's probe table).
    """

    module: str
    updates: dict[str, Factored | None]
    params: dict
    inputs: dict[str, dict]
    sources: dict[str, str | None]
    rank: int
    seed: int = 0
    context: Any = None


@dataclass(frozen=True)
class RunInputs:
    """What a method may read before merging, handed over by the session."""

    base_path: str
    base_files: list[str]  # the base's weight files and config.json (cache keys)
    adapters: dict[str, Any]  # input label -> LoraAdapter, in config order
    device: str
    quiet: bool


@dataclass(frozen=True)
class ModuleMerge:
    lora: Truncated
    record: dict


class LoraMergeMethod:
    """A merge done on LoRA factors; mergekit sees only ``W -> W + dW``
    (through the wrapper ``integration.register_all`` puts in its registry)."""

    spec: MethodSpec
    report_name = "merge_report.json"
    plot_files: tuple[str, ...] = ()  # what write_plots may write

    def check(self, tensor: str, params: dict, inputs: dict[str, dict]) -> None:
        """Validate one tensor's resolved parameters; raise TadaError naming it.

        Runs on the values mergekit resolved for this tensor (after gradients
        and filters), so a gradient that reaches NaN is caught too.
        """
        name = self.spec.name
        for where, block in (("parameters", params), *inputs.items()):
            for key, value in block.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise TadaError(
                        f"{name}: {key} must be a finite number (got {value}) "
                        f"in {where} for {tensor}"
                    )
        rank = params.get("rank")
        if rank is not None and rank <= 0:
            raise TadaError(
                f"rank must be a positive integer (got {rank}) for {tensor}"
            )

    def check_inputs(self, refs: list) -> None:
        """The number of LoRA inputs against the method's contract."""
        low, high = self.spec.min_inputs, self.spec.max_inputs
        if len(refs) < low or (high is not None and len(refs) > high):
            want = f"exactly {low}" if low == high else f"at least {low}"
            raise TadaError(
                f"{self.spec.name} takes {want} LoRA inputs (got {len(refs)}: "
                f"{', '.join(map(str, refs))})"
            )

    def calibration(self, params: dict) -> dict | None:
        """Calibration settings if this tensor's parameters ask for a probe pass."""
        return None

    def data_paths(self, plans: list) -> dict[str, str]:
        """Data files the merge reads: described -> path (guarded against the output)."""
        paths = {}
        for plan in plans:
            settings = self.calibration(plan.params)
            if settings and settings.get("calibration"):
                paths["calibration data"] = settings["calibration"]
        return paths

    def prepare(self, stats: Any, plans: list, run: RunInputs) -> Any:
        """Method-wide context before merging: from calibration statistics (TaDA)
        or learned from data (TARA); None where the method needs none."""
        return None

    def run_report(self, context: Any) -> dict | None:
        """A top-level report section about what ``prepare`` did (None: none)."""
        return None

    def output_rank(self, params: dict, default: int, source_ranks: list[int]) -> int:
        return params["rank"] or default

    def rank_limit(self, source_ranks: list[int], shape: tuple[int, int]) -> int:
        """The largest rank the merged update of a module can have."""
        return min(sum(source_ranks), *shape)

    def combine(
        self, job: ModuleJob, updates: dict[str, Factored | None]
    ) -> tuple[ThinSVD, dict]:
        """The merged update of one module (thin SVD, before truncation) and a record."""
        raise NotImplementedError

    # --------------------------------------------------- what the outputs say

    def summary(self, records: dict[str, dict]) -> dict:
        """The method's own totals for the report's summary."""
        pico = [r["pico_gamma"] for r in records.values() if "pico_gamma" in r]
        return {"pico_mean_gamma": sum(pico) / len(pico)} if pico else {}

    def card_lines(
        self, records: dict[str, dict], calibration: dict | None, context: Any = None
    ) -> list:
        """Bullet lines for the model card: what this method did."""
        lines = []
        first = next(iter(records.values()), {})
        for key in ("weights", "densities"):
            if key in first:
                lines.append(f"{key} per input (config order): {first[key]}")
        if "pico_sharing" in first:
            lines.append("Pico B-space calibration before merging, magnitude restored")
        return lines

    def write_plots(
        self, records: dict[str, dict], context: Any, folder: Path
    ) -> dict[str, str]:
        """Pictures of the merge written into folder: report key -> file name."""
        return {}

    def merge_module(self, job: ModuleJob) -> ModuleMerge:
        """Merged rank-r factors of one module from the inputs' factored updates."""
        record: dict = {}
        updates = job.updates
        if job.params["pico"]:
            calibrated, sharing = pico.calibrate(list(updates.values()))
            updates = dict(zip(updates, calibrated, strict=True))
            record["pico_sharing"] = [float(f"{x:.6g}") for x in sharing]
        merged, extra = self.combine(job, updates)
        record.update(extra)
        if job.params["pico"]:
            merged, gamma = pico.restore_magnitude(merged, list(job.updates.values()))
            record["pico_gamma"] = gamma
        lora = truncate(merged, job.rank)
        record["rank"] = job.rank
        record["truncation_energy"] = lora.truncation_energy
        record["rank_99"] = lora.rank_99
        return ModuleMerge(lora, record)


class TadaMethod(LoraMergeMethod):
    report_name = "tada_report.json"  # the name readers of earlier versions know
    plot_files = ("gates.png",)
    spec = MethodSpec(
        name="tada",
        pretty_name="TaDA (task-domain LoRA merging)",
        max_inputs=2,
        parameters=(
            Param("role", str | None, NON_BASE, None, "task | domain"),
            *COMMON_PARAMETERS,
            Param("gates", str, SHARED, "probe", "probe | uniform | fixed"),
            Param("gate_granularity", str, SHARED, "module", "module | layer"),
            Param("gate_normalization", str, SHARED, "sum", "sum | max"),
            Param("probe_statistic", str, SHARED, "normalized", "normalized | raw"),
            Param("probe_centring", str, SHARED, "global", "global | type"),
            Param("probe_prompts", str, SHARED, "domain", "domain | task | contrast"),
            Param("probe_balance", str, SHARED, "none", "none | equalise"),
            Param("task_weight", float | None, SHARED, None),
            Param("domain_weight", float | None, SHARED, None),
            Param("conflict_elimination", bool, SHARED, True),
            Param("conflict_threshold", float, SHARED, 0.3, "kappa"),
            Param("calibration", str | None, SHARED, None, "prompts file"),
            Param("calibration_samples", int, SHARED, 32),
            Param("calibration_max_length", int, SHARED, 256),
            Param("calibration_batch_size", int, SHARED, 8),
            Param("tau", float, SHARED, 1.0),
            Param("gate_min", float, SHARED, 0.1),
            Param("gate_max", float, SHARED, 0.9),
            # lambda = 2: uniform gates are task arithmetic 1/1 (docs/quality.md)
            Param("scale", float, SHARED, 2.0, "global lambda on both gates"),
            Param("cache_dir", str, SHARED, DEFAULT_CACHE_DIR),
            # gates: learned (TARA's objective, one loop: mergekit_tada/training.py)
            Param("task_calibration", str | None, SHARED, None),
            Param("learned_steps", int, SHARED, 200),
            Param("learned_lr", float, SHARED, 0.02),
            Param("training_mode", str, SHARED, "auto"),
        ),
    )

    def check_inputs(self, refs: list) -> None:
        if len(refs) != 2:
            raise TadaError(
                "tada takes exactly two LoRA inputs, one with parameters: "
                "{role: task} and one with {role: domain} (got "
                f"{len(refs)}: {', '.join(map(str, refs))}); to merge more adapters "
                "use lora_ties, lora_tsv_m or tara"
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
        granularities = (
            LEARNED_GRANULARITIES
            if params["gates"] == "learned"
            else GATE_GRANULARITIES
        )
        for key, allowed in (
            ("gates", GATE_MODES),
            ("gate_granularity", granularities),
            ("gate_normalization", GATE_NORMALIZATIONS),
            ("probe_statistic", PROBE_STATISTICS),
            ("probe_centring", PROBE_CENTRINGS),
            ("probe_prompts", tuple(PROBE_PASSES)),
            ("probe_balance", PROBE_BALANCES),
            ("training_mode", tara.TRAINING_MODES),
        ):
            if params[key] not in allowed:
                raise TadaError(
                    f"tada: {key} must be one of {', '.join(allowed)} "
                    f"(got {params[key]!r}) for {tensor}"
                )
        if params["gates"] == "learned" and not (
            params["calibration"] and params["task_calibration"]
        ):
            raise TadaError(
                "tada: gates: learned needs calibration (domain prompts) and "
                f"task_calibration (task-style prompts), both unlabeled (for {tensor})"
            )
        if params["learned_steps"] < 1 or not params["learned_lr"] > 0:
            raise TadaError(
                f"tada: learned_steps must be >= 1 and learned_lr > 0 for {tensor}"
            )
        if (
            params["gates"] == "probe"
            and params["probe_prompts"] != "task"
            and not params["calibration"]
        ):
            raise TadaError(
                "tada: gates: probe (the default) needs calibration: a .txt (one "
                "prompt per line), .jsonl (a 'text' field) or saved dataset of "
                f"domain prompts; or set gates: uniform | fixed (for {tensor})"
            )
        if (
            params["gates"] == "probe"
            and params["probe_prompts"] != "domain"
            and not params["task_calibration"]
        ):
            raise TadaError(
                f"tada: probe_prompts: {params['probe_prompts']} needs "
                f"task_calibration (unlabeled task-style prompts) (for {tensor})"
            )
        limits = (
            ("conflict_threshold", 0, None),
            ("task_weight", 0, None),
            ("domain_weight", 0, None),
            ("gate_min", 0, 1),
            ("gate_max", 0, 1),
            ("scale", 0, None),
            ("calibration_samples", 1, None),
            ("calibration_max_length", 1, None),
            ("calibration_batch_size", 1, None),
        )
        for key, low, high in limits:
            value = params[key]
            if value is not None and (
                value < low or (high is not None and value > high)
            ):
                bound = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise TadaError(
                    f"tada: {key} must be {bound} (got {value}) for {tensor}"
                )
        if params["gate_min"] > params["gate_max"]:
            raise TadaError(f"tada: gate_min > gate_max for {tensor}")
        if params["tau"] <= 0:
            raise TadaError(f"tada: tau must be > 0 (got {params['tau']}) for {tensor}")

    def calibration(self, params: dict) -> dict | None:
        if params["gates"] != "probe":
            return None
        passes = {
            prompts: params[key]
            for prompts, key in PROBE_PASSES[params["probe_prompts"]].items()
        }
        return {key: params[key] for key in CALIBRATION_KEYS} | {"passes": passes}

    LEARNING_KEYS = (
        "calibration",
        "task_calibration",
        "calibration_samples",
        "calibration_max_length",
        "calibration_batch_size",
        "gate_granularity",
        "training_mode",
        "cache_dir",
    )

    def data_paths(self, plans: list) -> dict[str, str]:
        paths = super().data_paths(plans)
        for plan in plans:
            if plan.params.get("task_calibration"):
                paths["task calibration data"] = plan.params["task_calibration"]
            if plan.params["gates"] == "learned" and plan.params.get("calibration"):
                paths["calibration data"] = plan.params["calibration"]
        return paths

    def prepare(self, stats: Any, plans: list, run: RunInputs) -> Any:
        if any(p.params["gates"] == "learned" for p in plans):
            return self._learn(plans, run)
        if stats is None:
            return None
        roles = {label: p["role"] for label, p in plans[0].inputs.items()}
        # prompt set -> role -> module -> statistics
        by_role = {
            prompts: {role: found[label] for label, role in roles.items()}
            for prompts, found in stats.items()
        }
        first, *contrast = by_role.values()
        table = ProbeTable.from_stats(
            first["task"],
            first["domain"],
            statistic=plans[0].params["probe_statistic"],
            granularity=plans[0].params["gate_granularity"],
            centring=plans[0].params["probe_centring"],
            against=(contrast[0]["task"], contrast[0]["domain"]) if contrast else None,
        )
        if table.undefined:
            shared = len(table.undefined) + len(table.deltas)
            LOG.warning(
                "tada: the probe is undefined (a zero update, or inputs that "
                "vanished or overflowed) for %d of %d modules both adapters touch; "
                "they get neutral gates: %s",
                len(table.undefined),
                shared,
                ", ".join(table.undefined[:8])
                + (" ..." if len(table.undefined) > 8 else ""),
            )
        return table

    def _learn(self, plans: list, run: RunInputs) -> Any:
        """Gates learned with TARA's objective (mergekit_tada/training.py)."""
        from mergekit_tada.training import learn_gates

        params = plans[0].params
        keys = (*self.LEARNING_KEYS, "learned_steps", "learned_lr")
        settings = same_for_every_tensor(
            [{k: p.params[k] for k in keys} for p in plans],
            "tada: gates: learned takes its data and training settings as plain "
            "global values (the same for every tensor)",
        )
        steps, lr = settings.pop("learned_steps"), settings.pop("learned_lr")
        uniform = (1.0 if params["gate_normalization"] == "max" else 0.5) * params[
            "scale"
        ]
        roles = {label: p["role"] for label, p in plans[0].inputs.items()}
        return learn_gates(
            run,
            plans,
            settings
            | {
                "steps": steps,
                "lr": lr,
                "objective": "stch",
                "alpha": 1.0,
            },
            roles,
            uniform,
        )

    def run_report(self, context: Any) -> dict | None:
        from mergekit_tada.training import LearnedGates

        if not isinstance(context, LearnedGates):
            return None
        result = context.result
        return {
            "gates": "learned",
            "granularity": context.granularity,
            "inputs": context.labels,
            "data": context.data,
            "settings": {k: v for k, v in context.settings.items() if k != "cache_dir"},
            "cache_key": context.cache["key"],
            "cache_hit": context.cache["hit"],
            "z": result.z,
            "h_before": result.h_before,
            "h_after": result.h_after,
            "learned": {k: v.tolist() for k, v in sorted(result.params.items())},
            "loss_history": result.history,
        }

    def summary(self, records: dict[str, dict]) -> dict:
        balance = next((r["balance"] for r in records.values() if "balance" in r), None)
        return {
            **super().summary(records),
            **({"probe_balance": balance} if balance else {}),
            "dropped_task": sum(
                len(m.get("dropped_task", [])) for m in records.values()
            ),
            "dropped_domain": sum(
                len(m.get("dropped_domain", [])) for m in records.values()
            ),
        }

    def card_lines(
        self, records: dict[str, dict], calibration: dict | None, context: Any = None
    ) -> list:
        from mergekit_tada.report import depth_summary
        from mergekit_tada.training import LearnedGates

        lines = []
        if isinstance(context, LearnedGates):
            result = context.result
            lines.append(
                f"gates learned ({context.granularity}) with TARA's objective from "
                f"{context.data['task']['rows']} task prompts and "
                f"{context.data['domain']['rows']} domain prompts; entropy gaps "
                "H - z (task, domain): "
                + ", ".join(
                    f"{b - z:+.4f} -> {a - z:+.4f}"
                    for z, b, a in zip(
                        result.z, result.h_before, result.h_after, strict=True
                    )
                )
            )
        elif calibration:
            lines.append(
                f"gates from the calibration probe over {calibration['prompts']} "
                f"prompts ({calibration['tokens']} tokens) of `{calibration['path']}`"
            )
            if task := calibration.get("task_prompts"):
                lines.append(
                    f"contrasted with the probe over {task['prompts']} task-style "
                    f"prompts ({task['tokens']} tokens) of `{task['path']}`"
                )
        else:
            modes = sorted({r.get("gate_mode", "?") for r in records.values()})
            lines.append(f"gates: {', '.join(modes)}")
        if depth := depth_summary(records):
            lines.append(depth)
        summary = self.summary(records)
        if balance := summary.get("probe_balance"):
            lines.append(
                "global balance from the probe (relative output perturbations "
                f"equalised): task gates x{balance[0]:.3f}, domain gates "
                f"x{balance[1]:.3f}"
            )
        lines.append(
            f"conflicting directions dropped: {summary['dropped_task']} task, "
            f"{summary['dropped_domain']} domain"
        )
        return lines

    def write_plots(
        self, records: dict[str, dict], context: Any, folder: Path
    ) -> dict[str, str]:
        from mergekit_tada.report import GATES_PLOT, plot_gates

        return (
            {"gates_plot": GATES_PLOT}
            if plot_gates(records, folder / GATES_PLOT)
            else {}
        )

    @staticmethod
    def gates(job: ModuleJob) -> tuple[float, float, dict]:
        """(w_T, w_D, extra report fields) for one module."""
        params = job.params
        mode = params["gates"]
        extra: dict = {"gate_mode": mode}
        # the uniform gate, also what `fixed` uses where a weight is unset
        uniform = (1.0 if params["gate_normalization"] == "max" else 0.5) * params[
            "scale"
        ]
        if mode == "uniform":
            return uniform, uniform, extra
        w_task, w_domain = params["task_weight"], params["domain_weight"]
        if mode == "learned":
            module = next(m for m in job.sources.values() if m)
            l_task, l_domain = job.context.gates[module]
            if w_task is not None or w_domain is not None:
                extra["gate_override"] = True
            return (
                l_task if w_task is None else float(w_task),
                l_domain if w_domain is None else float(w_domain),
                extra,
            )
        if mode == "probe":
            probes: ProbeTable = job.context
            role_source = {
                job.inputs[label]["role"]: m for label, m in job.sources.items()
            }
            task_m, domain_m = role_source["task"], role_source["domain"]
            delta = probes.delta(task_m, domain_m)
            p_task, p_domain = gates_from_delta(
                delta,
                probes.median_delta,
                tau=params["tau"],
                gate_min=params["gate_min"],
                gate_max=params["gate_max"],
                scale=params["scale"],
                normalization=params["gate_normalization"],
            )
            extra.update(
                probe_task=probes.task.get(task_m) if task_m else None,
                probe_domain=probes.domain.get(domain_m) if domain_m else None,
                delta=delta,
                perturbation_task=probes.perturbations.get("task", {}).get(task_m),
                perturbation_domain=probes.perturbations.get("domain", {}).get(
                    domain_m
                ),
            )
            if params["probe_balance"] == "equalise":
                a, b = probes.balance
                p_task, p_domain = p_task * a, p_domain * b
                extra["balance"] = [a, b]
            # user weights (scalars, gradients, filters) override per tensor
            if w_task is not None or w_domain is not None:
                extra["gate_override"] = True
            w_task = p_task if w_task is None else w_task
            w_domain = p_domain if w_domain is None else w_domain
            return float(w_task), float(w_domain), extra
        return (
            uniform if w_task is None else float(w_task),
            uniform if w_domain is None else float(w_domain),
            extra,
        )

    def combine(
        self, job: ModuleJob, updates: dict[str, Factored | None]
    ) -> tuple[ThinSVD, dict]:
        by_role = {
            job.inputs[label]["role"]: update for label, update in updates.items()
        }
        task_gate, domain_gate, extra = self.gates(job)
        merged, record = tada_combine(
            by_role["task"],
            by_role["domain"],
            task_gate=task_gate,
            domain_gate=domain_gate,
            conflict_elimination=job.params["conflict_elimination"],
            kappa=job.params["conflict_threshold"],
        )
        record.update(extra)
        return merged, record


# --------------------------------------------------------------------- the family

WEIGHT = Param("weight", float, NON_BASE, 1.0, "per-adapter weight")
DENSITY = Param("density", float, NON_BASE, 1.0, "fraction of entries kept")


def _gta_parameters(normalize: bool, rescale: bool) -> tuple[Param, ...]:
    """mergekit's generalized-task-arithmetic parameters, with its defaults."""
    return (
        WEIGHT,
        DENSITY,
        Param("normalize", bool, SHARED, normalize),
        Param("rescale", bool, SHARED, rescale),
        Param("int8_mask", bool, SHARED, False),
        Param("lambda", float, SHARED, 1.0),
    )


def _spec(name: str, pretty: str, extra: tuple[Param, ...]) -> MethodSpec:
    return MethodSpec(
        name=name, pretty_name=pretty, parameters=(*COMMON_PARAMETERS, *extra)
    )


class _FamilyMethod(LoraMergeMethod):
    """Shared checks and input ordering of the multi-adapter methods."""

    def check(self, tensor: str, params: dict, inputs: dict[str, dict]) -> None:
        super().check(tensor, params, inputs)
        for label, p in inputs.items():
            density = p.get("density")
            if density is not None and not 0 < density <= 1:
                raise TadaError(
                    f"{self.spec.name}: density must be in (0, 1] (got {density}) "
                    f"for {label} at {tensor}"
                )

    @staticmethod
    def per_input(job: ModuleJob, updates: dict, key: str) -> list:
        return [job.inputs[label][key] for label in updates]


class LoraTaskArithmetic(_FamilyMethod):
    spec = _spec(
        "lora_task_arithmetic",
        "Task arithmetic on LoRA factors (exact)",
        (
            WEIGHT,
            Param("lossless", bool, SHARED, False, "rank = sum of input ranks"),
        ),
    )

    def output_rank(self, params: dict, default: int, source_ranks: list[int]) -> int:
        if params["lossless"]:
            return sum(source_ranks)
        return super().output_rank(params, default, source_ranks)

    def combine(self, job, updates):
        weights = self.per_input(job, updates, "weight")
        return rules.task_arithmetic(list(updates.values()), weights), {
            "weights": weights
        }


class LoraTies(_FamilyMethod):
    """``lora_ties`` / ``lora_dare_ties``: mergekit's own kernels per module."""

    def __init__(
        self, name: str, kernel: str, pretty: str, normalize: bool, rescale: bool
    ):
        self.kernel = kernel
        self.spec = _spec(name, pretty, _gta_parameters(normalize, rescale))

    def rank_limit(self, source_ranks: list[int], shape: tuple[int, int]) -> int:
        return min(shape)  # sign election and masks make the update dense

    def combine(self, job, updates):
        weights = self.per_input(job, updates, "weight")
        densities = self.per_input(job, updates, "density")
        seed = rules.module_seed(job.seed, job.module)
        merged = rules.ties_dense(
            self.kernel,
            list(updates.values()),
            weights,
            densities,
            job.params,
            seed,
            job.rank,
        )
        return merged, {"weights": weights, "densities": densities}


class LoraKnotsTies(_FamilyMethod):
    spec = _spec(
        "lora_knots_ties", "KnOTS-TIES on LoRA factors", _gta_parameters(True, False)
    )

    def combine(self, job, updates):
        weights = self.per_input(job, updates, "weight")
        densities = self.per_input(job, updates, "density")
        seed = rules.module_seed(job.seed, job.module)
        merged = rules.knots_ties(
            list(updates.values()), weights, densities, job.params, seed
        )
        return merged, {"weights": weights, "densities": densities}


class LoraTsvM(_FamilyMethod):
    spec = _spec(
        "lora_tsv_m",
        "TSV-M (task singular vectors merge) on LoRA factors",
        (WEIGHT, Param("alpha", float, SHARED, 1.0, "global scale")),
    )

    def combine(self, job, updates):
        weights = self.per_input(job, updates, "weight")
        merged = rules.tsv_m(list(updates.values()), weights, job.params["alpha"])
        return merged, {"weights": weights}


class TaraMethod(LoraMergeMethod):
    """TARA-Merging: per-direction coefficients learned from unlabeled text.

    ``prepare`` learns phi for every module (mergekit_tada/training.py); each
    module's merge is then dW(phi*) from the same directions
    (mergekit_tada/methods/tara.py), truncated to ``rank`` if one is given.
    """

    plot_files = (TARA_PLOT,)
    spec = MethodSpec(
        name="tara",
        pretty_name="TARA-Merging (learned per-direction coefficients)",
        parameters=(
            *COMMON_PARAMETERS,
            Param("data", str | None, NON_BASE, None, "unlabeled text"),
            Param("preference", float, NON_BASE, 1.0, "rho (normalized)"),
            Param("variant", str, SHARED, "b", "a | b"),
            Param("objective", str, SHARED, "stch", "stch | linear"),
            Param("alpha", float, SHARED, 1.0, "STCH smoothing"),
            Param("steps", int, SHARED, 500),
            Param("lr", float, SHARED, 1e-3),
            Param("batch_size", int, SHARED, 16),
            Param("max_length", int, SHARED, 256),
            Param("data_samples", int, SHARED, 256, "rows read per input"),
            Param("init_lambda", float | None, SHARED, None, "phi_0 = l/T"),
            Param("training_mode", str, SHARED, "auto", "auto | memory | streamed"),
            Param("cache_dir", str, SHARED, DEFAULT_CACHE_DIR),
        ),
    )
    SETTINGS = (
        "variant",
        "objective",
        "alpha",
        "steps",
        "lr",
        "batch_size",
        "max_length",
        "data_samples",
        "init_lambda",
        "training_mode",
        "cache_dir",
    )

    def check(self, tensor: str, params: dict, inputs: dict[str, dict]) -> None:
        super().check(tensor, params, inputs)
        for key, allowed in (
            ("variant", tara.VARIANTS),
            ("objective", tara.OBJECTIVES),
            ("training_mode", tara.TRAINING_MODES),
        ):
            if params[key] not in allowed:
                raise TadaError(
                    f"tara: {key} must be one of {', '.join(allowed)} "
                    f"(got {params[key]!r}) for {tensor}"
                )
        if params["pico"]:
            raise TadaError(
                "tara: pico is not supported (phi is learned on the raw updates)"
            )
        for key in ("steps", "batch_size", "max_length", "data_samples"):
            if params[key] < 1:
                raise TadaError(
                    f"tara: {key} must be >= 1 (got {params[key]}) for {tensor}"
                )
        for key in ("lr", "alpha"):
            if params[key] <= 0:
                raise TadaError(
                    f"tara: {key} must be > 0 (got {params[key]}) for {tensor}"
                )
        if params["init_lambda"] is not None and params["init_lambda"] < 0:
            raise TadaError(f"tara: init_lambda must be >= 0 for {tensor}")
        for label, p in inputs.items():
            if not p.get("data"):
                raise TadaError(
                    f"tara: model {label} needs parameters: {{data: path}}, its "
                    "unlabeled text (.txt, .jsonl with a 'text' field, or a saved dataset)"
                )
            if not p["preference"] > 0:
                raise TadaError(
                    f"tara: preference of {label} must be > 0 (got {p['preference']})"
                )

    def output_rank(self, params: dict, default: int, source_ranks: list[int]) -> int:
        return params["rank"] or sum(source_ranks)  # the natural rank: nothing cut

    def data_paths(self, plans: list) -> dict[str, str]:
        return {
            f"data of {label}": p["data"]
            for label, p in plans[0].inputs.items()
            if p.get("data")
        }

    def prepare(self, stats: Any, plans: list, run: RunInputs) -> Any:
        from mergekit_tada.training import learn_tara

        shared, per_input = same_for_every_tensor(
            [
                (
                    {k: p.params[k] for k in self.SETTINGS},
                    {
                        label: (i["data"], i["preference"])
                        for label, i in p.inputs.items()
                    },
                )
                for p in plans
            ],
            "tara: its settings, data and preferences must be the same for every "
            "tensor: give them as plain values (no gradients or filters)",
        )
        labels = list(run.adapters)
        return learn_tara(
            run,
            plans,
            shared,
            data={label: per_input[label][0] for label in labels},
            preference={label: per_input[label][1] for label in labels},
        )

    def combine(self, job, updates):
        learned = job.context
        module = next(m for m in job.sources.values() if m)
        phi = learned.result.phi[module]
        merged = svd(learned.directions[module].merged(phi))
        return merged, {"variant": learned.variant, "phi": phi.tolist()}

    def run_report(self, context: Any) -> dict | None:
        result = context.result
        return {
            "variant": context.variant,
            "inputs": context.labels,
            "preference": context.preference,
            "settings": context.settings,
            "data": context.data,
            "cache_key": context.cache["key"],
            "cache_hit": context.cache["hit"],
            "z": result.z,
            "h_before": result.h_before,
            "h_after": result.h_after,
            "loss_history": result.history,
        }

    def card_lines(
        self, records: dict[str, dict], calibration: dict | None, context: Any = None
    ) -> list:
        result = context.result
        gaps = [
            f"{label}: {before - z:+.4f} -> {after - z:+.4f}"
            for label, z, before, after in zip(
                context.labels, result.z, result.h_before, result.h_after, strict=True
            )
        ]
        return [
            f"TARA-{context.variant.upper()}: {sum(len(r['phi']) for r in records.values())} "
            f"coefficients learned over {context.settings['steps']} steps "
            f"({context.settings['objective']} objective, preference "
            f"{[round(p, 4) for p in context.preference]})",
            "entropy gap H_i - z_i, before -> after: " + "; ".join(gaps),
        ]

    def write_plots(
        self, records: dict[str, dict], context: Any, folder: Path
    ) -> dict[str, str]:
        from mergekit_tada.training import plot_training

        if not context.result.history:
            return {}
        plot_training(context, folder / TARA_PLOT)
        return {"loss_plot": TARA_PLOT}


METHODS: tuple[LoraMergeMethod, ...] = (
    TadaMethod(),
    LoraTaskArithmetic(),
    LoraTies(
        "lora_ties", "ties", "TIES on LoRA updates", normalize=True, rescale=False
    ),
    LoraTies(
        "lora_dare_ties",
        "dare_ties",
        "DARE-TIES on LoRA updates",
        normalize=False,
        rescale=True,
    ),
    LoraKnotsTies(),
    LoraTsvM(),
    TaraMethod(),
)
METHOD_NAMES = frozenset(m.spec.name for m in METHODS)


def get(name: str) -> LoraMergeMethod | None:
    """Our method of that name (None: not ours)."""
    return next((m for m in METHODS if m.spec.name == name), None)
