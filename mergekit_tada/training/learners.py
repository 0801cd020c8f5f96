"""The learners: TARA's per-direction phi and TaDA's learned gates, one loop.

Both build each module's directions (mergekit_tada/directions.py), read the
inputs' unlabeled text, and train with training/loop.py: TARA one coefficient
per direction, TaDA's learned gates two per group (a gate shared by all of an
adapter's directions in a module, a layer, or the whole model) that
``expand`` repeats into every module's phi. What was learned describes itself
for the report, the model card and the loss plot.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from mergekit_tada.directions import Directions, directions, initial_coefficients
from mergekit_tada.errors import TadaError, same_for_every_tensor
from mergekit_tada.lowrank import single_thread
from mergekit_tada.probe.gates import layer_of
from mergekit_tada.training.loop import TrainingResult, read_tasks, train_or_cached

CAUSAL_LM_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_causal_lm(base_path: str, what: str = "tara") -> None:
    """Learning from next-token entropies needs a base with an LM head."""
    with open(os.path.join(base_path, "config.json"), encoding="utf-8") as fh:
        model_type = json.load(fh).get("model_type")
    if model_type not in CAUSAL_LM_TYPES:
        raise TadaError(
            f"{what}: base model {base_path} is a {model_type!r} model; learning from "
            "next-token entropies needs a causal language model with an LM head "
            f"({', '.join(CAUSAL_LM_TYPES)})"
        )


@dataclass
class LearnedCoefficients:
    """TARA's context for merging: the directions and what was learned."""

    variant: str
    labels: list[str]  # inputs, config order
    preference: list[float]  # rho, summing to 1
    directions: dict[str, Directions]  # base module name -> directions
    result: TrainingResult
    settings: dict
    data: dict[str, dict]  # label -> {path, rows, tokens}
    cache: dict  # key, hit

    def report(self) -> dict:
        """The report's ``training`` section."""
        result = self.result
        return {
            "variant": self.variant,
            "inputs": self.labels,
            "preference": self.preference,
            "settings": self.settings,
            "data": self.data,
            "cache_key": self.cache["key"],
            "cache_hit": self.cache["hit"],
            "z": result.z,
            "h_before": result.h_before,
            "h_after": result.h_after,
            "loss_history": result.history,
        }

    def plot_data(self) -> dict:
        """What the loss plot draws (run/plots.py ``plot_training``)."""
        return {
            "history": self.result.history,
            "objective": self.settings["objective"],
            "labels": self.labels,
            "variant": self.variant,
        }


def module_directions(run, plans: list, labels: list[str], variant: str) -> dict:
    """One set of directions per base module, inputs in ``labels`` order.

    Computed once, in one thread, and reused by the merge: a basis recomputed
    under other thread counts could differ in the last bits.
    """
    modules: dict[str, list] = {}
    for plan in plans:
        names = [m for m in plan.sources.values() if m]
        modules.setdefault(names[0], [plan.sources[label] for label in labels])
    with single_thread():
        return {
            module: directions(
                [
                    run.adapters[label].factors(source) if source else None
                    for label, source in zip(labels, sources, strict=True)
                ],
                variant,
            )
            for module, sources in sorted(modules.items())
        }


def learn_tara(
    run,
    plans: list,
    settings: dict,
    data: dict[str, str],
    preference: dict[str, float],
) -> LearnedCoefficients:
    """Read each input's data, build the directions, train phi (or read the cache).

    ``run``: the run's RunInputs; ``settings``: the shared TARA parameters;
    ``data`` and ``preference``: per input label (config order).
    """
    labels = list(run.adapters)
    check_causal_lm(run.base_path)
    # over the largest first: 1e308 + 1e308 would overflow to inf (rho 0)
    largest = max(preference.values())
    rho = [preference[label] / largest for label in labels]
    rho = [r / sum(rho) for r in rho]
    tasks, described, tokens = read_tasks(
        run.base_path,
        [
            (label, data[label], f"tara: data of models[{i}] ({label})")
            for i, label in enumerate(labels)
        ],
        settings["data_samples"],
        settings["max_length"],
        settings["batch_size"],
    )
    dirs = module_directions(run, plans, labels, settings["variant"])
    init_lambda = settings["init_lambda"]
    if init_lambda is None:
        init_lambda = 0.4 * len(labels)
    init = {
        m: initial_coefficients(d, init_lambda, len(labels)) for m, d in dirs.items()
    }
    # the training mode changes no result (the gradients are the same)
    kept = {
        k: v for k, v in settings.items() if k not in ("cache_dir", "training_mode")
    }
    result, cache = train_or_cached(
        run,
        "tara",
        {"tokens": tokens, "settings": kept | {"init_lambda": init_lambda}},
        dirs,
        init,
        tasks,
        settings,
        rho,
    )
    return LearnedCoefficients(
        variant=settings["variant"],
        labels=labels,
        preference=rho,
        directions=dirs,
        result=result,
        settings=json.loads(json.dumps(settings)) | {"init_lambda": init_lambda},
        data=described,
        cache=cache,
    )


