"""The benchmark's tasks as local lm-eval-harness tasks, and our evaluator checked
against lm-eval on the same models.

``write_tasks(bench, folder)`` writes one ``multiple_choice`` YAML task per
benchmark task over its test rows (``real_<task>``): the prompt, the six label
words as choices (lm-eval puts its one-space delimiter before each), the gold
index. Score any merge with them:

    lm_eval --model hf --model_args pretrained=OUT --include_path TASKS \\
        --tasks real_topic_foldoc,real_topic_debian --device cpu
    lm_eval --model hf --model_args pretrained=BASE,peft=OUT/adapter ...

``agreement`` scores two models both ways, a merged model folder (a full
``mergekit_tada.merge``) and base + a PEFT adapter, and compares accuracy
and per-row correctness with bench/real/evaluate.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from data import TASKS, prompt

import mergekit_tada

TASK_YAML = """task: real_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(bench, folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        task = TASKS[name]
        words = list(task.classes.values())
        data = folder / f"{name}.test.jsonl"
        with open(data, "w", encoding="utf-8") as fh:
            for r in bench.split(name, "test"):
                row = {
                    "prompt": prompt(task, r["text"]),
                    "choices": words,
                    "gold": words.index(r["label"]),
                }
                fh.write(json.dumps(row) + "\n")
        (folder / f"real_{name}.yaml").write_text(
            TASK_YAML.format(name=name, data=data.resolve())
        )
    return folder


def lm_eval_rows(
    model_args: str, folder: Path, names: list[str]
) -> dict[str, list[int]]:
    """Per-row correctness (test order) of lm-eval's hf model on our tasks."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model="hf",
        model_args=model_args + ",dtype=float32",
        tasks=[f"real_{n}" for n in names],
        task_manager=TaskManager(include_path=str(folder)),
        batch_size=16,
        device="cpu",
        log_samples=True,
    )
    return {
        n: [
            int(s["acc"])
            for s in sorted(out["samples"][f"real_{n}"], key=lambda s: s["doc_id"])
        ]
        for n in names
    }


def agreement(bench, folder: Path) -> dict:
    names = ["topic_foldoc", "topic_debian"]
    tasks = write_tasks(bench, folder / "lm_eval_tasks", names)
    root = folder / "regime/seed0"
    adapter = root / "lora-task"
    merged = folder / "lm_eval_merged"
    if not (merged / "model.safetensors").exists():
        config = {
            "merge_method": "lora_task_arithmetic",
            "base_model": str(bench.base),
            "models": [
                {"model": f"{bench.base}+{adapter}"},
                {"model": f"{bench.base}+{root / 'lora-domain'}"},
            ],
            "parameters": {"rank": 16},
            "dtype": "float32",
        }
        mergekit_tada.merge(config, merged, quiet=True)
    tests = {n: bench.split(n, "test") for n in names}
    report = {}
    for label, args, ours in (
        (
            "base + task adapter (peft=)",
            f"pretrained={bench.base},peft={adapter}",
            bench.evaluator.correct(tests, adapter),
        ),
        (
            "merged model folder (pretrained=)",
            f"pretrained={merged}",
            bench.evaluator.correct(tests, merged / "adapter"),
        ),
    ):
        theirs = lm_eval_rows(args, tasks, names)
        report[label] = {
            n: {
                "ours": round(sum(ours[n]) / len(ours[n]), 4),
                "lm_eval": round(sum(theirs[n]) / len(theirs[n]), 4),
                "rows_that_differ": sum(
                    a != b for a, b in zip(ours[n], theirs[n], strict=True)
                ),
                "rows": len(ours[n]),
            }
            for n in names
        }
    return report
