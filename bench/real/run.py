"""The merge benchmark on real weights: SmolLM2-135M, real Debian text, every method.

    python bench/real/run.py [--quick] [--seeds 0 1 2] [--parts regime multitask lmeval]

Two protocols (bench/real/README.md, docs/quality-real.md):
* ``regime``: TaDA's setting. A task adapter learns a skill (topic, six
  classes) from labelled package descriptions; a domain adapter learns
  computing-dictionary text, unlabelled; the merge is asked the skill on
  dictionary entries (combined) and on descriptions (task control); H is
  their harmonic mean. Every method, TaDA's ablations, and the jointly
  trained adapter as the reference.
* ``multitask``: one adapter per task (five tasks), all merged at once;
  accuracy per task and normalised accuracy (merged / adapter alone).
* ``minilm``: the same on all-MiniLM-L6-v2 with a head per task (minilm.py).

Every merge's global scale is tuned on the validation rows (a multiplier c
on the merged update, which is mergekit's ``lambda``, TSV-M's ``alpha`` and
TaDA's ``scale`` / 2, since each output is linear in it); tables give the
default (c = 1) and tuned rows, mean +- sd over seeds and a bootstrap 95 %
interval over test rows. Everything is cached under the work folder
(adapters, merges, per-row results), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from data import MULTITASK, TASKS, prompt
from evaluate import Evaluator
from train import train_lora

import mergekit_tada

ROOT = Path(__file__).resolve().parent
# the fusion rules added after the first runs: rows of both protocols, scored
# after the others in the multi-task run
LATER_RULES = (
    "lora_dare_linear",
    "lora_breadcrumbs_ties",
    "lora_della",
    "lora_magnitude_prune",
)


# the data-free rules of 2025-26, core space and RegMean (issues 30 and 32):
# name -> (method, shared parameters, per-input parameter keys); "{rank}" is
# the stacked rank sum r, "{data}" each task's unlabelled training prompts
STATE_OF_THE_ART = {
    "lora_iso_c": ("lora_iso_c", {}, ()),
    "lora_iso_cts": ("lora_iso_cts", {}, ()),
    "lora_wudi": ("lora_wudi", {"match_norm": "none"}, ()),
    "lora_ctm task_arithmetic r 8": ("lora_ctm", {"rank": 8}, ()),
    "lora_ctm ties r 8": ("lora_ctm", {"rank": 8, "rule": "ties"}, ("density",)),
    "lora_ctm tsv_m r 8": ("lora_ctm", {"rank": 8, "rule": "tsv_m"}, ()),
    "lora_ctm iso_c r 8": ("lora_ctm", {"rank": 8, "rule": "iso_c"}, ()),
    "core lora_ties": ("lora_ties", {"space": "core"}, ("density",)),
    "core lora_dare_ties": ("lora_dare_ties", {"space": "core"}, ("density",)),
    "core lora_tsv_m": ("lora_tsv_m", {"space": "core", "match_norm": "none"}, ()),
    "core lora_iso_c": ("lora_iso_c", {"space": "core"}, ()),
    "r 8 lora_tsv_m": ("lora_tsv_m", {"rank": 8, "match_norm": "none"}, ()),
    "r 8 lora_iso_c": ("lora_iso_c", {"rank": 8}, ()),
    "r 8 lora_wudi": ("lora_wudi", {"rank": 8, "match_norm": "none"}, ()),
    "lora_iso_c norm sum": ("lora_iso_c", {"match_norm": "sum"}, ()),
    "lora_iso_cts norm sum": ("lora_iso_cts", {"match_norm": "sum"}, ()),
    "lora_wudi norm sum": ("lora_wudi", {"match_norm": "sum"}, ()),
    "lora_tsv_m norm sum": ("lora_tsv_m", {"match_norm": "sum"}, ()),
    "lora_tsv_m norm mean": ("lora_tsv_m", {"match_norm": "mean"}, ()),
    "regmean model 64": ("lora_regmean", {}, ("data",)),
    "regmean base 64": ("lora_regmean", {"grams": "base"}, ("data",)),
    "regmean model 16": ("lora_regmean", {"samples": 16}, ("data",)),
    "regmean base 16": ("lora_regmean", {"grams": "base", "samples": 16}, ("data",)),
    "regmean merged 64": ("lora_regmean", {"grams": "merged"}, ("data",)),
    "regmean merged 16": (
        "lora_regmean",
        {"grams": "merged", "samples": 16},
        ("data",),
    ),
    "regmean model 256": ("lora_regmean", {"samples": 256}, ("data",)),
    # lambda: auto (issue 40): the scale chosen on each task's unlabelled
    # prompts, against the same rule's label-tuned scale
    "regmean model 64 auto": ("lora_regmean", {"lambda": "auto"}, ("data",)),
    "regmean merged 64 auto": (
        "lora_regmean",
        {"grams": "merged", "lambda": "auto"},
        ("data",),
    ),
    "lora_tsv_m auto": (
        "lora_tsv_m",
        {"alpha": "auto", "match_norm": "none"},
        ("data",),
    ),
    "lora_iso_c auto": ("lora_iso_c", {"lambda": "auto"}, ("data",)),
    "lora_wudi auto": (
        "lora_wudi",
        {"lambda": "auto", "match_norm": "none"},
        ("data",),
    ),
    "task arithmetic auto": ("lora_task_arithmetic", {"lambda": "auto"}, ("data",)),
    "regmean model 64 alpha 0.5": ("lora_regmean", {"alpha": 0.5}, ("data",)),
    "regmean generate": ("lora_regmean", {}, ("generate",)),
    "regmean generate base": ("lora_regmean", {"grams": "base"}, ("generate",)),
    "regmean generate 128 x 128": (
        "lora_regmean",
        {"samples": 128, "generate_length": 128},
        ("generate",),
    ),
}


# the same searches reading only the next token after each prompt (a causal LM's)
STATE_OF_THE_ART |= {
    f"{name} response": (method, {**shared, "auto_objective": "response"}, keys)
    for name in (
        "task arithmetic auto",
        "lora_wudi auto",
        "lora_iso_c auto",
        "regmean model 64 auto",
        "lora_tsv_m auto",
    )
    for method, shared, keys in [STATE_OF_THE_ART[name]]
}
_method, _shared, _keys = STATE_OF_THE_ART["task arithmetic auto response"]
STATE_OF_THE_ART["task arithmetic auto response 64"] = (
    _method,
    {**_shared, "auto_samples": 64},
    _keys,
)


@dataclass(frozen=True)
class Regime:
    """A task x domain setting: the task adapter learns a skill from labelled
    ``task`` rows (one epoch), the domain adapter the unlabelled ``domain``
    text for ``domain_epochs``; the merge is asked the skill on ``combined``
    (domain inputs) and on ``task``'s test (the control). The jointly trained
    adapter is the reference: the task rows once and the domain rows
    ``domain_epochs`` times (each as often as its own adapter read it),
    shuffled together, for ``joint_epochs`` at ``joint_lr``, every row weighing
    the same in the loss (not every token: a text row scores ~96 tokens, a
    labelled row one, and by tokens the text swamped the labels)."""

    part: str  # the results part and the work folder
    task: str
    combined: str
    # (rows file, its splits read, first n rows or all): texts only, no labels
    domain: tuple[tuple[str, tuple[str, ...], int | None], ...]
    domain_epochs: int = 1
    joint_epochs: int = 1
    joint_lr: float = 1e-3
    # labelled training rows of the combined test's kind (other items than
    # its test's) that the task adapter (and the joint) read too
    task_extra: tuple[str, ...] = ()


TRAIN = ("train",)
REGIMES = {
    # the first regime: the topic skill on package descriptions, asked of
    # computing-dictionary entries; no headroom (docs/quality-real.md)
    "regime": Regime(
        "regime",
        "topic_debian",
        "topic_foldoc",
        (("topic_foldoc", TRAIN, None), ("foldoc", TRAIN, 240)),
    ),
    # language as the domain: the skill learned in English, asked in French
    "language": Regime(
        "language",
        "topic_en",
        "topic_fr",
        (("text_fr", TRAIN, None), ("topic_fr", TRAIN, None)),
    ),
    # the same in German, which the base and the English task adapter read
    # worse than French
    "german": Regime(
        "german",
        "topic_en",
        "topic_de",
        (("text_de", TRAIN, None), ("topic_de", TRAIN, None)),
    ),
    # knowledge as the domain: the skill asked of a FOLDOC term by its name
    # alone; what the term is about is stated only in the domain's text (every
    # topic_foldoc entry, test terms included, without its subject tag), read
    # for 8 epochs so that the adapter can hold it
    "knowledge": Regime(
        "knowledge",
        "topic_debian",
        "topic_terms",
        (("topic_foldoc", ("train", "val", "test"), None),),
        domain_epochs=8,
    ),
    # knowledge stated and asked for: the domain's text is the dictionary as it
    # prints each entry, its subject tag after the term ("DOOM: <games> ..."),
    # and the task adapter also answers the question for the training terms
    # by name (Allen-Zhu & Li 2023: question-answer rows on some items are
    # what makes a model's stated knowledge of the others extractable)
    "dictionary": Regime(
        "dictionary",
        "topic_debian",
        "topic_terms",
        (("foldoc_tagged", ("train", "val", "test"), None),),
        domain_epochs=8,
        task_extra=("topic_terms",),
    ),
}


# --quick's rows (with the base, the adapters alone and the joint): a check
# that every part runs end to end in minutes, not the full method list
QUICK_ROWS = (
    "task arithmetic 1/1",
    "task arithmetic (mean)",
    "lora_tsv_m",
    "lora_wudi norm sum",
    "tada probe gates, r 8",
    "tada uniform gates (the default)",
    "regmean model 64",
)


def slug(name: str) -> str:
    """A file name for a method's row."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def harmonic(a: float, b: float) -> float:
    return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


