"""TaDA: task-domain LoRA merging with calibrated probe gates (algorithms.md section 1).

Two adapters on one base, one with ``role: task`` and one ``role: domain``:

1. calibration: the base runs block by block on ~32 domain prompts and every
   target module's input statistics are kept (probe/calibration.py, cached);
2. probe: per module and adapter, the magnitude-invariant gain
   RMS ||dW x|| / (||dW||_F RMS ||x||) (probe/gates.py);
3. gates: delta = log probe_D - log probe_T, w_D = sigmoid((delta - median) /
   tau), w_T = 1 - w_D, clipped, times ``scale`` (:meth:`TadaMethod.gates`;
   or uniform, fixed, or learned with TARA's objective, training/learners.py);
4. conflict elimination: thin SVDs of both gated updates from their factors;
   components i (task) and j (domain) conflict when
   c_ij = (u_i . u'_j)(v_i . v'_j) < -kappa. Pairs are visited from the most
   negative c_ij up; of each pair whose members are both still kept, the one
   with the smaller gated strength (w_T sigma_i vs w_D sigma'_j) is dropped (a
   tie drops the domain component) (:func:`find_conflicts`);
5. combination of the kept components, w_T dT' + w_D dD', as a thin SVD
   (:func:`tada_combine`), truncated to rank r by the shared
   ``merge_module`` (B = U S^1/2, A = S^1/2 V^T).

A module present in one adapter only keeps that adapter's gated update.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_tada.cache import DEFAULT_CACHE_DIR
from mergekit_tada.errors import TadaError
from mergekit_tada.lowrank import Factored, ThinSVD, gram, svd, svd_coordinates
from mergekit_tada.methods.base import (
    COMMON_PARAMETERS,
    LoraMergeMethod,
    ModuleJob,
    Plot,
    RunInputs,
)
from mergekit_tada.methods.params import NON_BASE, SHARED, MethodSpec, Param
from mergekit_tada.probe.calibration import PASS_KEYS
from mergekit_tada.probe.gates import (
    GATE_GRANULARITIES,
    GATE_NORMALIZATIONS,
    PROBE_BALANCES,
    PROBE_CENTRINGS,
    PROBE_STATISTICS,
    ProbeTable,
    depth_summary,
    gates_from_delta,
)
from mergekit_tada.training.engines import TRAINING_MODES
from mergekit_tada.training.learners import LearnedGates, learn_gates

LOG = logging.getLogger(__name__)

ROLES = ("task", "domain")
GATES_PLOT = "gates.png"
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
    *PASS_KEYS,
    "cache_dir",
)
# Which prompts the probe reads: prompt set -> the parameter naming its file
PROBE_PASSES = {
    "domain": {"domain": "calibration"},
    "task": {"task": "task_calibration"},
    "contrast": {"domain": "calibration", "task": "task_calibration"},
}
# (key, low, high): the numeric settings' ranges (high None: unbounded)
LIMITS = (
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


def uniform_gate(params: dict) -> float:
    """The gate of uniform mode: 0.5 (sum normalisation) or 1 (max), times scale;
    with the default scale 2, uniform gates are task arithmetic 1/1."""
    return (1.0 if params["gate_normalization"] == "max" else 0.5) * params["scale"]


# ------------------------------------------------ steps 4-5, for one module


@dataclass(frozen=True)
class Conflicts:
    dropped_task: list[int]
    dropped_domain: list[int]


def find_conflicts(
    cosines: torch.Tensor,
    sigma_task: torch.Tensor,
    sigma_domain: torch.Tensor,
    task_gate: float,
    domain_gate: float,
    kappa: float,
) -> Conflicts:
    """Indices (into each SVD, descending sigma order) of the components to drop.

    ``cosines[i, j]`` = (u_i . u'_j)(v_i . v'_j), r_T x r_D.
    """
    rows, cols = torch.nonzero(cosines < -kappa, as_tuple=True)
    if rows.numel() == 0:
        return Conflicts([], [])
    order = torch.argsort(cosines[rows, cols], stable=True)
    strength_t = (sigma_task * task_gate).tolist()
    strength_d = (sigma_domain * domain_gate).tolist()
    dropped_t: set[int] = set()
    dropped_d: set[int] = set()
    for k in order.tolist():
        i, j = int(rows[k]), int(cols[k])
        if i in dropped_t or j in dropped_d:
            continue
        if strength_t[i] < strength_d[j]:
            dropped_t.add(i)
        else:
            dropped_d.add(j)
    return Conflicts(sorted(dropped_t), sorted(dropped_d))


def _kept(
    x: torch.Tensor, s: torch.Tensor, y: torch.Tensor, dropped: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD coordinates without the dropped components (views if none)."""
    if not dropped:
        return x, s, y
    keep = torch.tensor([i for i in range(len(s)) if i not in set(dropped)])
    return x[:, keep], s[keep], y[:, keep]


