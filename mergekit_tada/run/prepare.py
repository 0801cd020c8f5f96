"""What a method needs before merging: calibration passes, learned coefficients,
a global scale chosen on data.

Runs after planning, before any output exists: the calibration passes a
method asks for (probe/cache.py: from the cache or computed), then the
method's own ``prepare`` (TaDA's probe table, TARA's learned phi), then, for
``lambda: auto`` (TSV-M: ``alpha: auto``), the scale: every module merged at
scale 1, the candidates scored on each model's prompts in one streamed pass
(probe/agreement.py), and the winner written into every tensor's parameters.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_tada.adapters import HEAD_TASK_MODELS
from mergekit_tada.cache import ContentCache, tensors_digest
from mergekit_tada.errors import TadaError, same_for_every_tensor
from mergekit_tada.lowrank import Factored, single_thread
from mergekit_tada.methods.base import AUTO, AUTO_DATA, ModuleJob, RunInputs
from mergekit_tada.run.plan import MergePlan, TensorPlan

LOG = logging.getLogger(__name__)
# objectives that count agreeing decisions (then KL): two values per candidate
DECIDED = ("response", "head")


@dataclass(frozen=True)
class Prepared:
    context: Any  # what the method's prepare() returned
    calibration: dict | None  # what the report says of the calibration
    scale: dict | None = None  # what the report says of lambda: auto


def module_job(
    plan: MergePlan,
    target: TensorPlan,
    context: Any,
    device: torch.device,
    params: dict | None = None,
) -> ModuleJob:
    """One module's merge job: its factors read from every adapter."""
    updates = {
        label: plan.adapters[label].factors(module, device) if module else None
        for label, module in target.sources.items()
    }
    return ModuleJob(
        module=target.module,
        updates=updates,
        params=target.params if params is None else params,
        inputs=target.inputs,
        sources=target.sources,
        rank=target.rank,
        seed=plan.options.random_seed or 0,
        context=context,
    )


def prepare(plan: MergePlan) -> Prepared:
    """Run (or read from the cache) what the method needs before merging."""
    targets = plan.targets
    device = plan.options.device or "cpu"
    base_files = plan.base_files()  # listed once: cache keys of both phases
    stats, calibration = _calibrate(plan, targets, torch.device(device), base_files)
    run = RunInputs(
        base_path=plan.base_path,
        base_files=base_files,
        adapters=plan.adapters,
        device=device,
        quiet=plan.options.quiet,
    )
    context = plan.method.prepare(stats, targets, run)
    return Prepared(context, calibration, _choose_scale(plan, context, run))