class Bench:
    """SmolLM2 with next-token answers; ``minilm.MiniLM`` swaps the backbone."""

    folder = "multitask"  # the multi-task protocol's results under the work folder
    trains_on_text = True  # TARA learns from unlabelled text through the LM
    skip: tuple[str, ...] = ()  # multi-task rows left out (name prefixes)
    only: tuple[str, ...] = ()  # multi-task rows run (names; empty: all)
    grid = (0.25, 0.5, 1.0, 2.0)  # the scales c tried on the validation rows
    max_length = 256  # tokens per unlabelled prompt (RegMean's Grams)

    def __init__(self, work: Path, quick: bool) -> None:
        self.work, self.quick = work, quick
        self.base = work / "base"
        self.rows = {
            name: [json.loads(x) for x in (work / f"data/{name}.jsonl").open()]
            for name in dict.fromkeys(
                [*TASKS, *(f for r in REGIMES.values() for f, _, _ in r.domain)]
            )
        }
        self._evaluator: Evaluator | None = None

    @property
    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            self._evaluator = Evaluator(self.base)
        return self._evaluator

    def split(self, task: str, split: str) -> list[dict]:
        rows = [r for r in self.rows[task] if r["split"] == split]
        if self.quick:  # a few rows per class
            keep = {"train": 24, "val": 2, "test": 6}[split]
            seen: dict[str, int] = {}
            rows = [
                r
                for r in rows
                if seen.__setitem__(r["label"], seen.get(r["label"], 0) + 1)
                or seen[r["label"]] <= keep
            ]
        return rows

    def train(self, task: str, seed: int, out: Path) -> Path:
        """One task's adapter (a PEFT folder)."""
        return train_lora(self.base, out, {"task": self.split(task, "train")}, seed, 1)

    def peft_model(self):
        """The base model for PEFT's own merges."""
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.base, dtype=torch.float32)

    def prompts_file(self, task: str, split: str, path: Path, text_task=None) -> str:
        """Unlabelled prompts (no answers) as a .jsonl with a 'text' field."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as fh:
                for r in self.split(task, split):
                    text = self.prompt_text(text_task or task, r)
                    fh.write(json.dumps({"text": text}) + "\n")
        return str(path)

    def prompt_text(self, task: str, row: dict) -> str:
        """What the model reads for a row, without its answer."""
        return prompt(TASKS[task], row["text"])

    # ---------------------------------------------------------------- scoring

    def score(self, key: Path, adapter: Path | None, evals: dict) -> dict:
        """Per-row results of ``adapter`` at every scale on val, cached in ``key``."""
        cached = json.loads(key.read_text()) if key.exists() else {}
        for split, rows in evals.items():
            for c in self.grid if split == "val" else (1.0,):
                tag = f"{split}@{c}"
                if tag not in cached:
                    cached[tag] = self.evaluator.correct(rows, adapter, scale=c)
                    key.parent.mkdir(parents=True, exist_ok=True)
                    key.write_text(json.dumps(cached))
        return cached

    def score_test(self, key: Path, adapter: Path | None, rows: dict, c: float) -> dict:
        cached = json.loads(key.read_text()) if key.exists() else {}
        tag = f"test@{c}"
        if tag not in cached:
            cached[tag] = self.evaluator.correct(rows, adapter, scale=c)
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_text(json.dumps(cached))
        return cached[tag]


def merge(config: dict, out: Path) -> tuple[Path, float]:
    """One of our merges (adapter only: the evaluator adds it to the base)."""
    adapter = out / "adapter"
    stamp = out / "wall.json"
    if not stamp.exists():
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        mergekit_tada.merge(config, out, adapter_only=True, quiet=True)
        stamp.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return adapter, json.loads(stamp.read_text())["seconds"]


def chosen_scale(adapter: Path) -> dict:
    """``lambda: auto``'s choice, from the merge's report (rows that searched)."""
    report = adapter.parent / "merge_report.json"
    if not report.exists():
        return {}
    search = json.loads(report.read_text()).get("training", {}).get("scale_search")
    return {"auto": search["chosen"]} if search else {}


def peft_merge(
    bench: Bench, adapters: list[Path], kind: str, out: Path
) -> tuple[Path, float]:
    """PEFT's own ``add_weighted_adapter`` (weights 1, density 0.5 where used)."""
    stamp = out / "wall.json"
    if not stamp.exists():
        from peft import PeftModel

        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        model = bench.peft_model()
        model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
        for i, a in enumerate(adapters[1:], 1):
            model.load_adapter(str(a), adapter_name=f"a{i}")
        names = [f"a{i}" for i in range(len(adapters))]
        extra = (
            {"density": 0.5} if kind in ("ties", "dare_ties", "magnitude_prune") else {}
        )
        if kind == "svd":
            extra = {"svd_rank": 8 * len(adapters)}
        model.add_weighted_adapter(
            names, [1.0] * len(names), "merged", combination_type=kind, **extra
        )
        for n in names:
            model.delete_adapter(n)
        model.save_pretrained(out / "tmp", selected_adapters=["merged"])
        (out / "tmp" / "merged").rename(out / "adapter")
        shutil.rmtree(out / "tmp")
        stamp.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return out / "adapter", json.loads(stamp.read_text())["seconds"]