@dataclass
class LearnedGates:
    """TaDA's learned gates: (w_T, w_D) per module, and how they were learned."""

    gates: dict[str, tuple[float, float]]  # base module -> (task gate, domain gate)
    granularity: str
    result: TrainingResult
    data: dict[str, dict]
    settings: dict
    cache: dict
    labels: list[str] = field(default_factory=lambda: ["task", "domain"])

    def report(self) -> dict:
        """The report's ``training`` section."""
        result = self.result
        return {
            "gates": "learned",
            "granularity": self.granularity,
            "inputs": self.labels,
            "data": self.data,
            "settings": {k: v for k, v in self.settings.items() if k != "cache_dir"},
            "cache_key": self.cache["key"],
            "cache_hit": self.cache["hit"],
            "z": result.z,
            "h_before": result.h_before,
            "h_after": result.h_after,
            "learned": {k: v.tolist() for k, v in sorted(result.params.items())},
            "loss_history": result.history,
        }

    def card_line(self) -> str:
        """The model card's line on how the gates were learned."""
        result = self.result
        return (
            f"gates learned ({self.granularity}) with TARA's objective from "
            f"{self.data['task']['rows']} task prompts and "
            f"{self.data['domain']['rows']} domain prompts; entropy gaps "
            "H - z (task, domain): "
            + ", ".join(
                f"{b - z:+.4f} -> {a - z:+.4f}"
                for z, b, a in zip(
                    result.z, result.h_before, result.h_after, strict=True
                )
            )
        )


def gate_group(module: str, granularity: str) -> str:
    """The key of the gate pair a module shares: itself, its layer, or all."""
    if granularity == "global":
        return "all"
    if granularity == "layer":
        return layer_of(module)
    return module


# TaDA's parameters that the learned gates read (once per merge)
GATE_LEARNING_KEYS = (
    "calibration",
    "task_calibration",
    "calibration_samples",
    "calibration_max_length",
    "calibration_batch_size",
    "gate_granularity",
    "training_mode",
    "cache_dir",
    "learned_steps",
    "learned_lr",
)


def learn_gates(
    run, plans: list, roles: dict[str, str], uniform: float
) -> LearnedGates:
    """Train TaDA's two gates per group with TARA's objective (one loop).

    The data: ``task_calibration`` (task-style prompts) for the task adapter
    and ``calibration`` (domain prompts) for the domain adapter; each z_i is
    the entropy of that adapter alone on its own prompts. The gates start at
    the uniform gate (task arithmetic 1/1 with the default scale) and are
    shared by every direction of an adapter in a group (module, layer or
    global).
    """
    settings = same_for_every_tensor(
        [{k: p.params[k] for k in GATE_LEARNING_KEYS} for p in plans],
        "tada: gates: learned takes its data and training settings as plain "
        "global values (the same for every tensor)",
    )
    steps, lr = settings.pop("learned_steps"), settings.pop("learned_lr")
    settings |= {"steps": steps, "lr": lr, "objective": "stch", "alpha": 1.0}
    check_causal_lm(run.base_path, "tada learned gates")
    labels = sorted(roles, key=lambda label: ("task", "domain").index(roles[label]))
    tasks, described, tokens = read_tasks(
        run.base_path,
        [
            ("task", settings["task_calibration"], "tada: task_calibration"),
            ("domain", settings["calibration"], "tada: calibration"),
        ],
        settings["calibration_samples"],
        settings["calibration_max_length"],
        settings["calibration_batch_size"],
    )
    dirs = module_directions(run, plans, labels, "a")
    granularity = settings["gate_granularity"]
    groups = {m: gate_group(m, granularity) for m in dirs}
    init = {g: torch.tensor([uniform, uniform]) for g in sorted(set(groups.values()))}
    owners = {m: torch.tensor(d.owners) for m, d in dirs.items()}

    def expand(params: dict) -> dict[str, torch.Tensor]:
        return {
            m: params[groups[m]][owners[m].to(params[groups[m]].device)] for m in dirs
        }

    kept = {
        k: v for k, v in settings.items() if k not in ("cache_dir", "training_mode")
    }
    result, cache = train_or_cached(
        run,
        "gates",
        {"tokens": tokens, "settings": kept, "uniform": uniform},
        dirs,
        init,
        tasks,
        settings,
        [0.5, 0.5],
        expand=expand,
        what="tada learned gates",
    )
    gates = {m: tuple(float(v) for v in result.params[groups[m]]) for m in dirs}
    return LearnedGates(gates, granularity, result, described, settings, cache)
