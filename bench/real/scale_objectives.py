"""Would ``lambda: auto`` pick the label-tuned scale with another agreement
objective? (docs/quality-real.md, "RegMean++ and a label-free scale".)

    python bench/real/scale_objectives.py --model minilm|smollm2 [--count N] [--held-out]

Reads the cached ``auto`` merges of ``run.py`` (multi-task parts, 3 seeds):
each merge at scale 1 is the written update over the scale it chose. Every
candidate of the grid is run with plain transformers forwards on each
model's first N prompts (16, as ``auto_samples``; ``--held-out``, MiniLM
only: the first N validation texts, which no adapter was trained on), and
scored by each objective (the smallest wins, ties the smaller scale):

* both models, ``tokens``: the shipped objective (its choice on 16 training
  prompts must equal the report's): KL(p_t || p_c) over every token of
  SmolLM2's prompts; ||H_c - H_t||^2 / ||H_t||^2 over MiniLM's tokens;
* MiniLM, ``pooled``: the same on each prompt's mean-pooled states; ``CKA
  pooled`` and ``CKA tokens``: minus the linear CKA of the merge's pooled
  (token) states with model t's (1 where one is a rotation and scaling of the
  other, what a linear head trained on model t could still separate); ``head
  KL``: KL from task t's head on model t's pooled states to the same head on
  the merge's; ``head top-1``: how often that head's top class on the merge
  is its top class on model t (ties: head KL) — what the adapters' heads
  would allow, were they in the adapter folders;
* SmolLM2, ``response KL`` and ``response top-1``: the same two at each
  prompt's last position only, the first token of the answer (the adapters
  were trained on the answer's tokens alone).

Prints, per seed and rule, each objective's pick with the normalised test
accuracy at it where the bench scored that scale (docs/quality-real.json:
the rule's c = 1 and label-tuned rows, the ``auto`` row's choice), and the
label-tuned c*.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "bench/real"))
from evaluate import adapter_updates  # noqa: E402
from report import scored_at  # noqa: E402

from mergekit_tada.probe.agreement import GRID  # noqa: E402

TASKS = ("wn_noun", "wn_verb", "fortune", "debian", "foldoc")
RULES = {  # auto merge folder -> (the rule's row, its auto row)
    "lora_tsv_m_auto": ("lora_tsv_m", "lora_tsv_m auto"),
    "task_arithmetic_auto": ("task arithmetic (sum)", "task arithmetic auto"),
    "lora_iso_c_auto": ("lora_iso_c", "lora_iso_c auto"),
    "lora_wudi_auto": ("lora_wudi", "lora_wudi auto"),
    "regmean_model_64_auto": ("regmean model 64", "regmean model 64 auto"),
}
Outputs = list  # per prompt: what the objectives compare
Objectives = Callable[[Outputs, Outputs, str], dict[str, tuple]]


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis, from log-probabilities."""
    return (p.exp() * (p - q)).sum(-1)


def cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two sets of rows (the same inputs): 1 where one is a
    rotation and scaling of the other (what a linear head could still read)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float(
        (x.T @ y).square().sum()
        / ((x.T @ x).square().sum() * (y.T @ y).square().sum()).sqrt()
    )


def minilm(seed_dir: Path) -> tuple[Callable, Objectives]:
    """The encoder's forward (final hidden states per prompt) and objectives."""
    from minilm import minilm_folder
    from transformers import AutoModel, AutoTokenizer

    base = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModel.from_pretrained(base, dtype=torch.float32).eval()
    heads = {t: load_file(str(seed_dir / f"head-{t}.safetensors")) for t in TASKS}

    def forward(texts: list[str]) -> Outputs:
        return [
            model(**tokenizer(t, return_tensors="pt", truncation=True, max_length=128))
            .last_hidden_state[0]
            .double()
            for t in texts
        ]

    def distance(merged: Outputs, own: Outputs) -> float:
        num = sum(
            float((a - b).square().sum()) for a, b in zip(merged, own, strict=True)
        )
        return num / sum(float(b.square().sum()) for b in own)

    def objectives(merged: Outputs, own: Outputs, task: str) -> dict[str, tuple]:
        head = heads[task]

        def log_probs(hs: Outputs) -> torch.Tensor:
            pooled = torch.stack([h.mean(0) for h in hs])
            logits = pooled @ head["weight"].double().T + head["bias"].double()
            return logits.log_softmax(-1)

        p, q = log_probs(own), log_probs(merged)
        head_kl = float(kl(p, q).mean())
        top1 = float((p.argmax(-1) == q.argmax(-1)).double().mean())
        return {
            "tokens": (distance(merged, own),),
            "CKA pooled": (
                -cka(
                    torch.stack([h.mean(0) for h in merged]),
                    torch.stack([h.mean(0) for h in own]),
                ),
            ),
            "CKA tokens": (-cka(torch.cat(merged), torch.cat(own)),),
            "pooled": (
                distance([h.mean(0) for h in merged], [h.mean(0) for h in own]),
            ),
            "head KL": (head_kl,),
            "head top-1": (-top1, head_kl),
        }

    return (model, forward), objectives