def lora_inputs(adapters: dict[str, Path], params: dict | None = None) -> list[dict]:
    return [
        {"model": f"{{base}}+{path}", "parameters": dict((params or {}).get(name, {}))}
        for name, path in adapters.items()
    ]


def config(bench: Bench, method: str, models: list[dict], **parameters) -> dict:
    for m in models:
        m["model"] = m["model"].replace("{base}", str(bench.base))
        if not m["parameters"]:
            del m["parameters"]
    return {
        "merge_method": method,
        "base_model": str(bench.base),
        "models": models,
        "parameters": parameters,
        "dtype": "float32",
    }


# ------------------------------------------------------------------ protocols


def evaluate_method(bench, key, adapter, evals, tests, objective, tune=True) -> dict:
    """Default (c = 1) and tuned (c chosen on val by ``objective``) test results."""
    cached = bench.score(key, adapter, {"val": evals} if tune else {})
    best = (
        max(
            bench.grid, key=lambda c: (objective(cached[f"val@{c}"]), -abs(math.log(c)))
        )
        if tune
        else 1.0
    )
    result = {"scale": best, "default": bench.score_test(key, adapter, tests, 1.0)}
    result["tuned"] = bench.score_test(key, adapter, tests, best)
    return result


def state_of_the_art(
    bench, c, inputs: list[str], rank: int, data: dict, skip=()
) -> dict:
    """STATE_OF_THE_ART's rows (but names starting with ``skip``) over ``inputs``;
    ``c(method, per-input parameters, **shared)`` builds a config."""
    extra = {"cache_dir": str(bench.work / "cache"), "max_length": bench.max_length}
    rows = {}
    for name, (method, shared, keys) in STATE_OF_THE_ART.items():
        if skip and name.startswith(skip):
            continue
        per = {
            t: {
                **({"density": 0.5} if "density" in keys else {}),
                **({"data": data[t]} if "data" in keys else {}),
                **({"data": "generate"} if "generate" in keys else {}),
            }
            for t in inputs
        }
        more = extra if method == "lora_regmean" else {}
        rows[name] = c(method, per, **({"rank": rank} | shared | more))
    return rows


