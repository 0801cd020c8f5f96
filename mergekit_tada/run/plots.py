"""The pictures of a merge: methods ask for them as data (methods/base.Plot),
these functions draw them into the run's stage folder.

Drawn with matplotlib's Agg ``Figure`` API directly: pyplot's import and state
machine would add about a second to every merge.
"""

from __future__ import annotations

import threading
from pathlib import Path

from mergekit_tada.methods.base import Plot
from mergekit_tada.probe.gates import depth_series


def draw(plots: list[Plot], folder: Path) -> dict[str, str]:
    """Draw every plot into ``folder``: report key -> file, for those drawn."""
    drawn = {}
    for plot in plots:
        if DRAWINGS[plot.kind](plot.data, folder / plot.file):
            drawn[plot.key] = plot.file
    return drawn


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
    # fixed margins instead of the constrained layout halve the drawing time
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


def plot_training(data: dict, path: Path) -> bool:
    """Psi and each H_i - z_i over the steps (``tara_loss.png``); ``data`` from
    ``LearnedCoefficients.plot_data``."""
    from matplotlib.figure import Figure

    history = data["history"]
    steps = [h["step"] for h in history]
    fig = Figure(figsize=(9, 3.6))
    fig.subplots_adjust(left=0.08, right=0.72, bottom=0.15, top=0.86, wspace=0.3)
    left, right = fig.subplots(1, 2)
    left.plot(steps, [h["psi"] for h in history], color="black")
    left.set_title(f"objective ({data['objective']})")
    left.set_xlabel("step")
    for i, label in enumerate(data["labels"]):
        right.plot(steps, [h["gaps"][i] for h in history], label=label)
    right.set_title("H_i - z_i per input")
    right.set_xlabel("step")
    right.axhline(0.0, color="grey", linewidth=0.5)
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"TARA-{data['variant'].upper()} training")
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return True


DRAWINGS = {"gates": plot_gates, "training": plot_training}
