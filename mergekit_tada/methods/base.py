"""What every LoRA-space method shares: the per-module job, the base class, checks.

No mergekit here (the adapter-only path runs without it). mergekit's registry
holds a wrapper per method (``integration.register_all``) whose per-tensor
call reaches the running merge (``run/execute.py``), which reads the LoRA
factors, asks the method for the merged rank-r factors of the module
(:meth:`LoraMergeMethod.merge_module`) and returns ``W + B A``.

``merge_module`` is shared: optional Pico calibration of the inputs, the
method's own ``combine`` (the merged update as a thin SVD), Pico's magnitude
restoration, truncation to the output rank. Methods differ only in
``combine``, their parameters and their checks. They return data: records per
module, report sections, card lines and :class:`Plot` requests; the run's
writers turn those into files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mergekit_tada.cache import DEFAULT_CACHE_DIR
from mergekit_tada.errors import TadaError
from mergekit_tada.lowrank import (
    Factored,
    ThinSVD,
    Truncated,
    frobenius_sq,
    stack,
    truncate,
)
from mergekit_tada.methods import pico
from mergekit_tada.methods.core_space import SPACES, core_space
from mergekit_tada.methods.params import NON_BASE, SHARED, MethodSpec, Param

# Parameters every LoRA-space method takes.
COMMON_PARAMETERS = (
    Param("rank", int | None, SHARED, None, "output LoRA rank"),
    Param("adapter_out", str, SHARED, "adapter", "adapter sub-folder"),
    Param("pico", bool, SHARED, False, "Pico B-space calibration first"),
)


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
    """What a method may read before merging, handed over by the run."""

    base_path: str
    base_files: list[str]  # the base's weight files and config.json (cache keys)
    adapters: dict[str, Any]  # input label -> LoraAdapter, in config order
    device: str
    quiet: bool


@dataclass(frozen=True)
class ModuleMerge:
    lora: Truncated
    record: dict


@dataclass(frozen=True)
class Plot:
    """A picture a method asks for: ``kind`` names the drawing (run/plots.py),
    ``data`` what it draws, ``key`` the report field that names ``file``."""

    file: str
    key: str
    kind: str
    data: Any


class LoraMergeMethod:
    """A merge done on LoRA factors; mergekit sees only ``W -> W + dW``."""

    spec: MethodSpec
    needs_data = False  # True: each input needs parameters: {data: ...}
    scale_key = "lambda"  # the rule's global scale, kept by match_norm
    report_name = "merge_report.json"
    plot_files: tuple[str, ...] = ()  # what plots() may ask for

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
        if params.get("pico") and params.get("match_norm", "none") != "none":
            raise TadaError(
                f"{name}: pico and match_norm both set the merged update's size "
                f"(pico restores the inputs' mean norm); choose one for {tensor}"
            )
        if params.get(self.scale_key) == AUTO:
            missing = [label for label, p in inputs.items() if not p.get("data")]
            if missing or any(p.get("data") == "generate" for p in inputs.values()):
                raise TadaError(
                    f"{name}: {self.scale_key}: auto chooses the scale on each "
                    "model's prompts: give every model parameters: {data: path} "
                    f"(a prompts file; missing for {', '.join(missing) or 'none'}"
                    f"{'; data: generate is not read here' if not missing else ''}) "
                    f"at {tensor}"
                )
        rank = params.get("rank")
        if rank is not None and rank <= 0:
            raise TadaError(
                f"rank must be a positive integer (got {rank}) for {tensor}"
            )

    def check_choices(
        self, tensor: str, params: dict, choices: tuple[tuple[str, tuple], ...]
    ) -> None:
        """Each ``(key, allowed)``: the value is one of ``allowed``."""
        for key, allowed in choices:
            if params[key] not in allowed:
                raise TadaError(
                    f"{self.spec.name}: {key} must be one of {', '.join(allowed)} "
                    f"(got {params[key]!r}) for {tensor}"
                )

    def check_bounds(
        self, tensor: str, params: dict, bounds: tuple[tuple, ...]
    ) -> None:
        """Each ``(key, low, high[, strict])``: low <= value (< low if strict)
        and value <= high where high is not None; an unset value passes."""
        for key, low, high, *strict in bounds:
            value = params[key]
            if value is None:
                continue
            if strict and strict[0]:
                ok, bound = value > low, f"> {low}"
            else:
                ok = value >= low and (high is None or value <= high)
                bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            if not ok:
                raise TadaError(
                    f"{self.spec.name}: {key} must be {bound} (got {value}) "
                    f"for {tensor}"
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
        paths = {
            f"data of {label}": p["data"]
            for label, p in plans[0].inputs.items()
            if p.get("data") and p["data"] != "generate"
        }
        for plan in plans:
            settings = self.calibration(plan.params)
            if settings and settings.get("calibration"):
                paths["calibration data"] = settings["calibration"]
        return paths

    def prepare(self, stats: Any, plans: list, run: RunInputs) -> Any:
        """Method-wide context before merging: from calibration statistics (TaDA)
        or learned from data (TARA); None where the method needs none."""
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

    def merge_module(self, job: ModuleJob) -> ModuleMerge:
        """Merged rank-r factors of one module from the inputs' factored updates."""
        record: dict = {}
        updates = job.updates
        if job.params["pico"]:
            calibrated, sharing = pico.calibrate(list(updates.values()))
            updates = dict(zip(updates, calibrated, strict=True))
            record["pico_sharing"] = [float(f"{x:.6g}") for x in sharing]
        space = None
        if job.params.get("space") == "core":
            space = core_space(list(updates.values()))
            updates = {label: space.project(u) for label, u in updates.items()}
            record["core_dim"] = list(space.dim)
        merged, extra = self.combine(job, updates)
        record.update(extra)
        if space is not None:
            merged = space.lift(merged)
        if job.params.get("match_norm", "none") != "none":
            merged, record["norm_factor"] = self.match_norm(job, merged)
        if job.params["pico"]:
            merged, gamma = pico.restore_magnitude(
                merged,
                list(job.updates.values()),
                job.params.get(self.scale_key, 1.0),
            )
            record["pico_gamma"] = gamma
        return self._truncated(merged, job, record)

    @staticmethod
    def _truncated(merged: ThinSVD, job: ModuleJob, record: dict) -> ModuleMerge:
        lora = truncate(merged, job.rank)
        record["rank"] = job.rank
        record["truncation_energy"] = lora.truncation_energy
        record["rank_99"] = lora.rank_99
        return ModuleMerge(lora, record)

    def match_norm(self, job: ModuleJob, merged: ThinSVD) -> tuple[ThinSVD, float]:
        """A label-free scale: the merged update rescaled to the Frobenius norm of
        the weighted sum sum_t w_t dW_t (``sum``) or to the mean of the weighted
        updates' norms (``mean``, Pico's restoration), times the size of the
        rule's own global scale (its sign is in the rule's output already);
        computed from factors."""
        pairs = [
            (u, job.inputs[label].get("weight", 1.0))
            for label, u in job.updates.items()
            if u is not None
        ]
        if job.params["match_norm"] == "sum":
            target = frobenius_sq(stack([u for u, _ in pairs], [w for _, w in pairs]))
            target = math.sqrt(target)
        else:
            target = sum(abs(w) * math.sqrt(frobenius_sq(u)) for u, w in pairs)
            target /= len(pairs)
        norm = math.sqrt(merged.energy())
        # the rule applied its scale already, sign included: only its size here
        size = abs(job.params.get(self.scale_key, 1.0))
        factor = target * size / norm if norm > 0 else 0.0
        return merged.scaled(factor), float(f"{factor:.6g}")

    # --------------------------------------------------- what the outputs say

    def run_report(self, context: Any) -> dict | None:
        """A top-level report section about what ``prepare`` did (None: none)."""
        return None

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

    def plots(self, records: dict[str, dict], context: Any) -> list[Plot]:
        """Pictures of this merge, as data for the plot writers."""
        return []


