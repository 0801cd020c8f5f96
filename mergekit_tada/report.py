"""The JSON report and model-card section written with every merge."""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mergekit_tada import __version__
from mergekit_tada.adapters import LoraAdapter, sha256_file

if TYPE_CHECKING:
    from mergekit_tada.methods.specs import LoraMergeMethod

GATES_PLOT = "gates.png"
_LAYER = re.compile(r"\.(\d+)\.")
# Truncation that drops more than this in any module, or on average, is
# worth a warning (with the rank that would keep 99 %).
WARN_MODULE_ENERGY, WARN_MEAN_ENERGY = 0.10, 0.05


@dataclass
class MergeFacts:
    """What the report and the model card say about one merge, as plain data."""

    method: LoraMergeMethod
    config: Any  # the configuration as the user wrote it
    output_rank: int
    adapter_out: str
    inputs: dict[str, Any]  # see describe_inputs
    records: dict[str, dict]  # module -> the method's per-module record
    calibration: dict | None = None
    context: Any = None  # what the method's prepare() returned


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


def build_report(facts: MergeFacts) -> dict[str, Any]:
    from importlib.metadata import version

    modules = dict(sorted(facts.records.items()))
    extra = facts.method.run_report(facts.context)
    return {
        **({"training": extra} if extra else {}),
        "settings": {
            "merge_method": facts.method.spec.name,
            "config": facts.config,
            "output_rank": facts.output_rank,
            "adapter_out": facts.adapter_out,
            "versions": {
                "mergekit_tada": __version__,
                "mergekit": version("mergekit"),
                "torch": version("torch"),
            },
        },
        "inputs": facts.inputs,
        "summary": {**truncation_summary(modules), **facts.method.summary(modules)},
        "modules": modules,
    }


def depth_series(
    records: dict[str, dict],
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Gate lines by depth: label -> {"task"|"domain" -> [(depth, gate)]}.

    A module inside a numbered layer is labelled by its path inside the layer
    (``self_attn.q_proj``, ``attention.output.dense``: BERT has three
    ``dense`` modules per layer); one outside the layers (a pooler,
    ``lm_head``) by its full name, one step past the last layer.
    """
    points = []
    for module, record in sorted(records.items()):
        if "task_gate" not in record:
            continue
        match = _LAYER.search(module)
        depth = int(match.group(1)) if match else None
        label = module[match.end() :] if match else module
        points.append((label, depth, record))
    past_last = max((d for _, d, _ in points if d is not None), default=-1) + 1
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for label, depth, record in points:
        for role in ("task", "domain"):
            series.setdefault(label, {}).setdefault(role, []).append(
                (past_last if depth is None else depth, record[f"{role}_gate"])
            )
    return series


def preload_plotting() -> threading.Thread:
    """Import matplotlib on a background thread while the merge runs.

    The import is most of the plot's cost (~0.7 s) and needs nothing from the
    merge; ``plot_gates``'s own import then finds it done (or waits for it).
    """
    thread = threading.Thread(target=_import_matplotlib, daemon=True)
    thread.start()
    return thread


def _import_matplotlib() -> None:
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401


def plot_gates(records: dict[str, dict], path: Path) -> bool:
    """Gates by layer depth: domain and task panels, one line per projection.

    Drawn for probe and learned gates (uniform and fixed gates are the
    configuration itself).
    Returns False (and writes nothing) when there is nothing to draw.
    """
    records = {
        m: r for m, r in records.items() if r.get("gate_mode") in ("probe", "learned")
    }
    series = depth_series(records)
    if not series:
        return False
    # The Agg Figure API directly: pyplot's import and state machine would add
    # about a second to every merge; fixed margins instead of the constrained
    # layout halve the drawing time.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    fig.subplots_adjust(left=0.06, right=0.80, bottom=0.12, top=0.86, wspace=0.06)
    axes = fig.subplots(1, 2, sharey=True)
    colors = colormaps["tab10"]
    layers = sorted(
        {p[0] for roles in series.values() for pts in roles.values() for p in pts}
    )
    for ax, role in zip(axes, ("domain", "task"), strict=True):
        for i, (proj, roles) in enumerate(sorted(series.items())):
            points = sorted(roles[role])
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                markersize=3,
                color=colors(i % 10),
                linestyle=("-", "--", ":")[i // 10 % 3],
                label=proj,
            )
        ax.set_title(f"{role} gate")
        ax.set_xlabel("layer")
        ax.set_xticks(layers if len(layers) <= 16 else layers[:: len(layers) // 16 + 1])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gate")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("TaDA gates by depth, per module of a layer")
    fig.savefig(path, dpi=100, metadata={"Software": None})  # in the run's stage
    return True


def depth_summary(records: dict[str, dict]) -> str | None:
    """Mean domain gate in the shallowest and deepest third of the layers."""
    points = [
        (int(m.group(1)), r["domain_gate"])
        for name, r in records.items()
        if (m := _LAYER.search(name)) and "domain_gate" in r
    ]
    if not points:
        return None
    layers = sorted({p[0] for p in points})
    third = max(1, len(layers) // 3)
    shallow = [g for layer, g in points if layer in layers[:third]]
    deep = [g for layer, g in points if layer in layers[-third:]]
    return (
        f"mean domain gate: {sum(shallow) / len(shallow):.3f} in the shallowest "
        f"{third} layer(s), {sum(deep) / len(deep):.3f} in the deepest {third}"
    )


def card_section(facts: MergeFacts, report: dict, plots: dict[str, str]) -> str:
    """The model card's section on this merge, in the method's own words."""
    summary = report["summary"]
    name = facts.method.spec.name
    lines = facts.method.card_lines(facts.records, facts.calibration, facts.context)
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
        + f"Per-module details: `{facts.method.report_name}`.\n"
    )
