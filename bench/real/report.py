"""Tables and a picture of the real-weights benchmark (results.json -> Markdown, PNG)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from run import REGIMES, accuracy, bootstrap, harmonic

ALONE = "adapter alone (own task)"


def _ms(values: list[float]) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"


def regime_table(per_seed: dict) -> tuple[list[str], dict]:
    seeds = sorted(per_seed)
    methods = list(dict.fromkeys(m for s in seeds for m in per_seed[s]))
    summary = {}
    lines = [
        "| method | combined | control | H | c* | combined (tuned) | control (tuned) | H (tuned) | 95 % CI of H (tuned) | merge s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    # the combined test first, the task control second (run.run_regime)
    combined, control = per_seed[seeds[0]][methods[0]]["default"]

    def h(results, _i=0):
        return harmonic(accuracy(results[combined]), accuracy(results[control]))

    for m in methods:
        have = [s for s in seeds if m in per_seed[s]]
        rows = [per_seed[s][m] for s in have]
        cells = []
        for which in ("default", "tuned"):
            comb = [accuracy(r[which][combined]) for r in rows]
            ctrl = [accuracy(r[which][control]) for r in rows]
            hs = [h(r[which]) for r in rows]
            cells.append((comb, ctrl, hs))
            summary.setdefault(m, {})[which] = statistics.mean(hs)
        low, high = bootstrap([r["tuned"] for r in rows], h)
        scales = "/".join(f"{r['scale']:g}" for r in rows)
        seconds = statistics.mean(r["seconds"] for r in rows)
        (c0, k0, h0), (c1, k1, h1) = cells
        name = m if len(have) == len(seeds) else f"{m} (seed {'/'.join(have)} only)"
        lines.append(
            f"| {name} | {_ms(c0)} | {_ms(k0)} | {_ms(h0)} | {scales} | {_ms(c1)} | "
            f"{_ms(k1)} | {_ms(h1)} | {100 * low:.1f} – {100 * high:.1f} | {seconds:.1f} |"
        )
    return lines, summary


def multitask_table(per_seed: dict) -> tuple[list[str], dict]:
    """Rows over the seeds that have them (``run.py --skip`` leaves some out)."""
    seeds = sorted(per_seed)
    methods = list(dict.fromkeys(m for s in seeds for m in per_seed[s] if m != ALONE))
    tasks = list(per_seed[seeds[0]][ALONE]["default"])
    alone = {
        s: {t: accuracy(per_seed[s][ALONE]["default"][t]) for t in tasks} for s in seeds
    }

    lines = [
        "| method | "
        + " | ".join(tasks)
        + " | normalised (c = 1) | c* | normalised (tuned) | 95 % CI | merge s |",
        "|---|" + "---|" * len(tasks) + "---|---|---|---|---|",
    ]
    lines.append(
        f"| {ALONE} | "
        + " | ".join(_ms([alone[s][t] for s in seeds]) for t in tasks)
        + " | 100 | | 100 | | |"
    )
    summary = {}
    for m in methods:
        have = [s for s in seeds if m in per_seed[s]]
        rows = [per_seed[s][m] for s in have]

        def normalised(results, i, have=have):
            return statistics.mean(
                accuracy(results[t]) / max(alone[have[i]][t], 1e-9) for t in tasks
            )

        per_task = [_ms([accuracy(r["tuned"][t]) for r in rows]) for t in tasks]
        default = [normalised(r["default"], i) for i, r in enumerate(rows)]
        tuned = [normalised(r["tuned"], i) for i, r in enumerate(rows)]
        low, high = bootstrap([r["tuned"] for r in rows], normalised)
        summary[m] = {
            "default": statistics.mean(default),
            "tuned": statistics.mean(tuned),
        }
        name = m if len(have) == len(seeds) else f"{m} (seed {'/'.join(have)} only)"
        lines.append(
            f"| {name} | "
            + " | ".join(per_task)
            + f" | {_ms(default)} | "
            + "/".join(f"{r['scale']:g}" for r in rows)
            + f" | {_ms(tuned)} | {100 * low:.1f} – {100 * high:.1f} | "
            f"{statistics.mean(r.get('seconds', 0.0) for r in rows):.1f} |"
        )
    return lines, summary


def normalised_accuracy(seed: dict, results: dict) -> float:
    """Mean over tasks of the accuracy over the adapter's own, in %, one seed."""
    alone = seed[ALONE]["default"]
    return 100 * statistics.mean(
        accuracy(results[t]) / max(accuracy(alone[t]), 1e-9) for t in alone
    )