def regime_methods(bench, pair: dict, calib: str, task_calib: str, data: dict) -> dict:
    """name -> merge config of a task x domain regime (task = pair['task'],
    domain = pair['domain']; ``data``: each one's unlabelled training text)."""
    roles = {"task": {"role": "task"}, "domain": {"role": "domain"}}
    unit = {
        "task": {"weight": 1.0, "density": 0.5},
        "domain": {"weight": 1.0, "density": 0.5},
    }
    half = {"task": {"weight": 0.5}, "domain": {"weight": 0.5}}
    ones = {"task": {"weight": 1.0}, "domain": {"weight": 1.0}}
    # probe gates named: the default is uniform since this benchmark
    tada = {
        "gates": "probe",
        "calibration": calib,
        "cache_dir": str(bench.work / "cache"),
    }

    def c(method, params, **kw):
        return config(bench, method, lora_inputs(pair, params), **kw)

    rows = {
        "task arithmetic 1/1": c("lora_task_arithmetic", ones, rank=16),
        "task arithmetic 1/2": c("lora_task_arithmetic", half, rank=16),
        "lora_ties": c("lora_ties", unit, rank=16),
        "lora_dare_ties": c("lora_dare_ties", unit, rank=16),
        "lora_knots_ties": c("lora_knots_ties", unit, rank=16),
        "lora_tsv_m": c("lora_tsv_m", ones, rank=16, match_norm="none"),
        **{m: c(m, unit, rank=16) for m in LATER_RULES},
        "tada probe gates, r 8": c("tada", roles, **tada),
        "tada r 16": c("tada", roles, rank=16, **tada),
        "tada uniform gates (the default)": c(
            "tada", roles, rank=16, **(tada | {"gates": "uniform"})
        ),
        "tada scale 1": c("tada", roles, rank=16, scale=1.0, **tada),
        "tada no conflict elimination": c(
            "tada", roles, rank=16, conflict_elimination=False, **tada
        ),
        "tada probe_balance equalise": c(
            "tada", roles, rank=16, probe_balance="equalise", **tada
        ),
        "tada learned gates": c(
            "tada",
            roles,
            rank=16,
            task_calibration=task_calib,
            learned_steps=3 if bench.quick else 20,
            **(tada | {"gates": "learned"}),
        ),
        **{
            f"tada kappa {k:g}": c("tada", roles, rank=16, conflict_threshold=k, **tada)
            for k in (0.1, 0.6)
        },
    }
    # the regime's Σr is 16: the rank-8 rows are CtM's; RegMean reads every
    # training text of both adapters
    skip = ("r 8", "regmean model 16", "regmean model 256", "regmean model 64 alpha")
    rows |= state_of_the_art(bench, c, list(pair), 16, data, skip)
    return rows


