"""The magnitude-invariant probe and the gates (algorithms.md section 1, steps 2-3).

    probe  s_a(m) = RMS_x ||dW_a x|| / (||dW_a||_F * RMS_x ||x||)
                  = sqrt(sum ||dW_a x||^2) / (||dW_a||_F * sqrt(sum ||x||^2))

Scaling dW_a by any c > 0 scales numerator and ||dW_a||_F alike: the probe
measures how strongly the adapter responds to the real input distribution
relative to its own size, not how large it is.

    delta(m) = log s_D(m) - log s_T(m)
    w_D(m)   = sigmoid((delta(m) - median_m delta) / tau),  w_T = 1 - w_D
    both clipped to [gate_min, gate_max], then multiplied by scale.

The median runs over the modules both adapters touch. A module in one adapter
only, or where a probe is undefined (a zero update or zero inputs), gets the
neutral delta = median (w = 0.5 before clipping and scaling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mergekit_tada.calibration import ModuleStats


def probe_value(stats: ModuleStats) -> float | None:
    """The probe of one (adapter, module); None where it is undefined."""
    if stats.frob_sq <= 0 or stats.sum_sq_input <= 0:
        return None
    return math.sqrt(stats.sum_sq_delta) / math.sqrt(stats.frob_sq * stats.sum_sq_input)


@dataclass(frozen=True)
class ProbeTable:
    """Probe values per module for the task and the domain adapter, and median delta."""

    task: dict[str, float | None]
    domain: dict[str, float | None]
    deltas: dict[str, float]
    median_delta: float

    @classmethod
    def from_stats(
        cls, task: dict[str, ModuleStats], domain: dict[str, ModuleStats]
    ) -> ProbeTable:
        p_task = {m: probe_value(s) for m, s in task.items()}
        p_domain = {m: probe_value(s) for m, s in domain.items()}
        deltas = {
            m: math.log(p_domain[m]) - math.log(p_task[m])
            for m in sorted(set(p_task) & set(p_domain))
            if p_task[m] and p_domain[m]
        }
        ordered = sorted(deltas.values())
        n = len(ordered)
        if n == 0:
            median = 0.0
        elif n % 2:
            median = ordered[n // 2]
        else:
            median = 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
        return cls(p_task, p_domain, deltas, median)

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
) -> tuple[float, float]:
    """(w_T, w_D) from a module's delta."""
    x = (delta - median) / tau
    w_domain = (
        1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
    )
    w_task = 1.0 - w_domain
    clip = lambda w: min(max(w, gate_min), gate_max)  # noqa: E731
    return clip(w_task) * scale, clip(w_domain) * scale
