"""The JSON report and model-card section written with every merge."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from mergekit_tada import __version__
from mergekit_tada.adapters import sha256_file

if TYPE_CHECKING:
    from mergekit_tada.session import MergeSession

REPORT_NAME = "tada_report.json"


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=True) + "\n"


def _settings(session: MergeSession) -> dict[str, Any]:
    from importlib.metadata import version

    config = session.config
    return {
        "merge_method": config.merge_method,
        "config": config.model_dump(mode="json", exclude_none=True),
        "output_rank": session.output_rank,
        "adapter_out": session.adapter_dir.name,
        "versions": {
            "mergekit_tada": __version__,
            "mergekit": version("mergekit"),
            "torch": version("torch"),
        },
    }


def _inputs(session: MergeSession) -> dict[str, Any]:
    base_config = os.path.join(session.base_path, "config.json")
    adapters = {}
    for label, adapter in session.adapters.items():
        cfg = adapter.config
        adapters[label] = {
            "path": adapter.path,
            "files_sha256": adapter.hashes,
            "r": cfg.get("r"),
            "lora_alpha": cfg.get("lora_alpha"),
            "use_rslora": bool(cfg.get("use_rslora")),
            "modules": len(adapter.modules),
        }
    return {
        "base_model": {
            "path": str(session.base.model),
            "config_sha256": sha256_file(base_config)
            if os.path.exists(base_config)
            else None,
        },
        "adapters": adapters,
    }


def build_report(session: MergeSession) -> dict[str, Any]:
    modules = dict(sorted(session.records.items()))
    energies = [m["truncation_energy"] for m in modules.values()]
    return {
        "settings": _settings(session),
        "inputs": _inputs(session),
        "summary": {
            "modules": len(modules),
            "mean_truncation_energy": sum(energies) / len(energies)
            if energies
            else 0.0,
            "dropped_task": sum(
                len(m.get("dropped_task", [])) for m in modules.values()
            ),
            "dropped_domain": sum(
                len(m.get("dropped_domain", [])) for m in modules.values()
            ),
        },
        "modules": modules,
    }


def card_section(session: MergeSession) -> str:
    report = build_report(session)
    summary = report["summary"]
    return (
        f"## mergekit-tada: `{session.config.merge_method}`\n\n"
        f"This model was merged with the `{session.config.merge_method}` method of "
        f"[mergekit-tada](https://pypi.org/project/mergekit-tada/) {__version__}, "
        "which merges LoRA adapters in factored form and writes the result both "
        f"as this full model and as a rank-{session.output_rank} "
        f"PEFT adapter in `{session.adapter_dir.name}/`.\n\n"
        f"- modules merged: {summary['modules']}\n"
        f"- mean energy lost to truncation: {summary['mean_truncation_energy']:.4g}\n"
        f"- conflicting directions dropped: {summary['dropped_task']} task, "
        f"{summary['dropped_domain']} domain\n\n"
        f"Per-module gates, dropped directions and truncation energy: `{REPORT_NAME}`.\n"
    )