def run_regime(
    bench: Bench, seed: int, save=lambda out: None, regime: Regime = REGIMES["regime"]
) -> dict:
    mode = "quick" if bench.quick else "full"
    root = bench.work / mode / f"{regime.part}/seed{seed}"
    task_rows = [
        r for t in (regime.task, *regime.task_extra) for r in bench.split(t, "train")
    ]
    # the domain's unlabelled text: no labels; the combined test's inputs only
    # where the regime says so (knowledge: the test terms' definitions)
    domain_rows = [
        {"text": r["text"]}
        for name, splits, n in regime.domain
        for r in [r for split in splits for r in bench.split(name, split)][:n]
    ]
    adapters = {
        "task": train_lora(
            bench.base, root / "lora-task", {"task": task_rows}, seed, 1
        ),
        "domain": train_lora(
            bench.base,
            root / "lora-domain",
            {"domain": domain_rows},
            seed,
            regime.domain_epochs,
        ),
        "joint": train_lora(
            bench.base,
            root / "lora-joint",
            {"task": task_rows, "domain": domain_rows * regime.domain_epochs},
            seed,
            regime.joint_epochs,
            lr=regime.joint_lr,
            row_mean=True,
        ),
    }
    evals = {t: bench.split(t, "val") for t in (regime.combined, regime.task)}
    tests = {t: bench.split(t, "test") for t in (regime.combined, regime.task)}

    def h(results: dict) -> float:
        return harmonic(*(accuracy(results[t]) for t in (regime.combined, regime.task)))

    calib = bench.prompts_file(regime.combined, "train", root / "calibration.jsonl")
    task_calib = bench.prompts_file(
        regime.task, "train", root / "task-calibration.jsonl"
    )
    domain_text = root / "domain-text.jsonl"
    if not domain_text.exists():
        domain_text.write_text("".join(json.dumps(r) + "\n" for r in domain_rows))
    out: dict = {}
    for name, adapter in (
        ("base", None),
        ("task adapter alone", adapters["task"]),
        ("domain adapter alone", adapters["domain"]),
        ("jointly trained (reference)", adapters["joint"]),
    ):
        out[name] = evaluate_method(
            bench,
            root / f"scores/{slug(name)}.json",
            adapter,
            evals,
            tests,
            h,
            tune=False,
        )
        out[name]["seconds"] = 0.0
    pair = {"task": adapters["task"], "domain": adapters["domain"]}
    data = {"task": task_calib, "domain": str(domain_text)}
    methods = regime_methods(bench, pair, calib, task_calib, data)
    chosen = [n for n in methods if not n.startswith(bench.skip)]
    if bench.only:
        chosen = [n for n in bench.only if n in chosen]
    for name in chosen:
        adapter, seconds = merge(methods[name], root / "merges" / slug(name))
        out[name] = evaluate_method(
            bench, root / f"scores/{slug(name)}.json", adapter, evals, tests, h
        )
        out[name]["seconds"] = seconds
        save(out)
    return out


