"""On MiniLM, would ``lambda: auto`` pick another scale with a mean-pooled
objective (what the bench's task heads read) than with the token-level one?
(docs/quality-real.md, "RegMean++ and a label-free scale".)

    python bench/real/pooled_objective.py

Reads the cached ``auto`` merges of ``run.py --parts minilm`` (3 seeds): each
merge at scale 1 is the written update over the scale it chose. Every
candidate's objective is recomputed with plain transformers forwards, both
ways: ||H_c - H_t||^2 / ||H_t||^2 over the tokens (the shipped objective; its
choice must equal the report's) and the same on each prompt's mean-pooled
states. Prints, per seed and rule, the scale the report chose, each
objective's, and the one the validation labels prefer (mean accuracy of the
same rule's label-tuned row).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "bench/real"))
from minilm import minilm_folder  # noqa: E402

from mergekit_tada.adapters import LoraAdapter  # noqa: E402
from mergekit_tada.probe.agreement import GRID  # noqa: E402

TASKS = ("wn_noun", "wn_verb", "fortune", "debian", "foldoc")
ROWS = {  # auto merge -> the same rule's label-tuned row
    "lora_tsv_m_auto": "lora_tsv_m",
    "task_arithmetic_auto": "task_arithmetic__sum_",
    "lora_iso_c_auto": "lora_iso_c",
    "lora_wudi_auto": "lora_wudi",
    "regmean_model_64_auto": "regmean_model_64",
}


def main() -> None:
    base = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModel.from_pretrained(base, dtype=torch.float32).eval()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}

    def dense(folder: Path) -> dict[str, torch.Tensor]:
        adapter = LoraAdapter(folder)
        out = {}
        for m in adapter.modules:
            f = adapter.factors(m)
            key = m + ".weight"
            out[key if key in w0 else key.split(".", 1)[1]] = (f.B @ f.A).double()
        return out

    def states(delta: dict, texts: list[str]) -> list[torch.Tensor]:
        model.load_state_dict(
            {k: (w0[k].double() + delta.get(k, 0)).float() for k in w0}
        )
        with torch.no_grad():
            return [
                model(
                    **tokenizer(t, return_tensors="pt", truncation=True, max_length=128)
                )
                .last_hidden_state[0]
                .double()
                for t in texts
            ]

    def distance(merged: list, own: list, pool: bool) -> float:
        if pool:
            merged, own = [h.mean(0) for h in merged], [h.mean(0) for h in own]
        num = sum(
            float((a - b).square().sum()) for a, b in zip(merged, own, strict=True)
        )
        return num / sum(float(b.square().sum()) for b in own)

    print("| seed | rule | report | token-level | mean-pooled | labels (val) |")
    print("|---|---|---|---|---|---|")
    for seed in (0, 1, 2):
        root = ROOT / f"bench/work/real/full/minilm/seed{seed}"
        texts = {
            t: [json.loads(x)["text"] for x in open(root / f"data-{t}.jsonl")][:16]
            for t in TASKS
        }
        own = {t: states(dense(root / f"lora-{t}"), texts[t]) for t in TASKS}
        for row, tuned in ROWS.items():
            report = json.loads((root / f"merges/{row}/merge_report.json").read_text())
            chosen = report["training"]["scale_search"]["chosen"]
            at_one = {
                k: v / chosen for k, v in dense(root / f"merges/{row}/adapter").items()
            }
            objective = {True: {}, False: {}}
            for c in GRID:
                merged = {
                    t: states({k: c * v for k, v in at_one.items()}, texts[t])
                    for t in TASKS
                }
                for pool in objective:
                    objective[pool][c] = sum(
                        distance(merged[t], own[t], pool) for t in TASKS
                    ) / len(TASKS)
            val = json.loads((root / f"scores/{tuned}.json").read_text())
            accuracy = {
                float(k.removeprefix("val@")): sum(sum(x) / len(x) for x in v.values())
                / len(v)
                for k, v in val.items()
                if k.startswith("val@")
            }
            token = min(GRID, key=objective[False].get)
            pooled = min(GRID, key=objective[True].get)
            print(
                f"| {seed} | {row.removesuffix('_auto')} | {chosen} | {token} | "
                f"{pooled} | {max(accuracy, key=accuracy.get)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
