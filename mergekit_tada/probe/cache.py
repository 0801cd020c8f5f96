"""Content-addressed cache of calibration statistics.

An entry is keyed by everything that changes the statistics: the adapters'
content hashes, the calibration text actually used (after sampling and
truncation: the token ids), the calibration settings, the base weights the pass
reads, the device kind and the package version. Gate settings that may vary per
tensor (tau, clipping, scale) are applied after the cache, so changing them
reuses it.

Entries are JSON with a checksum over their payload, written to a temporary
file and renamed into place (atomic; concurrent writers each rename a complete
file). A corrupt, partial or mismatched entry is ignored and recomputed.
Hashing multi-GB base shards on every run would dominate warm runs, so file
hashes are memoized in the cache folder, keyed by path, size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from mergekit_tada import __version__
from mergekit_tada.adapters import sha256_file, write_text_atomic
from mergekit_tada.probe.calibration import ModuleStats, Stats

LOG = logging.getLogger(__name__)
DEFAULT_CACHE_DIR = "~/.cache/mergekit_tada"
_FORMAT = 1


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class StatsCache:
    """A cache that cannot be read or written is skipped with one warning line."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(os.path.expanduser(str(directory)))
        self._warned = False

    def _unusable(self, doing: str, error: BaseException) -> None:
        if not self._warned:
            LOG.warning(
                "calibration cache %s: cannot %s (%s); continuing without it",
                self.dir,
                doing,
                error,
            )
            self._warned = True

    # -- file hashes ---------------------------------------------------------

    def file_hashes(self, paths: Iterable[str]) -> dict[str, str]:
        """sha256 of each file, memoized by (resolved path, size, mtime_ns)."""
        memo_path = self.dir / "file-hashes.json"
        try:
            memo = json.loads(memo_path.read_text())
            if not isinstance(memo, dict):
                memo = {}
        except (OSError, ValueError, RecursionError):
            memo = {}
        out, changed = {}, False
        for path in sorted(paths):
            st = os.stat(path)
            key = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
            if key not in memo:
                memo[key] = sha256_file(path)
                changed = True
            out[os.path.basename(path)] = memo[key]
        if changed:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                write_text_atomic(memo_path, json.dumps(memo, sort_keys=True))
            except OSError as error:
                self._unusable("write file hashes", error)
        return out

    # -- entries ---------------------------------------------------------------

    @staticmethod
    def key(components: dict) -> str:
        return _digest({"format": _FORMAT, "version": __version__, **components})

    def entry_path(self, key: str) -> Path:
        return self.dir / f"stats-{key}.json"

    def load(self, key: str) -> Stats | None:
        path = self.entry_path(key)
        try:
            if not path.exists():
                return None
            entry = json.loads(path.read_text())
            payload = entry["stats"]
            if entry.get("key") != key or entry.get("checksum") != _digest(payload):
                raise ValueError("checksum or key mismatch")
            return {
                label: {m: ModuleStats(**s) for m, s in modules.items()}
                for label, modules in payload.items()
            }
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
            LOG.warning("ignoring corrupt calibration cache entry %s (%s)", path, error)
            return None

    def store(self, key: str, stats: Stats) -> Path | None:
        """Write an entry; None (and one warning) where the cache is unusable."""
        payload = {
            label: {m: vars(s) for m, s in sorted(modules.items())}
            for label, modules in sorted(stats.items())
        }
        entry = {"key": key, "checksum": _digest(payload), "stats": payload}
        path = self.entry_path(key)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(entry, sort_keys=True))
        except OSError as error:
            self._unusable("store an entry", error)
            return None
        return path
