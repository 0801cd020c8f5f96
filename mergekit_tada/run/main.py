"""One whole merge run of a LoRA-space method, phase by phase.

1. The output folder is locked (run/folder.py).
2. Plan: ``MergePlan`` validates everything before any output exists
   (run/plan.py, with a planner from run/planners.py); the run is refused if
   its outputs would replace one of its inputs.
3. Prepare: calibration passes and learned coefficients (run/prepare.py).
4. Execute into a fresh stage folder (run/execute.py): mergekit's executor
   (``executor``, given by ``integration``) or the adapter-only loop, then the
   adapter config, report, plots and model-card section.
5. Commit: the complete outputs replace the earlier ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergekit_tada.run.execute import Execution
from mergekit_tada.run.folder import OutputFolder, check_folder_name
from mergekit_tada.run.plan import MergePlan, Planner
from mergekit_tada.run.prepare import prepare

# Runs mergekit's executor into the stage folder with this execution active.
Executor = Callable[[Execution, Path], None]


def run(
    config: Any,
    options: Any,
    out_path: str | os.PathLike,
    source: str | None,
    planner: Planner,
    executor: Executor | None = None,
    extra_files: dict[str, str] | None = None,
) -> None:
    """One whole merge into ``out_path``: lock, validate, merge into a stage, commit.

    ``executor``: mergekit's own executor for a full-model merge; None merges
    the adapter only. ``extra_files``: name -> text, written into the stage
    (committed with the rest).
    """
    folder = OutputFolder(out_path)
    with folder.locked():
        plan = MergePlan(config, options, source, planner)
        folder.guard_inputs(
            plan.input_paths(), [*plan.output_names(), *(extra_files or {})]
        )
        execution = Execution(plan, prepare(plan))
        target = folder.new_stage()
        if executor is None:
            with execution.writing(target):
                execution.merge_adapter_only(device=options.device or "cpu")
        else:
            with execution.writing(target, model_card=options.write_model_card):
                executor(execution, target)
        for name, text in (extra_files or {}).items():
            (target / check_folder_name(name, "output file name")).write_text(
                text, encoding="utf-8"
            )
        folder.commit(target)