def smollm2(seed_dir: Path) -> tuple[Callable, Objectives]:
    """The causal LM's forward (next-token log-probabilities per prompt) and objectives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = ROOT / "bench/work/real/base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    def forward(texts: list[str]) -> Outputs:
        return [
            model(**tokenizer(t, return_tensors="pt"))
            .logits[0]
            .double()
            .log_softmax(-1)
            for t in texts
        ]

    def objectives(merged: Outputs, own: Outputs, task: str) -> dict[str, tuple]:
        tokens = sum(p.shape[0] for p in own)
        every = sum(float(kl(p, q).sum()) for p, q in zip(own, merged, strict=True))
        last = [float(kl(p[-1], q[-1])) for p, q in zip(own, merged, strict=True)]
        top1 = [
            float(p[-1].argmax() == q[-1].argmax())
            for p, q in zip(own, merged, strict=True)
        ]
        response_kl = sum(last) / len(last)
        return {
            "tokens": (every / tokens,),
            "response KL": (response_kl,),
            "response top-1": (-sum(top1) / len(top1), response_kl),
        }

    return (model, forward), objectives


def prompts(seed_dir: Path, task: str, held_out: bool) -> list[str]:
    """The ``auto`` pass's prompts (the task's training texts, in order), or
    with ``held_out`` its validation texts."""
    if not held_out:
        return [json.loads(x)["text"] for x in open(seed_dir / f"data-{task}.jsonl")]
    rows = map(json.loads, open(ROOT / f"bench/work/real/data/{task}.jsonl"))
    return [r["text"] for r in rows if r["split"] == "val"]


class Updated:
    """A model whose weights are the base's plus a dense update, run in float32."""

    def __init__(self, model: torch.nn.Module, forward: Callable) -> None:
        self.model, self.forward = model, forward
        self.w0 = {k: v.clone() for k, v in model.state_dict().items()}

    def run(self, delta: dict, texts: list[str]) -> Outputs:
        self.model.load_state_dict(
            {
                k: (v.double() + delta[k]).float() if k in delta else v
                for k, v in self.w0.items()
            }
        )
        with torch.no_grad():
            return self.forward(texts)


def values_at_grid(
    model: Updated, objectives: Objectives, at_one: dict, texts: dict, own: dict
) -> dict[str, dict[float, tuple]]:
    """objective -> candidate -> its value, the mean over tasks."""
    values: dict[str, dict[float, tuple]] = {}
    for c in GRID:
        scaled = {k: c * v for k, v in at_one.items()}
        per_task = [objectives(model.run(scaled, texts[t]), own[t], t) for t in TASKS]
        for key in per_task[0]:
            values.setdefault(key, {})[c] = tuple(
                sum(x) / len(TASKS)
                for x in zip(*(o[key] for o in per_task), strict=True)
            )
    return values


def main() -> None:
    args = sys.argv[1:]
    name = args[args.index("--model") + 1]
    count = int(args[args.index("--count") + 1]) if "--count" in args else 16
    held_out = "--held-out" in args
    if held_out and name != "minilm":
        raise SystemExit("--held-out: MiniLM only (its prompts are the texts alone)")
    part = {"minilm": "minilm", "smollm2": "multitask"}[name]
    results = json.loads((ROOT / "docs/quality-real.json").read_text())[part]
    torch.set_num_threads(1)
    header = False
    for seed in (0, 1, 2):
        root = ROOT / f"bench/work/real/full/{part}/seed{seed}"
        (model, forward), objectives = {"minilm": minilm, "smollm2": smollm2}[name](
            root
        )
        updated = Updated(model, forward)
        texts = {t: prompts(root, t, held_out)[:count] for t in TASKS}
        own = {
            t: updated.run(adapter_updates(root / f"lora-{t}"), texts[t]) for t in TASKS
        }
        for folder, (rule, auto) in RULES.items():
            merge = root / f"merges/{folder}"
            report = json.loads((merge / "merge_report.json").read_text())
            chosen = report["training"]["scale_search"]["chosen"]
            at_one = {
                k: v / chosen for k, v in adapter_updates(merge / "adapter").items()
            }
            values = values_at_grid(updated, objectives, at_one, texts, own)
            print(
                seed,
                folder,
                {
                    k: {c: round(v[0], 4) for c, v in d.items()}
                    for k, d in values.items()
                },
                file=sys.stderr,
                flush=True,
            )
            scored = results[str(seed)]
            cells = [
                f"{c:g}"
                + (
                    ""
                    if (x := scored_at(scored, rule, auto, c)) is None
                    else f" ({x:.1f})"
                )
                for c in (
                    chosen,
                    *(min(GRID, key=d.get) for d in values.values()),
                    scored[rule]["scale"],
                )
            ]
            if not header:
                names = ["seed", "rule", "report", *values, "c* (labels)"]
                print("| " + " | ".join(names) + " |\n|" + "---|" * len(names))
                header = True
            print(f"| {seed} | {rule} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