# ------------------------------------------------- the multi-adapter family

WEIGHT = Param("weight", float, NON_BASE, 1.0, "per-adapter weight")
AUTO = "auto"  # a global scale chosen on each model's prompts (run/scale.py)


def scale_param(key: str = "lambda", auto_by_default: bool = False) -> Param:
    """A rule's global scale: a number, or ``auto``. ``auto_by_default``: unset,
    it is ``auto`` where every model gives ``data`` and 1 otherwise (resolved
    in run/prepare.py), for the rules whose evidence asked for it."""
    value_type, default, unset = float | Literal["auto"], 1.0, ""
    if auto_by_default:
        value_type, default = value_type | None, None
        unset = "; unset: auto where every model has data, else 1"
    return Param(
        key,
        value_type,
        SHARED,
        default,
        "global scale, or auto: chosen where the merge agrees best with each "
        f"model on its own prompts (data){unset}",
    )


# what lambda: auto reads (RegMean's own data and settings are its own)
AUTO_DATA = Param("data", str | None, NON_BASE, None, "prompts file (lambda: auto)")
AUTO_SETTINGS = (
    Param(
        "auto_samples",
        int | None,
        SHARED,
        None,
        "prompts per model read by lambda: auto (unset: 64 where every model "
        "is a classifier with its head, else 16)",
    ),
    Param("auto_max_length", int, SHARED, 128, "tokens per prompt for lambda: auto"),
    Param(
        "auto_objective",
        Literal["tokens", "response", "head"] | None,
        SHARED,
        None,
        "what lambda: auto compares: every token of the prompts, (causal LM) "
        "the next token after each, or (classifiers) each decision of each head "
        "(unset: head where every model is a sequence classifier, else tokens)",
    ),
    Param(
        "cache_dir",
        str,
        SHARED,
        DEFAULT_CACHE_DIR,
        "where lambda: auto's objective per candidate is kept (RegMean: its Grams)",
    ),
)
DENSITY = Param("density", float, NON_BASE, 1.0, "fraction of entries kept")
SPACE = Param("space", str, SHARED, "full", "full | core: where the rule decides")
MATCH_NORM = Param(
    "match_norm",
    str,
    SHARED,
    "none",
    "none | sum | mean: each module's update rescaled to that norm (x the scale)",
)
NORM_TARGETS = ("none", "sum", "mean")