def _sigmas(s: torch.Tensor) -> list[float]:
    return [float(f"{x:.6g}") for x in s.tolist()]


def tada_combine(
    task: Factored | None,
    domain: Factored | None,
    *,
    task_gate: float,
    domain_gate: float,
    conflict_elimination: bool,
    kappa: float,
) -> tuple[ThinSVD, dict]:
    """The merged update of one module (thin SVD) and its report record.

    With both adapters present, everything runs in the coordinates of the
    stacked factors B = [B_T | B_D], A = [A_T; A_D]: one float64 Gram per side
    gives both adapters' SVDs (their diagonal blocks), the conflict cosines
    (U_T^T U_D = X_T^T (B_T^T B_D) X_D) and the SVD of the gated sum of the
    kept components. The only m x k and k x n products are the Grams; the
    singular vectors stay in coordinates until truncation forms the kept ones.
    """
    record: dict = {"task_gate": task_gate, "domain_gate": domain_gate}
    if task is None or domain is None:
        role, update, gate = (
            ("task", task, task_gate)
            if domain is None
            else ("domain", domain, domain_gate)
        )
        single = svd(update)
        record.update(dropped_task=[], dropped_domain=[])
        record[f"sigma_{role}"] = _sigmas(single.S)
        return single.scaled(gate), record
    B = torch.cat([task.B.float(), domain.B.float()], dim=1)
    A = torch.cat([task.A.float(), domain.A.float()], dim=0)
    gram_b, gram_a = gram(B, "columns"), gram(A, "rows")
    t, d = slice(0, task.B.shape[1]), slice(task.B.shape[1], B.shape[1])
    x_t, s_t, y_t = svd_coordinates(gram_b[t, t], gram_a[t, t])
    x_d, s_d, y_d = svd_coordinates(gram_b[d, d], gram_a[d, d])
    conflicts = Conflicts([], [])
    if conflict_elimination:
        cosines = (x_t.T @ gram_b[t, d] @ x_d) * (y_t.T @ gram_a[t, d] @ y_d)
        conflicts = find_conflicts(cosines, s_t, s_d, task_gate, domain_gate, kappa)
    kx_t, ks_t, ky_t = _kept(x_t, s_t, y_t, conflicts.dropped_task)
    kx_d, ks_d, ky_d = _kept(x_d, s_d, y_d, conflicts.dropped_domain)
    # merged = B P Q^T A with block-diagonal coordinates P (scaled) and Q
    P = torch.block_diag(kx_t * (task_gate * ks_t), kx_d * (domain_gate * ks_d))
    Q = torch.block_diag(ky_t, ky_d)
    x, s, y = svd_coordinates(P.T @ gram_b @ P, Q.T @ gram_a @ Q)
    merged = ThinSVD(B, s.float(), A.T, P @ x, Q @ y)
    record.update(
        dropped_task=conflicts.dropped_task,
        sigma_task=_sigmas(s_t),
        dropped_domain=conflicts.dropped_domain,
        sigma_domain=_sigmas(s_d),
    )
    return merged, record


# ------------------------------------------------------------- the method


