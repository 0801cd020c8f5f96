"""Content-addressed cache of what a merge learns from data before merging.

JSON entries: TaDA's calibration statistics (``stats-<key>.json``), TARA's
learned coefficients (``tara-<key>.json``), texts a model wrote
(``texts-<key>.json``); tensor entries: RegMean's reduced Grams
(``regmean-<key>.safetensors``). A key covers everything that
changes the entry: the adapters' content hashes, the text actually used (after
sampling and truncation: the token ids), the settings, the base weights the
pass reads, the device kind and the package version. Settings applied after
the cache (TaDA's tau, clipping and scale; the output rank) reuse it.

Entries are JSON with a checksum over their payload, or safetensors with a
sha256 of their tensors' bytes in the metadata, written to a temporary file
and renamed into place (atomic; concurrent writers each rename a complete
file). A corrupt, partial, damaged (bytes changed in place, same size) or
mismatched entry is ignored with one warning and recomputed.
Hashing multi-GB base shards on every run would dominate warm runs, so file
hashes are memoized in the cache folder, keyed by path, size and mtime.
JSON entries also hold ``lambda: auto``'s objective at every candidate
(``scale-<key>.json``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from mergekit_tada.files import sha256_file, write_text_atomic
from mergekit_tada.version import __version__

LOG = logging.getLogger(__name__)
# every cache_dir's default; MERGEKIT_TADA_CACHE moves it (the tests' own folder)
DEFAULT_CACHE_DIR = os.environ.get("MERGEKIT_TADA_CACHE", "~/.cache/mergekit_tada")
_FORMAT = 2  # 2: generic payloads (stats and tara)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def tensors_digest(tensors: dict) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, by name."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ContentCache:
    """JSON payloads by key; a cache that cannot be used is skipped with one warning."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(os.path.expanduser(str(directory)))
        self._warned = False
        # a file where the folder (or one above it) should be: said at once,
        # before the pass whose result could not be stored
        blocking = next(
            (p for p in (self.dir, *self.dir.parents) if p.exists() and not p.is_dir()),
            None,
        )
        if blocking is not None:
            self._unusable("use it", NotADirectoryError(f"{blocking} is a file"))

    def _unusable(self, doing: str, error: BaseException) -> None:
        if not self._warned:
            LOG.warning(
                "cache %s: cannot %s (%s); continuing without it",
                self.dir,
                doing,
                error,
            )
            self._warned = True

    def _write(self, path: Path, data: dict, doing: str) -> bool:
        """Write JSON atomically into the cache; False (one warning) if unusable."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(data, sort_keys=True))
        except OSError as error:
            self._unusable(doing, error)
            return False
        return True

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
            self._write(memo_path, memo, "write file hashes")
        return out

    # -- entries ---------------------------------------------------------------

    @staticmethod
    def key(components: dict) -> str:
        return _digest({"format": _FORMAT, "version": __version__, **components})

    def inputs_key(
        self, adapters: dict, base_files: Iterable[str], device, parts: dict
    ) -> str:
        """The key of an entry learned from ``adapters`` over the base: their
        content hashes, the base's file hashes and the device kind, with what
        else the entry depends on (``parts``: settings, token ids, version)."""
        return self.key(
            {
                "adapters": {label: a.hashes for label, a in adapters.items()},
                "base": self.file_hashes(base_files),
                "device": torch.device(device).type,
                **parts,
            }
        )

    def entry_path(self, key: str, kind: str = "stats") -> Path:
        return self.dir / f"{kind}-{key}.json"

    def load(self, key: str, kind: str = "stats") -> dict | None:
        """The payload stored under key, or None (missing, corrupt, unreadable)."""
        path = self.entry_path(key, kind)
        try:
            if not path.exists():
                return None
            entry = json.loads(path.read_text())
            payload = entry["payload"]
            if entry.get("key") != key or entry.get("checksum") != _digest(payload):
                raise ValueError("checksum or key mismatch")
            return payload
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
            LOG.warning("ignoring corrupt cache entry %s (%s)", path, error)
            return None

    def load_tensors(self, key: str, kind: str) -> dict | None:
        """The tensors stored under key, or None (missing, another key, or
        damaged: a digest of the tensors' bytes that does not match, or a value
        that is not finite); a damaged entry is recomputed after one warning."""
        from safetensors import safe_open

        path = self.dir / f"{kind}-{key}.safetensors"
        if not path.exists():
            return None
        try:
            with safe_open(str(path), "pt") as fh:
                metadata = fh.metadata() or {}
                if metadata.get("key") != key:
                    raise ValueError("key mismatch")
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
            if metadata.get("sha256") != tensors_digest(tensors):
                raise ValueError("its tensors do not match their digest")
            if not all(bool(t.isfinite().all()) for t in tensors.values()):
                raise ValueError("inf or NaN in its tensors")
            return tensors
        except Exception as error:  # safetensors raises its own types on damage
            LOG.warning(
                "ignoring damaged cache entry %s (%s); recomputing it", path, error
            )
            return None

    def store_tensors(self, key: str, tensors: dict, kind: str) -> Path | None:
        """Write a safetensors entry atomically (temporary file, then rename)."""
        from safetensors.torch import save_file

        path = self.dir / f"{kind}-{key}.safetensors"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.contiguous() for k, v in tensors.items()}
            metadata = {"key": key, "sha256": tensors_digest(tensors)}
            save_file(tensors, str(tmp), metadata)
            os.replace(tmp, path)
        except OSError as error:
            with contextlib.suppress(OSError):  # a file in the path: no tmp either
                tmp.unlink(missing_ok=True)
            self._unusable("store an entry", error)
            return None
        return path

    def store(self, key: str, payload: dict, kind: str = "stats") -> Path | None:
        """Write an entry; None (and one warning) where the cache is unusable."""
        entry = {"key": key, "checksum": _digest(payload), "payload": payload}
        path = self.entry_path(key, kind)
        return path if self._write(path, entry, "store an entry") else None