def gta_parameters(normalize: bool, rescale: bool) -> tuple[Param, ...]:
    """mergekit's generalized-task-arithmetic parameters, with its defaults."""
    return (
        WEIGHT,
        DENSITY,
        Param("normalize", bool, SHARED, normalize),
        Param("rescale", bool, SHARED, rescale),
        Param("int8_mask", bool, SHARED, False),
        scale_param(),
        AUTO_DATA,
        *AUTO_SETTINGS,
    )


def family_spec(name: str, pretty: str, extra: tuple[Param, ...]) -> MethodSpec:
    return MethodSpec(
        name=name, pretty_name=pretty, parameters=(*COMMON_PARAMETERS, *extra)
    )


class FamilyMethod(LoraMergeMethod):
    """Shared checks and input ordering of the multi-adapter methods."""

    def check(self, tensor: str, params: dict, inputs: dict[str, dict]) -> None:
        super().check(tensor, params, inputs)
        if "space" in params:
            self.check_choices(tensor, params, (("space", SPACES),))
        if "match_norm" in params:
            self.check_choices(tensor, params, (("match_norm", NORM_TARGETS),))
        for label, p in inputs.items():
            density = p.get("density")
            if density is not None and not 0 < density <= 1:
                raise TadaError(
                    f"{self.spec.name}: density must be in (0, 1] (got {density}) "
                    f"for {label} at {tensor}"
                )

    def merge_module(self, job: ModuleJob) -> ModuleMerge:
        """A module that every input leaves as it is (an untrained LoRA: B = 0)
        merges to zero, whatever the rule (whose bases would be empty)."""
        if any(u is not None and frobenius_sq(u) > 0 for u in job.updates.values()):
            return super().merge_module(job)
        u = next(u for u in job.updates.values() if u is not None)
        none = torch.zeros(0, dtype=torch.float32)
        zero = ThinSVD(u.B.new_zeros(u.shape[0], 0), none, u.A.new_zeros(u.shape[1], 0))
        record = {"weights": self.per_input(job, job.updates, "weight")}
        return self._truncated(zero, job, record)

    @staticmethod
    def per_input(job: ModuleJob, updates: dict, key: str) -> list:
        return [job.inputs[label][key] for label in updates]
