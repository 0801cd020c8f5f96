"""TARA-Merging: one coefficient per rank-1 direction, learned from unlabeled text.

(algorithms.md section 4; arXiv 2603.26299.) Every direction of every adapter
is kept (variant A: the adapters' own factors; variant B: the shared SVD
basis of the stacked updates, per-task coefficients; directions.py). phi is
learned by minimising the smooth Tchebycheff objective over the tasks'
entropy gaps H_i(phi) - z_i (training/), once per merge; each module's merge
is then dW(phi*), exact, at rank sum r (or ``rank``).

Where this differs from the authors' code: padding positions are masked out
of the entropies; the preference vector is normalised to sum 1; causal LMs
use the next-token distribution of the LM head (the paper's heads are
classifiers).
"""

from __future__ import annotations

from typing import Any

from mergekit_tada.cache import DEFAULT_CACHE_DIR
from mergekit_tada.directions import VARIANTS
from mergekit_tada.errors import TadaError, same_for_every_tensor
from mergekit_tada.lowrank import svd
from mergekit_tada.methods.base import (
    COMMON_PARAMETERS,
    LoraMergeMethod,
    Plot,
    RunInputs,
)
from mergekit_tada.methods.params import NON_BASE, SHARED, MethodSpec, Param
from mergekit_tada.training.engines import TRAINING_MODES
from mergekit_tada.training.learners import learn_tara
from mergekit_tada.training.objective import OBJECTIVES

TARA_PLOT = "tara_loss.png"


class TaraMethod(LoraMergeMethod):
    """TARA-Merging: per-direction coefficients learned from unlabeled text.

    ``prepare`` learns phi for every module (training/learners.py); each
    module's merge is then dW(phi*) from the same directions
    (mergekit_tada/directions.py), truncated to ``rank`` if one is given.
    """

    plot_files = (TARA_PLOT,)
    needs_data = True
    spec = MethodSpec(
        name="tara",
        pretty_name="TARA-Merging (learned per-direction coefficients)",
        parameters=(
            *COMMON_PARAMETERS,
            Param("data", str | None, NON_BASE, None, "unlabeled text"),
            Param("preference", float, NON_BASE, 1.0, "rho (normalized)"),
            Param("variant", str, SHARED, "b", "a | b"),
            Param("objective", str, SHARED, "stch", "stch | linear"),
            Param("alpha", float, SHARED, 1.0, "STCH smoothing"),
            Param("steps", int, SHARED, 500),
            Param("lr", float, SHARED, 1e-3),
            Param("batch_size", int, SHARED, 16),
            Param("max_length", int, SHARED, 256),
            Param("data_samples", int, SHARED, 256, "rows read per input"),
            Param("init_lambda", float | None, SHARED, None, "phi_0 = l/T"),
            Param("training_mode", str, SHARED, "auto", "auto | memory | streamed"),
            Param("cache_dir", str, SHARED, DEFAULT_CACHE_DIR),
        ),
    )
    SETTINGS = (
        "variant",
        "objective",
        "alpha",
        "steps",
        "lr",
        "batch_size",
        "max_length",
        "data_samples",
        "init_lambda",
        "training_mode",
        "cache_dir",
    )

    def check(self, tensor: str, params: dict, inputs: dict[str, dict]) -> None:
        super().check(tensor, params, inputs)
        self.check_choices(
            tensor,
            params,
            (
                ("variant", VARIANTS),
                ("objective", OBJECTIVES),
                ("training_mode", TRAINING_MODES),
            ),
        )
        if params["pico"]:
            raise TadaError(
                "tara: pico is not supported (phi is learned on the raw updates)"
            )
        self.check_bounds(
            tensor,
            params,
            (
                *(
                    (key, 1, None)
                    for key in ("steps", "batch_size", "max_length", "data_samples")
                ),
                ("lr", 0, None, True),
                ("alpha", 0, None, True),
            ),
        )
        if params["init_lambda"] is not None and params["init_lambda"] < 0:
            raise TadaError(f"tara: init_lambda must be >= 0 for {tensor}")
        for label, p in inputs.items():
            if not p.get("data"):
                raise TadaError(
                    f"tara: model {label} needs parameters: {{data: path}}, its "
                    "unlabeled text (.txt, .jsonl with a 'text' field, or a saved dataset)"
                )
            if not p["preference"] > 0:
                raise TadaError(
                    f"tara: preference of {label} must be > 0 (got {p['preference']})"
                )

    def output_rank(self, params: dict, default: int, source_ranks: list[int]) -> int:
        return params["rank"] or sum(source_ranks)  # the natural rank: nothing cut

    def data_paths(self, plans: list) -> dict[str, str]:
        return {
            f"data of {label}": p["data"]
            for label, p in plans[0].inputs.items()
            if p.get("data")
        }

    def prepare(self, stats: Any, plans: list, run: RunInputs) -> Any:
        shared, per_input = same_for_every_tensor(
            [
                (
                    {k: p.params[k] for k in self.SETTINGS},
                    {
                        label: (i["data"], i["preference"])
                        for label, i in p.inputs.items()
                    },
                )
                for p in plans
            ],
            "tara: its settings, data and preferences must be the same for every "
            "tensor: give them as plain values (no gradients or filters)",
        )
        labels = list(run.adapters)
        return learn_tara(
            run,
            plans,
            shared,
            data={label: per_input[label][0] for label in labels},
            preference={label: per_input[label][1] for label in labels},
        )

    def combine(self, job, updates):
        learned = job.context
        module = next(m for m in job.sources.values() if m)
        phi = learned.result.phi[module]
        merged = svd(learned.directions[module].merged(phi))
        return merged, {"variant": learned.variant, "phi": phi.tolist()}

    def run_report(self, context: Any) -> dict | None:
        return context.report()

    def card_lines(
        self, records: dict[str, dict], calibration: dict | None, context: Any = None
    ) -> list:
        result = context.result
        gaps = [
            f"{label}: {before - z:+.4f} -> {after - z:+.4f}"
            for label, z, before, after in zip(
                context.labels, result.z, result.h_before, result.h_after, strict=True
            )
        ]
        return [
            f"TARA-{context.variant.upper()}: {sum(len(r['phi']) for r in records.values())} "
            f"coefficients learned over {context.settings['steps']} steps "
            f"({context.settings['objective']} objective, preference "
            f"{[round(p, 4) for p in context.preference]})",
            "entropy gap H_i - z_i, before -> after: " + "; ".join(gaps),
        ]

    def plots(self, records: dict[str, dict], context: Any) -> list[Plot]:
        if not context.result.history:
            return []
        return [Plot(TARA_PLOT, "loss_plot", "training", context.plot_data())]
