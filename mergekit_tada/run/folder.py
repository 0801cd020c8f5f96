"""The output folder of one run: locked, staged, and replaced only when complete.

A merge writes several things into one folder (mergekit's shards, index,
config and card; our adapter, report and plots). Users rerun into the same
folder, run two merges at once, press Ctrl-C, or merge the last result again;
none of that may lose data or leave a mixed folder. One mechanism covers it:

* **Lock.** An exclusive ``fcntl.flock`` on ``<out>/.mergekit-tada.lock`` for
  the whole run (the kernel releases it when the process dies, however it
  dies). A second run into the same folder fails at once, naming the folder
  and the holder's pid.
* **Stage.** Everything the run writes goes into a hidden stage folder inside
  the output folder, ``.mergekit-tada-stage-<pid>-<random>/`` (same file
  system, so moving results into place is a rename). The output folder itself
  is untouched while the merge runs: a failing or interrupted run leaves the
  earlier outputs exactly as they were.
* **Commit.** When every output is complete, a journal (``commit.json``: what
  moves in, what earlier merge outputs go) is written and fsynced in the stage,
  then applied: earlier outputs are moved into the stage, new ones into place,
  the stage deleted. A run killed during those renames leaves the journal; the
  next run into the folder finishes the commit before it starts (roll forward).
  A stage without a journal is an unfinished run: the next run deletes it
  (the lock proves its owner is gone).
* **What counts as an earlier merge's output** (run/outputs.py): the files
  the last commit's manifest lists, or mergekit's known file names. Outputs
  move in and out file by file: nothing else in the folder, nor in a
  sub-folder such as the adapter's (``adapter/training_args.txt``), is ever
  touched; a sub-folder left empty by a removal is removed.

Inputs are guarded: a run whose commit would replace or remove one of its own
inputs (``model: base+out/adapter`` with output ``out``) is refused before it
starts, naming both paths.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from mergekit_tada.errors import TadaError
from mergekit_tada.files import follow_umask
from mergekit_tada.run.outputs import (
    CARD,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    MERGEKIT_OUTPUTS,
    earlier_outputs,
    relative_files,
)

LOG = logging.getLogger(__name__)

LOCK_NAME = ".mergekit-tada.lock"
STAGE_PREFIX = ".mergekit-tada-stage-"
JOURNAL_NAME = "commit.json"
_REPLACED = "replaced"  # earlier outputs moved here during a commit

# The last names a commit moves in: the report is what readers trust.
_LAST = (CARD, "tada_report.json", "merge_report.json", MANIFEST_NAME)


def check_folder_name(value: object, key: str = "adapter_out") -> str:
    """A plain sub-folder name: one relative path component, not '.' or '..'."""
    text = value if isinstance(value, str) else ""
    if (
        not text
        or text in (".", "..")
        or "/" in text
        or "\\" in text
        or "\0" in text
        or os.path.isabs(text)
        or text.startswith(".")
    ):
        raise TadaError(
            f"{key} must be a plain sub-folder name inside the output folder, such "
            f"as 'adapter' (got {value!r}): no path separators, no '.', '..' or "
            "hidden names, not absolute"
        )
    return text


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class OutputFolder:
    """One run's view of its output folder; see the module docstring."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.stage: Path | None = None
        self._lock_fd: int | None = None
        self._made_lock = False  # this run created the lock file
        self._refused = False  # the folder is one of the run's inputs

    # ------------------------------------------------------------- the lock

    @contextlib.contextmanager
    def locked(self) -> Iterator[OutputFolder]:
        """Hold the folder for the run; on any exit leave no temporaries.

        SIGTERM is turned into ``SystemExit`` for the duration (in the main
        thread), so ``kill`` cleans up like Ctrl-C does. A folder this run
        created and left empty is removed.
        """
        if self.path.exists() and not self.path.is_dir():
            raise TadaError(f"output folder {self.path} is an existing file")
        created = not self.path.exists()
        if not created and not os.access(self.path, os.W_OK | os.X_OK):
            raise TadaError(f"output folder {self.path} is not writable")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TadaError(
                f"output folder {self.path}: cannot create ({error.strerror})"
            ) from None
        self._lock()
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if main else None
        try:
            self._recover()
            yield self
        finally:
            try:
                self._discard_stage()
            finally:
                if main:  # None: the earlier handler was not set from Python
                    signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)
                self._unlock(remove_folder=created)

    def _lock(self) -> None:
        lock_path = self.path / LOCK_NAME
        self._made_lock = not lock_path.exists()
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:
            raise TadaError(
                f"output folder {self.path}: cannot open its lock file {LOCK_NAME} "
                "(owned by another user?); choose another output folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = lock_path.read_text(encoding="ascii", errors="replace").strip()
            raise TadaError(
                f"output folder {self.path} is in use by another merge "
                f"(pid {holder or 'unknown'}); wait for it to finish or choose "
                "another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self, remove_folder: bool) -> None:
        if self._lock_fd is None:
            return
        if self._refused and self._made_lock:
            # the "output folder" is one of the run's inputs: leave it as found
            os.unlink(self.path / LOCK_NAME)
        if remove_folder and os.listdir(self.path) == [LOCK_NAME]:
            # The run created the folder and left nothing: remove it (still
            # holding the lock, so no other run is inside).
            os.unlink(self.path / LOCK_NAME)
            with contextlib.suppress(OSError):
                self.path.rmdir()
        os.close(self._lock_fd)
        self._lock_fd = None

    # ------------------------------------------------------- stale stages

    def _recover(self) -> None:
        """Finish an interrupted commit; delete what unfinished runs left."""
        for entry in sorted(os.listdir(self.path)):
            if not entry.startswith(STAGE_PREFIX):
                continue
            stage = self.path / entry
            journal = _read_journal(stage)
            if journal is not None:
                LOG.warning("finishing the interrupted commit of %s", stage)
                self._apply(stage, journal)
            else:
                owner = entry[len(STAGE_PREFIX) :].split("-", 1)[0]
                if (
                    owner.isdigit()
                    and int(owner) != os.getpid()
                    and _pid_alive(int(owner))
                ):
                    # its lock file was deleted under it: never touch a live run
                    LOG.warning(
                        "leaving %s alone: its run (pid %s) is alive", stage, owner
                    )
                    continue
                LOG.warning(
                    "removing %s, left by an unfinished run (pid %s)", stage, owner
                )
            shutil.rmtree(stage, ignore_errors=True)

    # ------------------------------------------------------- inputs

    def guard_inputs(self, inputs: dict[str, str], writes: Iterable[str]) -> None:
        """Refuse a run whose commit would replace or remove one of its inputs.

        ``inputs``: what -> path (base model, adapters, data files);
        ``writes``: names (or glob patterns) this run may write into the folder.
        """
        out = self.path.resolve()
        touched = [*writes, *earlier_outputs(self.path), *MERGEKIT_OUTPUTS, CARD]
        for what, path in inputs.items():
            target = Path(path).resolve()
            if target == out:
                self._refused = True
                raise TadaError(
                    f"output folder {self.path} is the {what}: choose another "
                    "output folder"
                )
            if not target.is_relative_to(out):
                continue
            parts = target.relative_to(out).parts
            top = parts[0]
            # an output at the input, above it or inside it replaces part of it
            hit = any(
                fnmatch.fnmatch(top, p.split("/")[0])
                and all(
                    fnmatch.fnmatch(a, b)
                    for a, b in zip(parts[1:], p.split("/")[1:], strict=False)
                )
                for p in touched
            )
            if hit:
                raise TadaError(
                    f"output folder {self.path} would replace the {what} {path} "
                    f"(its '{top}' is an output of this merge); copy the input "
                    "elsewhere or choose another output folder"
                )

    # ------------------------------------------------------- stage and commit

    def new_stage(self) -> Path:
        """A fresh stage; returns the folder the run writes its outputs into.

        That folder carries the output folder's name (mergekit names the model
        card after it).
        """
        self.stage = Path(
            tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=self.path)
        )
        target = self.stage / (self.path.resolve().name or "out")
        target.mkdir()
        return target

    def commit(self, produced: Path) -> list[str]:
        """Move the complete outputs into place; returns the earlier ones removed."""
        assert self.stage is not None and produced.parent == self.stage
        new = relative_files(produced)
        (produced / MANIFEST_NAME).write_text(
            json.dumps({"version": MANIFEST_VERSION, "outputs": new}, indent=1) + "\n",
            encoding="utf-8",
        )
        new.append(MANIFEST_NAME)
        new.sort(key=lambda n: (n in _LAST, _LAST.index(n) if n in _LAST else 0, n))
        self._check_parents(new)
        old = sorted(earlier_outputs(self.path) - set(new))
        journal = {"produced": produced.name, "new": new, "old": old}
        _settle_tree(produced)
        # written whole or not at all: a journal is what makes a stage a commit
        tmp = self.stage / (JOURNAL_NAME + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(journal, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, self.stage / JOURNAL_NAME)
        _fsync_dir(self.stage)
        if old:
            LOG.warning(
                "removing the earlier merge's %s from %s", ", ".join(old), self.path
            )
        self._apply(self.stage, journal)
        return old

    def _check_parents(self, new: list[str]) -> None:
        """Refuse (before the journal) an output whose folder is a user's file."""
        for name in new:
            for depth in range(1, len(name.split("/"))):
                parent = self.path.joinpath(*name.split("/")[:depth])
                if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
                    raise TadaError(
                        f"output folder {self.path}: {parent.name} is a file, not "
                        f"the folder this merge writes {name} into; move it or "
                        "choose another output folder"
                    )

    def _apply(self, stage: Path, journal: dict) -> None:
        """Apply a commit journal; idempotent, so an interrupted one can be rerun.

        File by file: an earlier file goes into the stage's ``replaced/``, the
        new one takes its place; a sub-folder is created where missing and
        removed where a removal leaves it empty.
        """
        produced = stage / journal["produced"]
        replaced = stage / _REPLACED
        replaced.mkdir(exist_ok=True)

        def move_out(name: str) -> None:
            final = self.path / name
            if final.is_file() or final.is_symlink():
                keep = replaced / name
                keep.parent.mkdir(parents=True, exist_ok=True)
                _remove(keep)
                os.rename(final, keep)

        # the earlier report and card go first and the new ones come last: a
        # folder caught mid-commit has no report beside outputs it does not
        # describe
        for name in _LAST:
            if (produced / name).exists():
                move_out(name)
        new = []
        for name in journal["new"]:  # an older version's journal names folders
            source = produced / name
            if source.is_dir() and not source.is_symlink():
                new += [f"{name}/{f}" for f in relative_files(source)]
            else:
                new.append(name)
        folders = set()
        for name in new:
            source = produced / name
            if not (source.exists() or source.is_symlink()):
                continue  # moved in by the interrupted attempt
            move_out(name)
            final = self.path / name
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(source, final)
            folders.add(final.parent)
        for name in journal["old"]:
            move_out(name)
            folders.add((self.path / name).parent)
            _remove_empty_parents(self.path / name, self.path)
        for folder in sorted(folders | {self.path}):
            if folder.is_dir():
                _fsync_dir(folder)
        shutil.rmtree(stage, ignore_errors=True)
        if stage == self.stage:
            self.stage = None

    def _discard_stage(self) -> None:
        """Delete this run's stage; finish its commit if the journal was written."""
        if self.stage is None:
            return
        journal = _read_journal(self.stage)
        if journal is not None:
            self._apply(self.stage, journal)
        shutil.rmtree(self.stage, ignore_errors=True)
        self.stage = None


def _read_journal(stage: Path) -> dict | None:
    """A stage's commit journal; None where there is none or it is unreadable
    (a kill while an older version wrote it): the run did not commit."""
    try:
        journal = json.loads((stage / JOURNAL_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    keys = ("produced", "new", "old")
    return (
        journal
        if isinstance(journal, dict) and all(k in journal for k in keys)
        else None
    )


def _remove_empty_parents(path: Path, top: Path) -> None:
    """Remove path's folders up to (not including) top while they are empty."""
    folder = path.parent
    while folder != top and top in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty: someone's files are in it
        folder = folder.parent


def _terminate(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


def _settle_tree(root: Path) -> None:
    """Make every output under root follow the umask and reach the disk.

    Some writers create files 0600 (safetensors' ``save_file``, ``tempfile``);
    outputs get the mode any file the user creates gets. fsync before the
    commit's renames, so a commit never points at unwritten data.
    """
    for folder, _dirs, files in os.walk(root):
        follow_umask(folder)
        for name in files:
            follow_umask(os.path.join(folder, name))
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))