def multitask_methods(bench, adapters: dict, data: dict) -> dict:
    rank = 8 * len(adapters)
    unit = {t: {"weight": 1.0, "density": 0.5} for t in adapters}
    ones = {t: {"weight": 1.0} for t in adapters}
    mean = {t: {"weight": 1.0 / len(adapters)} for t in adapters}

    def c(method, params, **kw):
        return config(bench, method, lora_inputs(adapters, params), **kw)

    tara = {
        "steps": 3 if bench.quick else 20,
        "batch_size": 4,
        "data_samples": 32,
        "lr": 0.01,
        "max_length": 96,
        "cache_dir": str(bench.work / "cache"),
    }
    with_data = {t: {"data": data[t]} for t in adapters}
    rows = {
        "task arithmetic (sum)": c("lora_task_arithmetic", ones, rank=rank),
        "task arithmetic (mean)": c("lora_task_arithmetic", mean, rank=rank),
        "lora_ties": c("lora_ties", unit, rank=rank),
        "lora_dare_ties": c("lora_dare_ties", unit, rank=rank),
        "lora_knots_ties": c("lora_knots_ties", unit, rank=rank),
        "lora_tsv_m": c("lora_tsv_m", ones, rank=rank, match_norm="none"),
        "pico + task arithmetic": c("lora_task_arithmetic", ones, rank=rank, pico=True),
        "pico + lora_knots_ties": c("lora_knots_ties", unit, rank=rank, pico=True),
        "tara A": c("tara", with_data, variant="a", **tara),
        "tara B": c("tara", with_data, variant="b", **tara),
        **{m: c(m, unit, rank=rank) for m in LATER_RULES},
    }
    rows |= state_of_the_art(bench, c, list(adapters), rank, data)
    if not bench.trains_on_text:
        rows = {
            k: v
            for k, v in rows.items()
            if not k.startswith(("tara", "regmean generate"))
            and not k.endswith(" response")  # an encoder writes no next token
        }
    return rows


def run_multitask(bench: Bench, seed: int, save=lambda out: None) -> dict:
    mode = "quick" if bench.quick else "full"
    root = bench.work / mode / f"{bench.folder}/seed{seed}"
    tasks = MULTITASK[:3] if bench.quick else MULTITASK
    adapters = {t: bench.train(t, seed, root / f"lora-{t}") for t in tasks}
    evals = {t: bench.split(t, "val") for t in tasks}
    tests = {t: bench.split(t, "test") for t in tasks}

    def mean_acc(results: dict) -> float:
        return statistics.mean(sum(v) / len(v) for v in results.values())

    out: dict = {
        "base": evaluate_method(
            bench, root / "scores/base.json", None, evals, tests, mean_acc, tune=False
        )
    }
    alone = {}
    for t, path in adapters.items():
        alone[t] = bench.evaluator.correct({t: tests[t]}, path)[t]
    out["adapter alone (own task)"] = {
        "scale": 1.0,
        "default": alone,
        "tuned": alone,
        "seconds": 0.0,
    }
    data = {t: bench.prompts_file(t, "train", root / f"data-{t}.jsonl") for t in tasks}
    ours = multitask_methods(bench, adapters, data)
    makers = {
        name: (lambda cfg=cfg, name=name: merge(cfg, root / "merges" / slug(name)))
        for name, cfg in ours.items()
    }
    for kind in ("svd", "ties", "magnitude_prune"):
        makers[f"PEFT add_weighted_adapter {kind}"] = lambda kind=kind: peft_merge(
            bench, list(adapters.values()), kind, root / f"merges/peft_{kind}"
        )
    # the cheap rows first (TARA trains; the later fusion rules are extra rows)
    order = [n for n in makers if not n.startswith("tara") and n not in LATER_RULES]
    order += [n for n in makers if n not in order]
    chosen = [n for n in order if not n.startswith(bench.skip)]
    if bench.only:  # in the order given
        chosen = [n for n in bench.only if n in chosen]
    for name in chosen:
        adapter, seconds = makers[name]()
        out[name] = evaluate_method(
            bench, root / f"scores/{slug(name)}.json", adapter, evals, tests, mean_acc
        )
        out[name] |= {"seconds": seconds, **chosen_scale(adapter)}
        save(out)
    return out


