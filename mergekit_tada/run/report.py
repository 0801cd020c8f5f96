"""The JSON report and the model-card section written with every merge, from plain data.

The run (run/execute.py) asks the method for what it says about the merge
(its report section, summary totals, card lines) and hands it over as
:class:`MergeFacts`; nothing here knows a method.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import yaml

from mergekit_tada.adapters import LoraAdapter
from mergekit_tada.files import sha256_file
from mergekit_tada.version import __version__

# Truncation that drops more than this in any module, or on average, is
# worth a warning (with the rank that would keep 99 %).
WARN_MODULE_ENERGY, WARN_MEAN_ENERGY = 0.10, 0.05


@dataclass
class MergeFacts:
    """What the report and the model card say about one merge, as plain data."""

    method: str  # merge_method
    report_name: str
    config: Any  # the configuration as the user wrote it
    output_rank: int
    adapter_out: str
    inputs: dict[str, Any]  # see describe_inputs
    records: dict[str, dict]  # module -> the method's per-module record
    summary: dict  # the method's own totals
    card_lines: list[str]  # the method's own words for the model card
    training: dict | None = None  # the method's report section on its prepare()
    # input label -> its head's adapter, relative to the output folder
    head_adapters: dict[str, str] | None = None


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=True) + "\n"


def config_as_written(config: Any, source: str | None) -> Any:
    """The configuration as the user wrote it (the YAML), else a plain-data dump.

    mergekit's own serializer fails on paths with spaces or quotes (its
    ``ModelReference`` serializer returns itself), so the fallback dumps
    Python objects and turns references into their strings.
    """
    if source:
        return yaml.safe_load(source)
    data = config.model_dump(mode="python", exclude_none=True)
    return json.loads(json.dumps(data, default=str))


def describe_inputs(
    base: str, base_path: str, adapters: dict[str, LoraAdapter], calibration: Any
) -> dict[str, Any]:
    """The report's ``inputs``: base, adapters with content hashes, calibration."""
    base_config = os.path.join(base_path, "config.json")
    described = {}
    for label, adapter in adapters.items():
        cfg = adapter.config
        described[label] = {
            "path": adapter.path,
            "files_sha256": adapter.hashes,
            "r": cfg.get("r"),
            "lora_alpha": cfg.get("lora_alpha"),
            "use_rslora": bool(cfg.get("use_rslora")),
            "modules": len(adapter.modules),
        }
    return {
        "calibration": calibration,
        "base_model": {
            "path": base,
            "config_sha256": sha256_file(base_config)
            if os.path.exists(base_config)
            else None,
        },
        "adapters": described,
    }


def truncation_summary(records: dict[str, dict]) -> dict[str, Any]:
    energies = [m["truncation_energy"] for m in records.values()]
    return {
        "modules": len(records),
        "mean_truncation_energy": sum(energies) / len(energies) if energies else 0.0,
        "max_truncation_energy": max(energies, default=0.0),
        # the smallest output rank that keeps 99 % of every module's energy
        "suggested_rank": max(
            (m.get("rank_99", 0) for m in records.values()), default=0
        ),
    }


def truncation_warning(summary: dict[str, Any], rank: int) -> str | None:
    """One line when the output rank drops much of the merged update."""
    worst, mean = summary["max_truncation_energy"], summary["mean_truncation_energy"]
    if worst <= WARN_MODULE_ENERGY and mean <= WARN_MEAN_ENERGY:
        return None
    return (
        f"rank {rank} drops up to {worst:.0%} of a module's merged update "
        f"(mean {mean:.1%}); rank {summary['suggested_rank']} would keep 99 % in "
        "every module (suggested_rank in the report)"
    )


def zero_update_warning(records: dict[str, dict]) -> str | None:
    """One line when every module's merged update is zero: the output is the base."""
    if records and all(r.get("rank_99", 1) == 0 for r in records.values()):
        return (
            f"the merged update is zero in every module ({len(records)}): the output "
            "is the base model (check the weights, density, alpha or lambda)"
        )
    return None


def build_report(facts: MergeFacts) -> dict[str, Any]:
    from importlib.metadata import version

    modules = dict(sorted(facts.records.items()))
    return {
        **({"training": facts.training} if facts.training else {}),
        "settings": {
            "merge_method": facts.method,
            "config": facts.config,
            "output_rank": facts.output_rank,
            "adapter_out": facts.adapter_out,
            **({"head_adapters": facts.head_adapters} if facts.head_adapters else {}),
            "versions": {
                "mergekit_tada": __version__,
                "mergekit": version("mergekit"),
                "torch": version("torch"),
            },
        },
        "inputs": facts.inputs,
        "summary": {**truncation_summary(modules), **facts.summary},
        "modules": modules,
    }


def card_section(facts: MergeFacts, report: dict, plots: dict[str, str]) -> str:
    """The model card's section on this merge, in the method's own words."""
    summary = report["summary"]
    name, lines = facts.method, facts.card_lines
    plots = [f"`{p}`" for p in plots.values()]
    return (
        f"## mergekit-tada: `{name}`\n\n"
        f"This model was merged with the `{name}` method of "
        f"mergekit-tada {__version__}, which merges LoRA adapters in factored form "
        "and writes the result both as this full model and as a "
        f"rank-{facts.output_rank} PEFT adapter in `{facts.adapter_out}/`.\n\n"
        f"- modules merged: {summary['modules']}\n"
        + "".join(f"- {line}\n" for line in lines)
        + f"- mean energy lost to truncation: {summary['mean_truncation_energy']:.4g} "
        f"(rank {summary['suggested_rank']} keeps 99 %)\n\n"
        + (f"Plots: {', '.join(plots)}. " if plots else "")
        + f"Per-module details: `{facts.report_name}`.\n"
    )
