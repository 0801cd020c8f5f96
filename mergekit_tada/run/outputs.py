"""Which files in an output folder an earlier merge wrote: the only ones a
new merge may replace or remove (run/folder.py commits them file by file).

The files listed in ``.mergekit-tada-outputs.json`` (written by every commit:
version 2 lists relative file paths, so ``adapter/adapter_config.json`` and
never ``adapter/``; an older, unversioned manifest listed top-level names, and
an adapter folder named there gives only its PEFT files). In a folder written
by stock mergekit or mergekit-tada 0.1.0 (no manifest): mergekit's files
(shards, index, config, tokenizer, ``mergekit_config.yml``, a README that is a
mergekit model card), our report and plots, and the PEFT files of the adapter
folder the old report names.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

LOG = logging.getLogger(__name__)

MANIFEST_NAME = ".mergekit-tada-outputs.json"
MANIFEST_VERSION = 2  # 2: relative file paths; 1 (unversioned): top-level names
CARD = "README.md"
# Files stock mergekit writes into an output folder.
MERGEKIT_OUTPUTS = (
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "config.json",
    "generation_config.json",
    "mergekit_config.yml",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.jinja",
)
# Files mergekit-tada 0.1.0 wrote beside them (before the manifest existed).
LEGACY_OUTPUTS = ("tada_report.json", "gates.png")
# What an adapter writer puts into the adapter folder: all an older manifest's
# (or report's) adapter folder is known to hold of ours.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def earlier_outputs(folder: Path) -> set[str]:
    """Files an earlier merge wrote into ``folder``, as relative paths."""
    manifest = folder / MANIFEST_NAME
    if manifest.exists():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            listed = [str(n) for n in data["outputs"]]
            versioned = data.get("version") == MANIFEST_VERSION
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            LOG.warning("ignoring unreadable %s", manifest)
        else:
            found = {MANIFEST_NAME}
            for name in listed:
                if not _inside(name):
                    continue  # a hand-edited manifest never reaches outside
                if versioned:
                    found |= _existing_files(folder, [name])
                else:  # an older manifest lists the adapter folder whole
                    found |= _existing_files(folder, [name], folder_files=True)
            return found
    names = set(os.listdir(folder))
    found: set[str] = set()
    if "mergekit_config.yml" in names or "tada_report.json" in names:
        found |= {
            n for n in names if any(fnmatch.fnmatch(n, p) for p in MERGEKIT_OUTPUTS)
        }
        found |= {n for n in LEGACY_OUTPUTS if n in names}
        if CARD in names and _is_mergekit_card(folder / CARD):
            found.add(CARD)
        old_adapter = _legacy_adapter_name(folder / "tada_report.json")
        if old_adapter in names:
            found |= _existing_files(folder, [old_adapter], folder_files=True)
    return {n for n in found if (folder / n).is_file() or (folder / n).is_symlink()}


def _existing_files(
    folder: Path, names: Iterable[str], folder_files: bool = False
) -> set[str]:
    """The files among ``names``; a folder gives its PEFT adapter files
    (``folder_files``) or nothing: a folder is never an output as a whole."""
    found = set()
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            if folder_files:
                found |= {f"{name}/{f}" for f in ADAPTER_FILES if (path / f).is_file()}
        elif path.is_file() or path.is_symlink():
            found.add(name)
    return found


def _inside(name: str) -> bool:
    """A relative path that stays inside the folder (no '..', not absolute)."""
    parts = name.split("/")
    return (
        bool(name) and not os.path.isabs(name) and ".." not in parts and "" not in parts
    )


def relative_files(root: Path) -> list[str]:
    """Every file under root as a '/'-joined relative path, sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        rel = Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in files]
        found += [(rel / d).as_posix() for d in dirs if (Path(folder) / d).is_symlink()]
    return sorted(found)


def _is_mergekit_card(path: Path) -> bool:
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return False
    return "mergekit" in head


def _legacy_adapter_name(report: Path) -> str | None:
    try:
        name = json.loads(report.read_text(encoding="utf-8"))["settings"]["adapter_out"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and "/" not in name and name else None
