"""MiniLM classifiers as PEFT saves them: `lambda: auto` reading the heads.

The MiniLM protocol (minilm.py) keeps each task's head beside its adapter,
on mean-pooled states, which no transformers class reads; here each task is
a PEFT ``SEQ_CLS`` adapter of ``BertForSequenceClassification`` (the LoRA on
the same projections, the head in ``modules_to_save``, the same data, steps
and learning rate), merged by the package, which writes each task's head
beside the merged LoRA (``out/adapter/<task>/``), and scored through
``PeftModel.from_pretrained`` on ``AutoModelForSequenceClassification``:
the path a user takes. Per rule and seed: every scale of the grid (the
label-tuned c* is the best on the validation rows), ``lambda: auto`` with
``auto_objective: tokens`` and with ``head``. Normalised accuracy: the mean
over tasks of the merge's test accuracy over the task adapter's own.

    python bench/real/heads.py --seeds 0 1 2

Results: docs/quality-real-heads.json (one entry per seed, written as each
finishes); ``--table`` prints them. token_heads.py runs the same over token
classifiers (a :class:`Protocol` each).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # a load report per task
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from data import MULTITASK, TASKS  # noqa: E402
from minilm import (  # noqa: E402
    TARGETS,
    classes_loss,
    encode,
    fit,
    label_index,
    minilm_folder,
)
from train import save_adapter  # noqa: E402

WORK = HERE.parent / "work" / "real"
RESULTS = HERE.parent.parent / "docs" / "quality-real-heads.json"
GRID = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)  # lambda: auto's candidates
RULES = {  # row -> (method, its global scale's key, settings), as the other tables
    "lora_task_arithmetic": ("lora_task_arithmetic", "lambda", {}),
    "lora_tsv_m": ("lora_tsv_m", "alpha", {"match_norm": "none"}),
    "tsv_m mean": ("lora_tsv_m", "alpha", {"match_norm": "mean"}),  # README's
    "lora_wudi": ("lora_wudi", "lambda", {"match_norm": "none"}),
    "lora_iso_c": ("lora_iso_c", "lambda", {}),
    # the default given prompts (64 per model), and RegMean++
    "lora_regmean": ("lora_regmean", "lambda", {}),
    "regmean merged": ("lora_regmean", "lambda", {"grams": "merged"}),
}
# lambda: auto's objectives, each on 16 and 64 prompts per model
AUTO = (("tokens", 16), ("head", 16), ("tokens", 64), ("head", 64))


@dataclass(frozen=True)
class Protocol:
    """A classifier protocol: its tasks, how each is trained and scored."""

    folder: str  # under bench/work/real/full
    tasks: tuple[str, ...]
    train: Callable[[str, int, Path], Path]  # (task, seed, folder) -> adapter
    accuracy: Callable[[Path, str, str], float]  # (adapter, task, split)
    prompts: Callable[[str, int], str]  # (task, seed) -> lambda: auto's data
    results: Path
    rules: tuple[str, ...] = tuple(RULES)


def rows(task: str, split: str) -> list[dict]:
    data = [json.loads(x) for x in (WORK / f"data/{task}.jsonl").open()]
    return [r for r in data if r["split"] == split]


def classifier(task: str):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        minilm_folder(), dtype=torch.float32, num_labels=len(TASKS[task].classes)
    )


def train_peft(
    task_model, task_type: str, loss, data: list[dict], seed: int, out: Path, desc: str
) -> Path:
    """minilm.train_with_head's recipe on a PEFT task model (``task_model()``,
    its head in modules_to_save): LoRA rank 8 on TARGETS, 3 epochs over
    ``data`` minimising ``loss(model, tokenizer)(rows)``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    if (out / "adapter_model.safetensors").exists():
        return out
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    model = get_peft_model(
        task_model(),
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=TARGETS,
            lora_dropout=0.0,
            task_type=task_type,
        ),
    )
    params = [p for p in model.parameters() if p.requires_grad]  # LoRA, head
    fit(model, params, loss(model, tokenizer), data, seed, 3, desc)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_adapter(model, out)


