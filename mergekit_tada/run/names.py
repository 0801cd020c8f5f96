"""Adapter module names against the base's checkpoint, and classifier heads.

PEFT names a module as the model it trained on did: the checkpoint's class
(``model.layers.0...``), a task model around the bare encoder a checkpoint
holds (``bert.encoder...`` of ``BertForSequenceClassification`` over a
``BertModel``'s ``encoder...``), or a name transformers gives on load
(gpt_neox's ``embed_out`` is ``lm_head``). The plan reads every adapter under
the checkpoint's names; a classifier's head (``modules_to_save``) is written
back under the task model's (adapter_writer.write_head_adapter).
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection

from mergekit_tada.adapters import LoraAdapter
from mergekit_tada.errors import TadaError
from mergekit_tada.run.outputs import ADAPTER_FILES


def align_names(adapters: dict[str, LoraAdapter], keys: Collection[str]) -> None:
    """Read an adapter whose every module is a checkpoint weight (``keys``)
    once one shared first name (``bert.``) is taken off without it."""
    for adapter in adapters.values():
        names = list(adapter.modules)
        if any(f"{m}.weight" in keys for m in names):
            continue
        firsts = {m.split(".", 1)[0] for m in names}
        if len(firsts) != 1:
            continue
        prefix = firsts.pop() + "."
        if all(f"{m.removeprefix(prefix)}.weight" in keys for m in names):
            adapter.strip_prefix(prefix)


def head_folders(
    adapters: dict[str, LoraAdapter], base_path: str, keys: Collection[str]
) -> dict[str, str]:
    """Input label -> the folder (in the adapter folder) of its head's
    adapter, for every input whose ``modules_to_save`` holds a head. A module
    the base has is refused: a full copy of a base weight has no merge rule."""
    listed = {
        label: a.config.get("modules_to_save") or [] for label, a in adapters.items()
    }
    if not any(listed.values()):
        return {}
    from mergekit_tada.streaming import meta_model

    base_modules = {n for n, _ in meta_model(base_path).named_modules()}
    base_modules |= {k.rsplit(".", 1)[0] for k in keys if "." in k}
    folders: dict[str, str] = {}
    for label, adapter in adapters.items():
        for entry in listed[label]:
            # PEFT wraps every module whose name ends so
            hit = next((m for m in sorted(base_modules) if m.endswith(entry)), None)
            if hit is not None:
                raise TadaError(
                    f"{adapter.config_path}: modules_to_save names {entry}, a "
                    f"module of the base model ({hit} in {base_path}): a full "
                    "copy of a base module has no merge rule here; only heads the "
                    "base lacks (a PEFT classifier's) are kept, one per input"
                )
        if adapter.heads:
            name = os.path.basename(adapter.path.rstrip("/"))
            name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "head"
            if name in ADAPTER_FILES:
                name += "-head"
            unique, n = name, 1
            while unique in folders.values():
                n += 1
                unique = f"{name}-{n}"
            folders[label] = unique
    return folders


def renamed_modules(
    adapters: dict[str, LoraAdapter],
    planned,
    base_path: str,
    keys: Collection[str],
) -> dict[str, str]:
    """Checkpoint module -> the name transformers, and so PEFT, gives it on
    load, where they differ (gpt_neox's ``embed_out`` is ``lm_head``):
    looked up only when an adapter names a module no planned tensor has."""
    names = {n for t in planned for ns in t.input_names.values() for n in ns}
    if all(f"{m}.weight" in names for a in adapters.values() for m in a.modules):
        return {}
    from mergekit_tada.streaming import renamed_on_load

    try:
        renamed = renamed_on_load(base_path, keys)
    except (OSError, ValueError, KeyError):  # no config transformers reads
        return {}
    return {
        key.removesuffix(".weight"): name.removesuffix(".weight")
        for key, name in renamed.items()
        if key.endswith(".weight") and name.endswith(".weight")
    }
