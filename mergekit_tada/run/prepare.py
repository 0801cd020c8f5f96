"""What a method needs before merging: calibration passes, learned coefficients.

Runs after planning, before any output exists: the calibration passes a
method asks for (probe/cache.py: from the cache or computed), then the
method's own ``prepare`` (TaDA's probe table, TARA's learned phi).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_tada.errors import TadaError
from mergekit_tada.methods.base import RunInputs
from mergekit_tada.run.plan import MergePlan


@dataclass(frozen=True)
class Prepared:
    context: Any  # what the method's prepare() returned
    calibration: dict | None  # what the report says of the calibration


def prepare(plan: MergePlan) -> Prepared:
    """Run (or read from the cache) what the method needs before merging."""
    targets = plan.targets
    device = plan.options.device or "cpu"
    base_files = plan.base_files()  # listed once: cache keys of both phases
    stats, calibration = _calibrate(plan, targets, torch.device(device), base_files)
    run = RunInputs(
        base_path=plan.base_path,
        base_files=base_files,
        adapters=plan.adapters,
        device=device,
        quiet=plan.options.quiet,
    )
    return Prepared(plan.method.prepare(stats, targets, run), calibration)


def _calibrate(
    plan: MergePlan, targets: list, device: torch.device, base_files: list[str]
):
    """The calibration passes the method asks for (None, None: none)."""
    wanted = {
        json.dumps(c, sort_keys=True)
        for p in targets
        if (c := plan.method.calibration(p.params)) is not None
    }
    if not wanted:
        return None, None
    if len(wanted) > 1:
        keys = ", ".join(json.loads(next(iter(wanted))))
        raise TadaError(
            f"calibration settings ({keys}) must be the same for every "
            "tensor: give them as plain global parameters"
        )
    from mergekit_tada.probe.cache import calibrate

    return calibrate(
        json.loads(wanted.pop()),
        plan.base_path,
        base_files,
        plan.adapters,
        device,
        plan.options.quiet,
    )