def _choose_scale(plan: MergePlan, context: Any, run: RunInputs) -> dict | None:
    """``lambda: auto``: the grid's scale whose merge agrees best with each
    model on its prompts, written into every target's parameters."""
    method, key = plan.method, plan.method.scale_key
    name = method.spec.name
    targets = plan.targets
    data = [i.get("data") for t in targets for i in t.inputs.values()]
    # unset where auto is the default (a scale whose default is None): auto
    # given every model's data (methods without a global scale have no key)
    unset = [t for t in targets if key in t.params and t.params[key] is None]
    by_default = bool(unset)
    every = all(d and d != "generate" for d in data)
    for t in unset:
        t.params[key] = AUTO if every else 1.0
    auto = [t.params.get(key) == AUTO for t in targets]
    if not any(auto):
        if AUTO_DATA in method.spec.parameters and any(data):
            LOG.warning(
                "%s: data is read only by %s: auto, and %s is not auto: the "
                "prompts are not read (set %s: auto, with data for every model, "
                "to choose the scale on them)",
                name,
                key,
                key,
                key,
            )
        return None
    settings, data = same_for_every_tensor(
        [
            (
                {
                    k: t.params[k]
                    for k in (
                        "auto_samples",
                        "auto_max_length",
                        "auto_objective",
                        "cache_dir",
                    )
                },
                {label: i["data"] for label, i in t.inputs.items()},
            )
            for t in targets
        ]
        + ([] if all(auto) else [None]),
        f"{name}: {key}: auto, its data and settings must be the same for every "
        "tensor: give them as plain values (no gradients or filters)",
    )
    from mergekit_tada.batches import (
        batches_digest,
        is_causal_lm,
        make_batches,
        tokenizer_for,
    )
    from mergekit_tada.probe.agreement import (
        AGREEMENT_PASS_VERSION,
        GRID,
        agreement_pass,
    )
    from mergekit_tada.texts import read_texts

    causal = is_causal_lm(run.base_path)
    objective = settings["auto_objective"]

    def classifier(label: str, kinds=HEAD_TASK_MODELS) -> bool:
        """Whether the model has a head transformers' task model reads."""
        adapter = run.adapters[label]
        return bool(adapter.heads) and adapter.config.get("task_type") in kinds

    # the defaults measured on MiniLM classifiers (docs/quality-real.md):
    # sequence classifiers are compared on their heads' decisions, and every
    # classifier on 64 prompts (token classifiers: tokens at 64 came within a
    # point of the labels' scale where 16 did not; their heads did no better)
    if objective is None:
        sequences = all(classifier(label, ("SEQ_CLS",)) for label in data)
        objective = "head" if sequences else "tokens"
    samples = settings["auto_samples"]
    if samples is None:
        samples = 64 if all(classifier(label) for label in data) else 16
    if objective == "response" and not causal:
        raise TadaError(
            f"{name}: auto_objective: response reads the next token after each "
            f"prompt, and the base {run.base_path} is not a causal LM: use "
            "auto_objective: tokens"
        )
    if objective == "head":
        headless = [label for label in data if not classifier(label)]
        if headless:
            raise TadaError(
                f"{name}: auto_objective: head reads each model's classifier "
                "head (a PEFT SEQ_CLS, TOKEN_CLS or QUESTION_ANS adapter's "
                "modules_to_save), and "
                f"{run.adapters[headless[0]].path} is not one: use auto_objective: "
                "tokens"
            )
    device = torch.device(run.device)
    merged = {}
    for target in targets:
        job = module_job(plan, target, context, device, {**target.params, key: 1.0})
        with single_thread(device):
            lora = method.merge_module(job).lora
        source = next(m for m in target.sources.values() if m)
        merged[source] = Factored(lora.B, lora.A)
    tokenizer = tokenizer_for(run.base_path, f"{name}: {key}: auto")
    batches = {
        label: make_batches(
            tokenizer,
            read_texts(path, f"{name}: data of {label}", limit=samples),
            settings["auto_max_length"],
            8,
            f"{name}: data of {label} ({path})",
        )
        for label, path in data.items()
    }
    start = time.perf_counter()
    cache = ContentCache(settings["cache_dir"])
    entry = cache.inputs_key(
        run.adapters,
        run.base_files,
        device,
        {
            "tokens": {t: batches_digest(b) for t, b in batches.items()},
            # the merge at scale 1: what every setting of the rule shaped
            "merged": tensors_digest(
                {
                    f"{m}|{n}": x
                    for m, f in merged.items()
                    for n, x in (("B", f.B), ("A", f.A))
                }
            ),
            "grid": list(GRID),
            "objective": objective,
            "pass": AGREEMENT_PASS_VERSION,
        },
    )
    scores = _cached_scores(cache, entry, GRID, objective)
    hit = scores is not None
    if not hit:
        scores = agreement_pass(
            run.base_path,
            batches,
            run.adapters,
            merged,
            GRID,
            objective=objective,
            device=device,
            quiet=run.quiet,
        )
        cache.store(entry, {str(c): list(v) for c, v in scores.items()}, "scale")
    chosen = min(GRID, key=lambda c: (scores[c], GRID.index(c)))
    for target in targets:
        target.params[key] = chosen
    return {
        "key": key,
        "chosen": chosen,
        "by_default": by_default,  # key unset: auto because every model has data
        # kl: every token's (causal LM), hidden_states (encoder), response:
        # the next token after each prompt, head: each decision of each head
        # (agreement, then KL)
        "objective": {"tokens": "kl" if causal else "hidden_states"}.get(
            objective, objective
        ),
        "candidates": {str(c): _rounded(scores[c], objective) for c in GRID},
        "prompts": {
            label: sum(len(b.input_ids) for b in bs) for label, bs in batches.items()
        },
        "cache_key": entry,
        "cache_hit": hit,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _cached_scores(
    cache: ContentCache, key: str, grid: tuple[float, ...], objective: str
) -> dict[float, tuple[float, ...]] | None:
    """The objective at every candidate from the cache (None: not there, or
    an entry of another shape: one warning, computed again)."""
    found = cache.load(key, "scale")
    if found is None:
        return None
    width = 2 if objective in DECIDED else 1
    try:
        scores = {c: tuple(float(x) for x in found[str(c)]) for c in grid}
        if len(found) != len(grid) or any(
            len(v) != width or not all(math.isfinite(x) for x in v)
            for v in scores.values()
        ):
            raise ValueError("not one finite value per candidate")
    except (KeyError, TypeError, ValueError) as error:
        LOG.warning(
            "ignoring cache entry %s (%s)", cache.entry_path(key, "scale"), error
        )
        return None
    LOG.info(
        "lambda: auto: objective from cache entry %s (no pass)",
        cache.entry_path(key, "scale"),
    )
    return scores


def _rounded(value: tuple[float, ...], objective: str) -> float | dict:
    """A candidate's objective as the report gives it."""
    if objective in DECIDED:
        return {
            "agreement": float(f"{-value[0]:.6g}"),
            "kl": float(f"{value[1]:.6g}"),
        }
    return float(f"{value[0]:.6g}")


def _calibrate(
    plan: MergePlan, targets: list, device: torch.device, base_files: list[str]
):
    """The calibration passes the method asks for (None, None: none)."""
    wanted = {
        json.dumps(c, sort_keys=True)
        for p in targets
        if (c := plan.method.calibration(p.params)) is not None
    }
    if not wanted:
        return None, None
    if len(wanted) > 1:
        keys = ", ".join(json.loads(next(iter(wanted))))
        raise TadaError(
            f"calibration settings ({keys}) must be the same for every "
            "tensor: give them as plain global parameters"
        )
    from mergekit_tada.probe.cache import calibrate

    return calibrate(
        json.loads(wanted.pop()),
        plan.base_path,
        base_files,
        plan.adapters,
        device,
        plan.options.quiet,
    )