# ------------------------------------------------------------------ statistics


def accuracy(rows: list[int]) -> float:
    return sum(rows) / len(rows)


def bootstrap(per_seed: list[dict], metric, reps: int = 1000) -> tuple[float, float]:
    """95 % interval of ``metric`` (a function of {task: rows} per seed, averaged
    over seeds) resampling the test rows of every (seed, task)."""
    rng = random.Random(0)
    values = []
    for _ in range(reps):
        sampled = []
        for results in per_seed:
            sampled.append(
                {
                    t: [rows[rng.randrange(len(rows))] for _ in rows]
                    for t, rows in results.items()
                }
            )
        values.append(statistics.mean(metric(s, i) for i, s in enumerate(sampled)))
    values.sort()
    return values[int(0.025 * reps)], values[int(0.975 * reps) - 1]


def writable(work: Path) -> None:
    """Exit with one line unless the work folder can be created and written."""
    try:
        work.mkdir(parents=True, exist_ok=True)
        probe = work / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise SystemExit(
            f"run.py: cannot write to --work {work} ({error.strerror or error}); "
            "give a folder you can write"
        ) from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="bench/work/real")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="1 seed, a few examples per class, QUICK_ROWS' methods: minutes",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--parts",
        nargs="+",
        choices=[*REGIMES, "multitask", "minilm", "lmeval"],
        # the candidate regimes (without headroom so far) run when named
        default=["regime", "multitask", "minilm", "lmeval"],
    )
    ap.add_argument(
        "--skip",
        nargs="+",
        default=[],
        help="leave out multi-task rows whose names start so (e.g. tara): "
        "the report gives each row's seeds",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        default=[],
        help="run only these multi-task rows, in this order (exact names; the base "
        "and the adapters alone always)",
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    writable(Path(args.work))
    bench = Bench(Path(args.work), args.quick)
    bench.skip, bench.only = tuple(args.skip), tuple(args.only)
    if args.quick and not bench.only:
        bench.only = QUICK_ROWS
    seeds = args.seeds[:1] if args.quick else args.seeds
    results_path = bench.work / ("quick" if args.quick else "full") / "results.json"

    def save(key: tuple[str, ...], value) -> None:
        """Set one part (or one seed of it) in results.json, re-read first, so
        runs of different parts at the same time keep each other's rows; a
        seed's rows are merged into those already there (``--only`` runs add
        rows, rows run again replace theirs)."""
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        node = results
        for k in key[:-1]:
            node = node.setdefault(k, {})
        old = node.get(key[-1])
        node[key[-1]] = {**old, **value} if isinstance(old, dict) else value
        results_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = results_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(results))
        tmp.replace(results_path)

    for part in args.parts:
        if part == "lmeval":
            from lmeval import agreement

            save(("lmeval",), agreement(bench, results_path.parent))
            continue
        runner = run_multitask
        if part in REGIMES:
            runner = functools.partial(run_regime, regime=REGIMES[part])
        on = bench
        if part == "minilm":
            from minilm import MiniLM

            on = MiniLM(bench.work, bench.quick)
            on.skip, on.only = bench.skip, bench.only
        for seed in seeds:
            # after every method: an interrupted run still reports
            key = (part, str(seed))
            save(key, runner(on, seed, lambda out, key=key: save(key, out)))
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    from report import write_report

    write_report(results, results_path.parent, quick=args.quick)


if __name__ == "__main__":
    main()
