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

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mergekit_tada.errors import TadaError
from mergekit_tada.run.execute import Execution
from mergekit_tada.run.folder import OutputFolder, check_folder_name
from mergekit_tada.run.plan import MergePlan, Planner
from mergekit_tada.run.prepare import prepare

_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@contextlib.contextmanager
def _disk_errors(folder: Path) -> Iterator[None]:
    """A full disk or a file-size limit as one line naming the folder (the
    earlier outputs are kept: the stage is discarded, nothing committed)."""
    try:
        yield
    except Exception as error:
        full = isinstance(error, OSError) and error.errno in _DISK_FULL
        if (
            not full
            and "os error 28" not in str(error)
            and "os error 27" not in str(error)
        ):
            raise
        free = shutil.disk_usage(folder).free / 1e9
        raise TadaError(
            f"output folder {folder}: no space left or file too large ({error}); "
            f"{free:.2f} GB free there: free at least the size of the merged model "
            "and its adapter, or choose another folder; the earlier outputs are kept"
        ) from None


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
    with folder.locked(), _disk_errors(folder.path):
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