def scored_at(seed: dict, rule: str, auto: str, scale: float) -> float | None:
    """``rule``'s normalised accuracy at the absolute ``scale`` where the bench
    scored it (its c = 1 and label-tuned rows; the ``auto`` row's choice and
    its label-tuned multiple of it), else None."""
    plain, searched = seed[rule], seed[auto]
    for at, results in (
        (1.0, plain["default"]),
        (plain["scale"], plain["tuned"]),
        (searched["auto"], searched["default"]),
        (searched["auto"] * searched["scale"], searched["tuned"]),
    ):
        if at == scale:
            return normalised_accuracy(seed, results)
    return None


def per_seed_table(per_seed: dict, rows: list[str]) -> list[str]:
    """Multi-task ``rows`` seed by seed: normalised accuracy as written (c = 1),
    label-tuned, the label-tuned multiplier c* and ``lambda: auto``'s choice:
    what "better on every seed" is read from."""
    seeds = sorted(per_seed)
    lines = [
        "| method | "
        + " | ".join(f"seed {s}: c = 1 / tuned (c*, auto)" for s in seeds)
        + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for m in rows:
        cells = []
        for s in seeds:
            r = per_seed[s].get(m)
            if r is None:
                cells.append("–")
                continue
            auto = f", auto {r['auto']:g}" if "auto" in r else ""
            cells.append(
                f"{normalised_accuracy(per_seed[s], r['default']):.1f} / {normalised_accuracy(per_seed[s], r['tuned']):.1f}"
                f" ({r['scale']:g}{auto})"
            )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def plot(summaries: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    panels = [(k, v) for k, v in summaries.items() if v]
    fig = Figure(
        figsize=(5.5 * len(panels), 1.2 + 0.32 * max(len(v) for _, v in panels))
    )
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, summary) in zip(axes, panels, strict=True):
        names = list(summary)[::-1]
        y = range(len(names))
        ax.barh(
            [i + 0.2 for i in y],
            [100 * summary[n]["tuned"] for n in names],
            0.4,
            label="scale tuned",
        )
        ax.barh(
            [i - 0.2 for i in y],
            [100 * summary[n]["default"] for n in names],
            0.4,
            label="c = 1",
        )
        short = [n.replace("add_weighted_adapter ", "") for n in names]
        ax.set_yticks(list(y), short, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.subplots_adjust(left=0.12, right=0.98, wspace=0.75, top=0.92, bottom=0.08)
    fig.savefig(path, dpi=100, metadata={"Software": None})


def write_report(results: dict, folder: Path, quick: bool = False) -> Path:
    lines, summaries = [], {}
    for part in REGIMES:
        title = "TaDA's regime" if part == "regime" else f"{part} regime"
        if results.get(part):
            table, summaries[f"{title}: H of combined and control (%)"] = regime_table(
                results[part]
            )
            lines += [f"### {title} ({len(results[part])} seed(s))", "", *table, ""]
    for part, title, heading in (
        ("multitask", "five tasks at once", "Multi-task"),
        ("minilm", "MiniLM, per-task heads", "Multi-task on MiniLM, a head per task"),
    ):
        if results.get(part):
            table, summaries[f"{title}: mean normalised accuracy (%)"] = (
                multitask_table(results[part])
            )
            seeds = len(results[part])
            lines += [f"### {heading} ({seeds} seed(s))", "", *table, ""]
    if results.get("lmeval"):
        lines += [
            "### lm-eval-harness agreement",
            "",
            "```",
            json.dumps(results["lmeval"], indent=1),
            "```",
            "",
        ]
    out = folder / "tables.md"
    out.write_text("\n".join(lines) + "\n")
    if summaries:
        plot(summaries, folder / "accuracy.png")
    print("\n".join(lines))
    return out