class TadaMethod(LoraMergeMethod):
    report_name = "tada_report.json"  # the name readers of earlier versions know
    plot_files = (GATES_PLOT,)
    spec = MethodSpec(
        name="tada",
        pretty_name="TaDA (task-domain LoRA merging)",
        max_inputs=2,
        parameters=(
            Param("role", str | None, NON_BASE, None, "task | domain"),
            *COMMON_PARAMETERS,
            # uniform: the probe did not beat it on real weights (docs/quality-real.md)
            Param("gates", str, SHARED, "uniform", "uniform | probe | fixed | learned"),
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
            # lambda = 2: uniform gates are task arithmetic 1/1, the sum that PEFT and
            # mergekit default to (scale 1 was no better on real weights:
            # docs/quality-real.md, uniform gates H 82.8 against 83.4)
            Param("scale", float, SHARED, 2.0, "global lambda on both gates"),
            Param("cache_dir", str, SHARED, DEFAULT_CACHE_DIR),
            # gates: learned (TARA's objective, one loop: mergekit_tada/training/)
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
        self.check_choices(
            tensor,
            params,
            (
                ("gates", GATE_MODES),
                ("gate_granularity", granularities),
                ("gate_normalization", GATE_NORMALIZATIONS),
                ("probe_statistic", PROBE_STATISTICS),
                ("probe_centring", PROBE_CENTRINGS),
                ("probe_prompts", tuple(PROBE_PASSES)),
                ("probe_balance", PROBE_BALANCES),
                ("training_mode", TRAINING_MODES),
            ),
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
                "tada: gates: probe needs calibration: a .txt (one "
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
        self.check_bounds(tensor, params, LIMITS)
        if params["gate_min"] > params["gate_max"]:
            raise TadaError(f"tada: gate_min > gate_max for {tensor}")
        self.check_bounds(tensor, params, (("tau", 0, None, True),))

    def calibration(self, params: dict) -> dict | None:
        if params["gates"] != "probe":
            return None
        passes = {
            prompts: params[key]
            for prompts, key in PROBE_PASSES[params["probe_prompts"]].items()
        }
        return {key: params[key] for key in CALIBRATION_KEYS} | {"passes": passes}

    def data_paths(self, plans: list) -> dict[str, str]:
        paths = super().data_paths(plans)
        for plan in plans:
            if plan.params.get("task_calibration"):
                paths["task calibration data"] = plan.params["task_calibration"]
            if plan.params["gates"] == "learned" and plan.params.get("calibration"):
                paths["calibration data"] = plan.params["calibration"]
        return paths

    def prepare(self, stats: Any, plans: list, run: RunInputs) -> Any:
        if plans[0].params["gates"] in ("uniform", "fixed") and (
            plans[0].params["calibration"] or plans[0].params["task_calibration"]
        ):
            LOG.warning(
                "tada: calibration data is given but gates: %s does not read it "
                "(set gates: probe or learned to use it)",
                plans[0].params["gates"],
            )
        if any(p.params["gates"] == "learned" for p in plans):
            roles = {label: p["role"] for label, p in plans[0].inputs.items()}
            return learn_gates(run, plans, roles, uniform_gate(plans[0].params))
        if stats is None:
            return None
        roles = {label: p["role"] for label, p in plans[0].inputs.items()}
        return ProbeTable.for_roles(stats, roles, plans[0].params)

    def run_report(self, context: Any) -> dict | None:
        return context.report() if isinstance(context, LearnedGates) else None

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
        lines = []
        if isinstance(context, LearnedGates):
            lines.append(context.card_line())
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

    def plots(self, records: dict[str, dict], context: Any) -> list[Plot]:
        return [Plot(GATES_PLOT, "gates_plot", "gates", records)]

    @staticmethod
    def gates(job: ModuleJob) -> tuple[float, float, dict]:
        """(w_T, w_D, extra report fields) for one module."""
        params = job.params
        mode = params["gates"]
        extra: dict = {"gate_mode": mode}
        uniform = uniform_gate(params)
        if mode == "uniform":
            return uniform, uniform, extra
        if mode == "learned":
            module = next(m for m in job.sources.values() if m)
            task_gate, domain_gate = job.context.gates[module]
        elif mode == "probe":
            task_gate, domain_gate = TadaMethod.probe_gates(job, extra)
        else:  # fixed: the uniform gate where a weight is unset
            task_gate = domain_gate = uniform
        # user weights (scalars, gradients, filters) override per tensor
        w_task, w_domain = params["task_weight"], params["domain_weight"]
        if mode != "fixed" and (w_task is not None or w_domain is not None):
            extra["gate_override"] = True
        return (
            task_gate if w_task is None else float(w_task),
            domain_gate if w_domain is None else float(w_domain),
            extra,
        )

    @staticmethod
    def probe_gates(job: ModuleJob, extra: dict) -> tuple[float, float]:
        """Step 3: the gates from the module's probe delta (and the global
        balance with ``probe_balance: equalise``); the probe's values go to
        ``extra``."""
        params, probes = job.params, job.context
        role_source = {job.inputs[label]["role"]: m for label, m in job.sources.items()}
        task_m, domain_m = role_source["task"], role_source["domain"]
        delta = probes.delta(task_m, domain_m)
        task_gate, domain_gate = gates_from_delta(
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
            perturbation_domain=probes.perturbations.get("domain", {}).get(domain_m),
        )
        if params["probe_balance"] == "equalise":
            a, b = probes.balance
            task_gate, domain_gate = task_gate * a, domain_gate * b
            extra["balance"] = [a, b]
        return float(task_gate), float(domain_gate)

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
