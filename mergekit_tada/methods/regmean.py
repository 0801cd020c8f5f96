"""RegMean (Jin et al., ICLR 2023) from unlabelled prompts, exact in LoRA factors.

RegMean merges each linear module so that the merged model reproduces every
model's outputs on that model's own inputs, in least squares:

    dW* = (sum_t w_t dW_t G~_t) (sum_t G~_t)^-1,   G~ = alpha G + (1 - alpha) diag(G)

with G_t the Gram of the module's input in model t (base + adapter t) over
model t's prompts (``data:`` per model: a file of unlabelled prompts, or
``generate``: texts model t writes itself, probe/generate.py). With dW_t =
B_t A_t the product is [w_1 B_1 ... w_T B_T] . stack_t(A_t G~_t) . (sum G~)^-1:
rank at most sum r before truncation to ``rank``, never a dense d_out x d_in
matrix. The streamed pass (probe/grams.py) reduces each module to
R_t = (A_t G~_t)(sum G~)^-1 right after its block, and caches the R_t by
content; a merge then costs a factored SVD per module.

``grams: base`` takes the inputs from the base model instead (cheaper to
reason about, and what the probe's pass sees): measured against ``model`` in
docs/quality-real.md. ``grams: merged`` is RegMean++ (Nguyen et al., TMLR
2026): block by block, model t's Grams come from its own block (base +
adapter t) run on the states of the merged model (every block below already
merged) for t's prompts; each merged block is the closed form
sum_t w_t B_t R_t as solved, before truncation to ``rank`` and before
``lambda`` (so one cached pass serves every rank and scale). Weights scale each model's term of the numerator (at
1, RegMean); ``lambda`` scales the merged update.

Where this differs from FusionBench's RegMean (docs/parity.md): padding
tokens are left out of the Grams; the update alone is merged (the base is
the same in every model, so the full-weight closed form gives W0 + dW*).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mergekit_tada.cache import ContentCache
from mergekit_tada.errors import TadaError, same_for_every_tensor
from mergekit_tada.lowrank import Factored, svd
from mergekit_tada.methods.base import (
    AUTO_SETTINGS,
    WEIGHT,
    FamilyMethod,
    RunInputs,
    family_spec,
    scale_param,
)
from mergekit_tada.methods.params import NON_BASE, SHARED, Param

LOG = logging.getLogger(__name__)
GENERATE = "generate"
GRAMS = ("model", "base", "merged")


@dataclass
class Reduced:
    """What the Gram pass left per (model label, module): R_t, and the facts."""

    R: dict[tuple[str, str], torch.Tensor]
    report: dict = field(default_factory=dict)


class LoraRegMean(FamilyMethod):
    needs_data = True
    spec = family_spec(
        "lora_regmean",
        "RegMean from unlabelled prompts, on LoRA factors",
        (
            WEIGHT,
            Param("data", str | None, NON_BASE, None, "prompts file, or generate"),
            Param("alpha", float, SHARED, 0.9, "off-diagonal scaling of each Gram"),
            Param("grams", str, SHARED, "model", "model | base | merged: whose inputs"),
            Param("samples", int, SHARED, 64, "prompts read (or written) per model"),
            Param("max_length", int, SHARED, 256, "tokens per prompt at most"),
            Param("batch_size", int, SHARED, 8),
            Param("generate_length", int, SHARED, 64, "tokens per written text"),
            Param("seed", int, SHARED, 0, "sampling seed of data: generate"),
            scale_param(),
            *AUTO_SETTINGS,
        ),
    )
    SETTINGS = (
        "alpha",
        "grams",
        "samples",
        "max_length",
        "batch_size",
        "generate_length",
        "seed",
        "cache_dir",
    )

    def check(self, tensor: str, params: dict, inputs: dict[str, dict]) -> None:
        super().check(tensor, params, inputs)
        self.check_choices(tensor, params, (("grams", GRAMS),))
        self.check_bounds(
            tensor,
            params,
            (
                ("alpha", 0, 1),
                *(
                    (key, 1, None)
                    for key in (
                        "samples",
                        "max_length",
                        "batch_size",
                        "generate_length",
                    )
                ),
            ),
        )
        if params["pico"]:
            raise TadaError(
                "lora_regmean: pico is not supported (the Grams are of the "
                f"adapters as trained; at {tensor})"
            )
        missing = [label for label, p in inputs.items() if not p.get("data")]
        if missing:
            given = "" if len(missing) == len(inputs) else " (the others have data)"
            raise TadaError(
                f"lora_regmean: model(s) {', '.join(missing)} need parameters: "
                f"{{data: path}}{given}: a file of unlabelled prompts (.txt, .jsonl "
                "with a 'text' field, or a saved dataset), or data: generate"
            )

    def prepare(self, stats: Any, plans: list, run: RunInputs) -> Reduced:
        shared, data = same_for_every_tensor(
            [
                (
                    {k: p.params[k] for k in self.SETTINGS},
                    {label: i["data"] for label, i in p.inputs.items()},
                )
                for p in plans
            ],
            "lora_regmean: its settings and data must be the same for every tensor: "
            "give them as plain values (no gradients or filters)",
        )
        from mergekit_tada.batches import (
            batches_digest,
            make_batches,
            token_count,
            tokenizer_for,
        )
        from mergekit_tada.probe.grams import GRAM_PASS_VERSION, gram_pass

        merged_weights = None
        if shared["grams"] == "merged":
            merged_weights = {
                (label, source): float(p.inputs[label]["weight"])
                for p in plans
                for label, source in p.sources.items()
                if source
            }
        cache = ContentCache(shared["cache_dir"])
        texts = self._texts(run, shared, data, cache)
        tokenizer = tokenizer_for(run.base_path, "lora_regmean: data")
        batches = {
            t: make_batches(
                tokenizer,
                texts[t],
                shared["max_length"],
                shared["batch_size"],
                f"lora_regmean: data of {t} ({data[t]})",
            )
            for t in run.adapters
        }
        key = cache.inputs_key(
            run.adapters,
            run.base_files,
            run.device,
            {
                "tokens": {t: batches_digest(b) for t, b in batches.items()},
                "alpha": shared["alpha"],
                "grams": shared["grams"],
                # RegMean++'s states flow through the merge, which the weights shape
                "weights": sorted(merged_weights.items()) if merged_weights else None,
                "pass": GRAM_PASS_VERSION,
            },
        )
        found = cache.load_tensors(key, "regmean")
        start = time.perf_counter()
        if found is None:
            reduced = gram_pass(
                run.base_path,
                batches,
                run.adapters,
                shared["alpha"],
                shared["grams"] != "base",
                merged_weights=merged_weights,
                device=run.device,
                quiet=run.quiet,
            )
            cache.store_tensors(
                key, {f"{t}|{m}": R for (t, m), R in reduced.items()}, "regmean"
            )
        else:
            reduced = {tuple(k.split("|", 1)): R for k, R in found.items()}
        report = {
            "grams": shared["grams"],
            "alpha": shared["alpha"],
            "data": dict(data),
            "prompts": {t: len(texts[t]) for t in run.adapters},
            "tokens": {t: token_count(b) for t, b in batches.items()},
            "cache_key": key,
            "cache_hit": found is not None,
            "pass_seconds": round(time.perf_counter() - start, 3),
        }
        return Reduced(reduced, report)

    def _texts(self, run: RunInputs, shared: dict, data: dict, cache) -> dict:
        """Each model's prompts: read from its file, or written by the model."""
        from mergekit_tada.probe.generate import generated_texts
        from mergekit_tada.texts import read_texts

        wanted = [t for t, d in data.items() if d == GENERATE]
        texts = {}
        if wanted:
            texts = generated_texts(
                run.base_path,
                run.base_files,
                {t: run.adapters[t] for t in wanted},
                shared,
                cache,
                run.device,
            )
        for t, path in data.items():
            if path != GENERATE:
                texts[t] = read_texts(
                    path, f"lora_regmean: data of {t}", limit=shared["samples"]
                )
        return texts

    def combine(self, job, updates):
        weights = self.per_input(job, updates, "weight")
        scale = job.params["lambda"]
        present = [
            (label, u, w)
            for (label, u), w in zip(updates.items(), weights, strict=True)
            if u is not None
        ]
        R = job.context.R
        B = torch.cat([w * scale * u.B.float() for _, u, w in present], dim=1)
        A = torch.cat([R[(label, job.sources[label])] for label, _, _ in present])
        return svd(Factored(B, A.to(B.device))), {"weights": weights}

    def run_report(self, context: Any) -> dict | None:
        return {"regmean": context.report}

    def card_lines(
        self, records: dict[str, dict], calibration: dict | None, context: Any = None
    ) -> list:
        report = context.report
        whose = {
            "model": "each model (base + its adapter)",
            "base": "the base model",
            "merged": "each model's blocks on the merged model's states (RegMean++)",
        }
        return [
            *super().card_lines(records, calibration, context),
            f"RegMean: module-input Grams of {whose[report['grams']]} (alpha "
            f"{report['alpha']}) over {sum(report['tokens'].values())} tokens of "
            "unlabelled prompts "
            f"({', '.join(f'{t}: {n}' for t, n in report['prompts'].items())})",
        ]