def peft_classifier(task_model, adapter: Path):
    """(tokenizer, the PEFT adapter on ``task_model()``, ready to score)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    return tokenizer, PeftModel.from_pretrained(task_model(), adapter).eval()


def train(task: str, seed: int, out: Path) -> Path:
    """A SEQ_CLS adapter of the task (its head on BERT's [CLS] pooler)."""

    def loss(model, tokenizer):
        return classes_loss(lambda batch: model(**batch).logits, tokenizer, task)

    return train_peft(
        lambda: classifier(task),
        "SEQ_CLS",
        loss,
        rows(task, "train"),
        seed,
        out,
        f"train minilm {task}",
    )


@torch.inference_mode()
def accuracy(adapter: Path, task: str, split: str) -> float:
    """The task's accuracy with this PEFT classifier adapter (real load)."""
    tokenizer, model = peft_classifier(lambda: classifier(task), adapter)
    data = rows(task, split)
    correct = 0
    for i in range(0, len(data), 64):
        chunk = data[i : i + 64]
        batch = encode(tokenizer, chunk)
        predicted = model(**batch).logits.argmax(-1)
        correct += int((predicted == label_index(task, chunk)).sum())
    return correct / len(data)


def merge(folder: Path, adapters: dict[str, Path], rule: str, params: dict) -> dict:
    """The package's adapter-only merge (cached by folder); its report."""
    import mergekit_tada

    report = folder / "merge_report.json"
    if not report.exists():
        config = {
            "merge_method": rule,
            "base_model": str(minilm_folder()),
            "models": [
                {
                    "model": f"{minilm_folder()}+{path}",
                    "parameters": {"data": str(path.parent / f"data-{task}.jsonl")},
                }
                for task, path in adapters.items()
            ],
            "parameters": {"rank": 40, **params},
            "dtype": "float32",
        }
        mergekit_tada.merge(config, str(folder), quiet=True, adapter_only=True)
    return json.loads(report.read_text())


def scores(merged: Path, split: str, protocol: Protocol) -> dict[str, float]:
    """Each task's accuracy with its head on the merge (kept in the folder)."""
    path = merged / f"scores-{split}.json"
    if not path.exists():
        found = {
            t: protocol.accuracy(merged / "adapter" / t, t, split)
            for t in protocol.tasks
        }
        path.write_text(json.dumps(found))
    return json.loads(path.read_text())


def normalised(scores: dict[str, float], own: dict[str, float]) -> float:
    return 100 * statistics.mean(scores[t] / own[t] for t in own)


def run_seed(seed: int, protocol: Protocol) -> dict:
    root = WORK / "full" / protocol.folder / f"seed{seed}"
    adapters = {}
    for task in protocol.tasks:
        adapters[task] = protocol.train(task, seed, root / task)
        data = root / f"data-{task}.jsonl"
        if not data.exists():
            data.write_text(protocol.prompts(task, seed))
    own = {t: protocol.accuracy(p, t, "test") for t, p in adapters.items()}
    own_val = {t: protocol.accuracy(p, t, "val") for t, p in adapters.items()}
    result = {"seed": seed, "own": own, "rules": {}}
    for rule in protocol.rules:
        method, key, settings = RULES[rule]
        start = time.perf_counter()
        scored = {}
        for c in GRID:
            out = root / "merges" / f"{rule.replace(' ', '-')}-{c}"
            merge(out, adapters, method, {**settings, key: c})
            scored[c] = {
                split: normalised(
                    scores(out, split, protocol), own if split == "test" else own_val
                )
                for split in ("val", "test")
            }
        tuned = max(GRID, key=lambda c: (scored[c]["val"], -GRID.index(c)))
        row = {
            "test": {str(c): round(scored[c]["test"], 2) for c in GRID},
            "tuned": tuned,
        }
        for objective, samples in AUTO:
            name = f"{objective}" + ("" if samples == 16 else f" {samples}")
            out = root / "merges" / f"{rule}-auto-{name}".replace(" ", "-")
            report = merge(
                out,
                adapters,
                method,
                {
                    **settings,
                    key: "auto",
                    "auto_objective": objective,
                    "auto_samples": samples,
                },
            )
            search = report["training"]["scale_search"]
            row[f"auto {name}"] = search["chosen"]
            row[f"auto {name} s"] = search["seconds"]
        row["seconds"] = round(time.perf_counter() - start, 1)
        result["rules"][rule] = row
        print(json.dumps({rule: row}), flush=True)
    return result


def table(results: dict) -> str:
    columns = [f"auto {o}" + ("" if n == 16 else f" {n}") for o, n in AUTO]
    lines = [
        "| seed | rule | c = 1 | "
        + " | ".join(c.removeprefix("auto ") for c in columns)
        + " | c* (labels) |",
        "|---|---|---|" + "---|" * len(columns) + "---|",
    ]
    for seed, result in sorted(results.items()):
        for rule, row in result["rules"].items():
            at = row["test"]
            cells = [
                f"{row[k]:g} ({at[str(row[k])]:.1f})" if k in row else "–"
                for k in (*columns, "tuned")
            ]
            lines.append(
                f"| {seed} | {rule} | {at['1.0']:.1f} | " + " | ".join(cells) + " |"
            )
    rules = dict.fromkeys(r for result in results.values() for r in result["rules"])
    for rule in rules:  # each column's mean score over the seeds that have it all
        rows = [r["rules"][rule] for r in results.values() if rule in r["rules"]]
        cells = [
            f"{statistics.mean(r['test'][str(r[k])] for r in rows):.1f}"
            if all(k in r for r in rows)
            else "–"
            for k in (*columns, "tuned")
        ]
        c1 = statistics.mean(r["test"]["1.0"] for r in rows)
        lines.append(
            f"| mean of {len(rows)} | {rule} | {c1:.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def sequence_prompts(task: str, seed: int) -> str:
    """The training texts the MiniLM rows' ``lambda: auto`` read."""
    return (WORK / "full" / "minilm" / f"seed{seed}" / f"data-{task}.jsonl").read_text()


SEQUENCES = Protocol(
    "minilm_cls", MULTITASK, train, accuracy, sequence_prompts, RESULTS
)


def main(protocol: Protocol = SEQUENCES) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--table", action="store_true", help="print the results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = protocol.results
    results = json.loads(path.read_text()) if path.exists() else {}
    if not args.table:
        for seed in args.seeds:
            results[str(seed)] = run_seed(seed, protocol)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
            tmp.replace(path)
    print(table(results))


if __name__ == "__main__":
    main()
