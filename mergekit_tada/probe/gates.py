"""The magnitude-invariant probe and the gates (algorithms.md section 1, steps 2-3).

    probe  s_a(m) = RMS_x ||dW_a x|| / (||dW_a||_F * RMS_x ||x||)
                  = sqrt(sum ||dW_a x||^2) / (||dW_a||_F * sqrt(sum ||x||^2))

Scaling dW_a by any c > 0 scales numerator and ||dW_a||_F alike: the probe
measures how strongly the adapter responds to the real input distribution
relative to its own size, not how large it is.

    delta(m) = log s_D(m) - log s_T(m)
    w_D(m)   = sigmoid((delta(m) - median_m delta) / tau),  w_T = 1 - w_D
    both clipped to [gate_min, gate_max], then multiplied by scale.
    (gate_normalization "max": after clipping, both divided by the larger.)

The median runs over the modules both adapters touch. A module in one adapter
only, or where a probe is undefined (a zero update or zero inputs), gets the
neutral delta = median (w = 0.5 before clipping and scaling).

Ablation settings: ``statistic="raw"`` uses the raw
activation norm RMS_x ||dW_a x|| instead of the probe (not magnitude-invariant);
the output-side probe RMS_x ||dW_a x|| / RMS_x ||W x|| would give the same
gates as ``raw`` (the module's ||W x|| is shared by both adapters and cancels
in delta), so it is reported (``perturbation``: how far each adapter moves
the module's own output on the calibration text), not offered as a statistic;
``granularity="layer"`` gives every module of a decoder layer the mean
delta of that layer (one gate per layer instead of per layer x projection);
``centring="type"`` shifts each projection type's deltas (all q_proj, all
down_proj, ...) so that their median is the global median: a type whose
probes differ from the others' for both adapters alike (its input
statistics, not the task/domain split) then gets no gate bias of its own.

Which prompts (``probe_prompts``): ``domain`` (the calibration prompts, the
paper's probe), ``task`` (the task-style prompts of ``task_calibration``), or
``contrast``: delta on the domain prompts minus delta on the task prompts,
i.e. how far the domain text moves a module's balance toward the domain
adapter compared with task text; whatever makes one adapter respond more in
a module on any input (its shape there, the module's input statistics)
cancels.

``probe_balance="equalise"`` adds a global balance derived from the probe
pass: the task gates times a, the domain gates times b, (a + b) / 2 = 1 and
a / b = p_D / p_T, where p is an adapter's median relative output
perturbation RMS||dW x|| / RMS||W x|| (see :attr:`ProbeTable.balance`).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from functools import cached_property

from mergekit_tada.probe.calibration import ModuleStats, Stats

LOG = logging.getLogger(__name__)

PROBE_STATISTICS = ("normalized", "raw")
GATE_GRANULARITIES = ("module", "layer")
GATE_NORMALIZATIONS = ("sum", "max")
PROBE_CENTRINGS = ("global", "type")
PROBE_BALANCES = ("none", "equalise")
_LAYER = re.compile(r"^(.*\.(?:layers|layer|h|blocks)\.\d+)\.")
_DEPTH = re.compile(r"\.(\d+)\.")  # a layer index anywhere in a module name


def probe_value(stats: ModuleStats, statistic: str = "normalized") -> float | None:
    """The probe of one (adapter, module); None where it is undefined."""
    if stats.frob_sq <= 0 or stats.sum_sq_input <= 0:
        return None
    if statistic == "raw":
        return (
            math.sqrt(stats.sum_sq_delta / stats.tokens)
            if stats.sum_sq_delta > 0
            else None
        )
    return math.sqrt(stats.sum_sq_delta) / math.sqrt(stats.frob_sq * stats.sum_sq_input)


def perturbation(stats: ModuleStats) -> float | None:
    """RMS_x ||dW x|| / RMS_x ||W x||: the adapter's relative change of the
    module's output on the calibration text; None where undefined."""
    if stats.sum_sq_output <= 0:
        return None
    return math.sqrt(stats.sum_sq_delta / stats.sum_sq_output)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return 0.0
    if n % 2:
        return ordered[n // 2]
    return 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


def layer_of(module: str) -> str:
    """The decoder layer a module belongs to (the module itself outside layers)."""
    match = _LAYER.match(module)
    return match.group(1) if match else module


def _centre_by_type(deltas: dict[str, float]) -> dict[str, float]:
    """Each projection type's deltas shifted to have the global median."""
    overall = _median(list(deltas.values()))
    types: dict[str, list[str]] = {}
    for module in deltas:
        types.setdefault(module.rsplit(".", 1)[-1], []).append(module)
    centred = {}
    for members in types.values():
        shift = overall - _median([deltas[m] for m in members])
        centred.update({m: deltas[m] + shift for m in members})
    return {m: centred[m] for m in deltas}


def _pool_by_layer(deltas: dict[str, float]) -> dict[str, float]:
    """Each module's delta replaced by the mean delta of its decoder layer."""
    groups: dict[str, list[str]] = {}
    for module in deltas:
        groups.setdefault(layer_of(module), []).append(module)
    pooled = {}
    for members in groups.values():
        mean = sum(deltas[m] for m in members) / len(members)
        pooled.update(dict.fromkeys(members, mean))
    return pooled


def _deltas(
    task: dict[str, ModuleStats], domain: dict[str, ModuleStats], statistic: str
) -> tuple[dict, dict, dict[str, float], tuple[str, ...]]:
    """Probes per module, delta = log s_D - log s_T where both are defined, and
    the modules of both adapters where it is not."""
    p_task = {m: probe_value(s, statistic) for m, s in task.items()}
    p_domain = {m: probe_value(s, statistic) for m, s in domain.items()}
    shared = sorted(set(p_task) & set(p_domain))
    deltas = {
        m: math.log(p_domain[m]) - math.log(p_task[m])
        for m in shared
        if p_task[m] and p_domain[m]
    }
    return p_task, p_domain, deltas, tuple(m for m in shared if m not in deltas)


@dataclass(frozen=True)
class ProbeTable:
    """Probe values per module for the task and the domain adapter, and median delta."""

    task: dict[str, float | None]
    domain: dict[str, float | None]
    deltas: dict[str, float]
    median_delta: float
    undefined: tuple[str, ...] = ()  # modules of both adapters with no probe
    # relative output perturbations (reported): role -> module -> value
    perturbations: dict[str, dict[str, float | None]] = field(default_factory=dict)

    @classmethod
    def from_stats(
        cls,
        task: dict[str, ModuleStats],
        domain: dict[str, ModuleStats],
        *,
        statistic: str = "normalized",
        granularity: str = "module",
        centring: str = "global",
        against: tuple[dict[str, ModuleStats], dict[str, ModuleStats]] | None = None,
    ) -> ProbeTable:
        """``against``: (task, domain) statistics on the task-style prompts;
        given, each delta becomes the contrast delta(domain prompts) -
        delta(task prompts) before centring and pooling."""
        p_task, p_domain, deltas, undefined = _deltas(task, domain, statistic)
        if against is not None:
            _, _, other, other_undefined = _deltas(*against, statistic)
            undefined = tuple(
                sorted({*undefined, *other_undefined, *(set(deltas) ^ set(other))})
            )
            deltas = {m: deltas[m] - other[m] for m in deltas if m in other}
        if centring == "type":
            deltas = _centre_by_type(deltas)
        if granularity == "layer":
            deltas = _pool_by_layer(deltas)
        return cls(
            p_task,
            p_domain,
            deltas,
            _median(list(deltas.values())),
            undefined,
            {
                role: {m: perturbation(s) for m, s in stats.items()}
                for role, stats in (("task", task), ("domain", domain))
            },
        )

    @classmethod
    def for_roles(
        cls, stats: dict[str, Stats], roles: dict[str, str], params: dict
    ) -> ProbeTable:
        """The table from each prompt set's statistics (``stats``: prompt set ->
        input label -> module -> statistics; the first set is the probe's, a
        second its contrast), inputs named by ``roles`` (label -> task|domain),
        with a warning naming the modules whose probe is undefined."""
        by_role = {
            prompts: {role: found[label] for label, role in roles.items()}
            for prompts, found in stats.items()
        }
        first, *contrast = by_role.values()
        table = cls.from_stats(
            first["task"],
            first["domain"],
            statistic=params["probe_statistic"],
            granularity=params["gate_granularity"],
            centring=params["probe_centring"],
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

    @cached_property
    def balance(self) -> tuple[float, float]:
        """(a, b), mean 1, with a * p_T = b * p_D: the global factors on the task
        and domain gates that equalise the adapters' median relative output
        perturbation p (modules both touch) on the calibration text."""
        task, domain = (
            self.perturbations.get("task", {}),
            self.perturbations.get("domain", {}),
        )
        both = [m for m in task if task[m] and domain.get(m)]
        if not both:
            return 1.0, 1.0
        ratio = _median([domain[m] for m in both]) / _median([task[m] for m in both])
        return 2 * ratio / (1 + ratio), 2 / (1 + ratio)

    def delta(self, task_module: str | None, domain_module: str | None) -> float:
        if task_module is None or domain_module is None or task_module != domain_module:
            return self.median_delta
        return self.deltas.get(task_module, self.median_delta)


def gates_from_delta(
    delta: float,
    median: float,
    *,
    tau: float,
    gate_min: float,
    gate_max: float,
    scale: float,
    normalization: str = "sum",
) -> tuple[float, float]:
    """(w_T, w_D) from a module's delta.

    ``normalization="sum"``: the clipped sigmoid pair (w_T + w_D = 1 before
    clipping and ``scale``); ``"max"``: both divided by the larger one.
    """
    x = (delta - median) / tau
    w_domain = (
        1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
    )
    w_task = 1.0 - w_domain
    clip = lambda w: min(max(w, gate_min), gate_max)  # noqa: E731
    w_task, w_domain = clip(w_task), clip(w_domain)
    if normalization == "max":  # the stronger adapter keeps its trained size
        top = max(w_task, w_domain)
        w_task, w_domain = w_task / top, w_domain / top
    return w_task * scale, w_domain * scale


# ------------------------------------------------ the gates by depth


def depth_series(
    records: dict[str, dict],
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Gate lines by depth: label -> {"task"|"domain" -> [(depth, gate)]}.

    A module inside a numbered layer is labelled by its path inside the layer
    (``self_attn.q_proj``, ``attention.output.dense``: BERT has three
    ``dense`` modules per layer); one outside the layers (a pooler,
    ``lm_head``) by its full name, one step past the last layer.
    """
    points = []
    for module, record in sorted(records.items()):
        if "task_gate" not in record:
            continue
        match = _DEPTH.search(module)
        depth = int(match.group(1)) if match else None
        label = module[match.end() :] if match else module
        points.append((label, depth, record))
    past_last = max((d for _, d, _ in points if d is not None), default=-1) + 1
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for label, depth, record in points:
        for role in ("task", "domain"):
            series.setdefault(label, {}).setdefault(role, []).append(
                (past_last if depth is None else depth, record[f"{role}_gate"])
            )
    return series


def depth_summary(records: dict[str, dict]) -> str | None:
    """Mean domain gate in the shallowest and deepest third of the layers."""
    points = [
        (int(m.group(1)), r["domain_gate"])
        for name, r in records.items()
        if (m := _DEPTH.search(name)) and "domain_gate" in r
    ]
    if not points:
        return None
    layers = sorted({p[0] for p in points})
    third = max(1, len(layers) // 3)
    shallow = [g for layer, g in points if layer in layers[:third]]
    deep = [g for layer, g in points if layer in layers[-third:]]
    return (
        f"mean domain gate: {sum(shallow) / len(shallow):.3f} in the shallowest "
        f"{third} layer(s), {sum(deep) / len(deep):.3f} in the deepest {third}"
    )
