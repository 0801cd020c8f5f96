"""The JSON report and model-card section written with every merge."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mergekit_tada import __version__
from mergekit_tada.adapters import sha256_file

if TYPE_CHECKING:
    from mergekit_tada.session import MergeSession

REPORT_NAME = "tada_report.json"
GATES_PLOT = "gates.png"
_LAYER = re.compile(r"\.(\d+)\.")


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


def _settings(session: MergeSession) -> dict[str, Any]:
    from importlib.metadata import version

    config = session.config
    return {
        "merge_method": config.merge_method,
        "config": config_as_written(config, session.source),
        "output_rank": session.output_rank,
        "adapter_out": session.adapter_out,
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
        "calibration": session.calibration_info,
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


def depth_series(
    records: dict[str, dict],
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """projection -> {"task"|"domain" -> [(layer, gate)]} for modules inside blocks."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for module, record in sorted(records.items()):
        match = _LAYER.search(module)
        if match is None or "task_gate" not in record:
            continue
        proj = module.rsplit(".", 1)[-1]
        for role in ("task", "domain"):
            series.setdefault(proj, {}).setdefault(role, []).append(
                (int(match.group(1)), record[f"{role}_gate"])
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

    Drawn for probe gates (uniform and fixed gates are the configuration itself).
    Returns False (and writes nothing) when there is nothing to draw.
    """
    records = {m: r for m, r in records.items() if r.get("gate_mode") == "probe"}
    series = depth_series(records)
    if not series:
        return False
    # The Agg Figure API directly: pyplot's import and state machine would add
    # about a second to every merge; fixed margins instead of the constrained
    # layout halve the drawing time.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    fig.subplots_adjust(left=0.06, right=0.87, bottom=0.12, top=0.86, wspace=0.06)
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
                label=proj,
            )
        ax.set_title(f"{role} gate")
        ax.set_xlabel("layer")
        ax.set_xticks(layers if len(layers) <= 16 else layers[:: len(layers) // 16 + 1])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gate")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("TaDA gates by depth, per projection")
    fig.savefig(path, dpi=100, metadata={"Software": None})  # in the run's stage
    return True


def _depth_summary(records: dict[str, dict]) -> str:
    """Mean domain gate in the shallowest and deepest third of the layers."""
    points = [
        (int(m.group(1)), r["domain_gate"])
        for name, r in records.items()
        if (m := _LAYER.search(name)) and "domain_gate" in r
    ]
    if not points:
        return ""
    layers = sorted({p[0] for p in points})
    third = max(1, len(layers) // 3)
    shallow = [g for layer, g in points if layer in layers[:third]]
    deep = [g for layer, g in points if layer in layers[-third:]]
    return (
        f"- mean domain gate: {sum(shallow) / len(shallow):.3f} in the shallowest "
        f"{third} layer(s), {sum(deep) / len(deep):.3f} in the deepest {third}\n"
    )


def card_section(session: MergeSession, report: dict) -> str:
    summary = report["summary"]
    calibration = session.calibration_info
    probe = ""
    if calibration:
        probe = (
            f"- gates from the calibration probe over {calibration['prompts']} prompts "
            f"({calibration['tokens']} tokens) of `{calibration['path']}`\n"
        )
    plot = f"Gates by depth: `{GATES_PLOT}`. " if "gates_plot" in report else ""
    return (
        f"## mergekit-tada: `{session.config.merge_method}`\n\n"
        f"This model was merged with the `{session.config.merge_method}` method of "
        f"mergekit-tada {__version__}, which merges LoRA adapters in factored form "
        "and writes the result both as this full model and as a "
        f"rank-{session.output_rank} PEFT adapter in `{session.adapter_out}/`.\n\n"
        f"- modules merged: {summary['modules']}\n"
        f"{probe}{_depth_summary(session.records)}"
        f"- mean energy lost to truncation: {summary['mean_truncation_energy']:.4g}\n"
        f"- conflicting directions dropped: {summary['dropped_task']} task, "
        f"{summary['dropped_domain']} domain\n\n"
        f"{plot}Per-module gates, probes, dropped directions and truncation energy: "
        f"`{REPORT_NAME}`.\n"
    )
