"""Can unlabeled prompts pick the task/domain balance? Screening label-free rules.

headroom.py scored task arithmetic at every (a, b) in {0, 0.25, ..., 2}^2 with
the labels. Here, for the same merges, label-free quantities are computed on
the unlabeled prompts TaDA already reads (32 domain calibration prompts, 32
task-style prompts), and each rule's chosen pair is looked up in that grid:

* ``kl max`` / ``kl sum``: the merged model's next-token distribution against
  each adapter alone on that adapter's prompts (KL(p_task || p_merged) on the
  task prompts, KL(p_domain || p_merged) on the domain prompts, mean over
  tokens); the pair minimizing the larger one / their sum. A merge that keeps
  both skills should behave like each expert on the expert's inputs.
* ``kl max, last token``: the same with the task prompts' last position only
  (where a task-style prompt's answer starts).
* ``agreement`` / ``agreement, last token``: the smaller of the two shares of
  tokens where the merged model's greedy next token is the expert's (on that
  expert's prompts), maximized.
* ``continuation``: each expert continues its own unlabeled inputs greedily
  (a task-style prompt: the next 3 tokens; a domain text: its last 2 tokens,
  held out), and the merged model must continue them the same way; the pair
  maximizing the smaller of the two exact-match shares.
* ``perturbations equalised`` / ``perturbation-proportional``: a probe-derived
  balance with a + b = 2 (the default scale), a/b = p_D/p_T or p_T/p_D, where
  p is an adapter's median relative output perturbation RMS||dW x||/RMS||W x||
  on the domain prompts (the probe report of run.py's "tada (probe gates)");
  the grid pair nearest to it.
* ``entropy``: TARA's objective, the smaller-is-better mean entropy of the
  merged model on both prompt sets (max of the two gaps to each expert's own).

No labels are used to choose; the grid's labelled scores only judge the choice.
Writes docs/quality-balance.md and .json.

    .venv/bin/python bench/quality/balance.py [--worlds default quiet]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from headroom import GRID  # noqa: E402
from report import doc_stem  # noqa: E402
from run import WORK, Ctx, load_base  # noqa: E402
from world import WORLDS, World, WorldSpec, world_root  # noqa: E402

from mergekit_tada.adapters import LoraAdapter  # noqa: E402
from mergekit_tada.texts import read_texts  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs"
PROMPTS = 32  # TaDA's calibration_samples default
RULES = (
    "kl max",
    "kl sum",
    "kl max, last token",
    "agreement",
    "agreement, last token",
    "continuation",
    "perturbations equalised",
    "perturbation-proportional",
    "entropy",
)
TASK_TOKENS, DOMAIN_HELD_OUT = 3, 2


def _prompts(path: Path, tok) -> dict[str, torch.Tensor]:
    batch = tok(
        read_texts(path, "balance screening", limit=PROMPTS),
        return_tensors="pt",
        padding=True,
    )
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _log_probs(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.log_softmax(-1)


def _kl(expert: torch.Tensor, merged: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over real tokens of KL(expert || merged)."""
    kl = (expert.exp() * (expert - merged)).sum(-1)
    return float((kl * mask).sum() / mask.sum())


def _agreement(expert: torch.Tensor, merged: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of real tokens where both predict the same next token."""
    same = (expert.argmax(-1) == merged.argmax(-1)).float()
    return float((same * mask).sum() / mask.sum())


def _grouped(path: Path, tok, cut: int) -> list[torch.Tensor]:
    """The prompts' token ids without their last ``cut`` tokens, in batches of
    one length (greedy continuation needs no padding then)."""
    by_length: dict[int, list] = {}
    for line in read_texts(path, "balance screening", limit=PROMPTS):
        ids = tok(line)["input_ids"]
        ids = ids[: len(ids) - cut]
        by_length.setdefault(len(ids), []).append(ids)
    return [torch.tensor(rows) for _, rows in sorted(by_length.items())]


def _continue(model, batches: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for x in batches:
            for _ in range(n):
                nxt = model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)
                x = torch.cat([x, nxt], 1)
            out.append(x[:, -n:])
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Share of rows whose continuations are equal."""
    equal = sum(int((x == y).all(1).sum()) for x, y in zip(a, b, strict=True))
    return equal / sum(len(x) for x in a)


def _entropy(logp: torch.Tensor, mask: torch.Tensor) -> float:
    h = -(logp.exp() * logp).sum(-1)
    return float((h * mask).sum() / mask.sum())


def _last(mask: torch.Tensor) -> torch.Tensor:
    """A mask of each row's last real token."""
    last = torch.zeros_like(mask)
    last[torch.arange(mask.shape[0]), mask.sum(1).long() - 1] = 1
    return last


def screen(world_name: str, seed: int, log=print) -> dict:
    from transformers import AutoTokenizer

    world = World.generate(WorldSpec(seed=seed, **WORLDS[world_name]))
    root = world_root(WORK, world_name, seed)
    ctx = Ctx(root, seed, world, root / "balance")
    tok = AutoTokenizer.from_pretrained(ctx.base)
    model = load_base(ctx)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    deltas = {}
    for role in ("task", "domain"):
        adapter = LoraAdapter(ctx.lora(role))
        deltas[role] = {
            f"{m}.weight": (lambda f: f.B @ f.A)(adapter.factors(m))
            for m in adapter.modules
        }
    sets = {
        "task": _prompts(root / "task-calibration.txt", tok),
        "domain": _prompts(root / "calibration.txt", tok),
    }
    masks = {k: v["attention_mask"].float() for k, v in sets.items()}
    heads = {
        "task": (_grouped(root / "task-calibration.txt", tok, 0), TASK_TOKENS),
        "domain": (
            _grouped(root / "calibration.txt", tok, DOMAIN_HELD_OUT),
            DOMAIN_HELD_OUT,
        ),
    }

    def load(a: float, b: float) -> None:
        state = dict(base)
        for name in set(deltas["task"]) | set(deltas["domain"]):
            w = base[name].clone()
            if name in deltas["task"]:
                w += a * deltas["task"][name]
            if name in deltas["domain"]:
                w += b * deltas["domain"][name]
            state[name] = w
        model.load_state_dict(state)

    experts = {}
    for role, pair in (("task", (1.0, 0.0)), ("domain", (0.0, 1.0))):
        load(*pair)
        experts[role] = _log_probs(model, sets[role])
        experts[f"{role} continued"] = _continue(model, *heads[role])
    own_entropy = {r: _entropy(experts[r], masks[r]) for r in sets}
    values = {}
    for a in GRID:
        for b in GRID:
            load(a, b)
            merged = {r: _log_probs(model, sets[r]) for r in sets}
            same = {
                r: _same(experts[f"{r} continued"], _continue(model, *heads[r]))
                for r in heads
            }
            kl = {r: _kl(experts[r], merged[r], masks[r]) for r in sets}
            values[f"{a},{b}"] = {
                "kl_task": kl["task"],
                "kl_domain": kl["domain"],
                "kl_task_last": _kl(
                    experts["task"], merged["task"], _last(masks["task"])
                ),
                "agree_task": _agreement(
                    experts["task"], merged["task"], masks["task"]
                ),
                "agree_task_last": _agreement(
                    experts["task"], merged["task"], _last(masks["task"])
                ),
                "agree_domain": _agreement(
                    experts["domain"], merged["domain"], masks["domain"]
                ),
                "continued_task": same["task"],
                "continued_domain": same["domain"],
                "entropy_gap": max(
                    _entropy(merged[r], masks[r]) - own_entropy[r] for r in sets
                ),
            }
    objectives = {
        "kl max": lambda v: max(v["kl_task"], v["kl_domain"]),
        "kl sum": lambda v: v["kl_task"] + v["kl_domain"],
        "kl max, last token": lambda v: max(v["kl_task_last"], v["kl_domain"]),
        "agreement": lambda v: -min(v["agree_task"], v["agree_domain"]),
        "agreement, last token": lambda v: (
            -min(v["agree_task_last"], v["agree_domain"])
        ),
        "continuation": lambda v: -min(v["continued_task"], v["continued_domain"]),
        "entropy": lambda v: v["entropy_gap"],
    }
    chosen = {
        rule: min(values, key=lambda k, f=f: (f(values[k]), k))
        for rule, f in objectives.items()
    }
    report = json.loads(
        (root / "merges" / "tada_probe_gates" / "tada_report.json").read_text()
    )["modules"]
    both = [
        r
        for r in report.values()
        if r.get("perturbation_task") and r.get("perturbation_domain")
    ]
    p_task = statistics.median(r["perturbation_task"] for r in both)
    p_domain = statistics.median(r["perturbation_domain"] for r in both)
    for rule, ratio in (
        ("perturbations equalised", p_domain / p_task),
        ("perturbation-proportional", p_task / p_domain),
    ):
        a = 2 * ratio / (1 + ratio)  # a / b = ratio, a + b = 2
        chosen[rule] = min(
            values,
            key=lambda k, a=a: (
                math.dist([float(x) for x in k.split(",")], [a, 2 - a]),
                k,
            ),
        )
    log(
        f"  {world_name} seed {seed}: "
        + ", ".join(f"{r} {c}" for r, c in chosen.items())
    )
    return {"values": values, "chosen": chosen}


def write_docs(results: dict, seconds: float) -> None:
    lines = [
        "# Label-free balance rules, screened on the headroom grid "
        "(bench/quality/balance.py)",
        "",
        f"{seconds / 60:.1f} min. Each rule picks one (task, domain) weight pair "
        "per world from unlabeled prompts only; the pair's scores are the "
        "labelled ones from the headroom grid (task arithmetic at that pair). "
        "Exact match %; H = harmonic mean of combined and task control.",
        "",
    ]
    summary = {}
    for world_name, seeds in results.items():
        headroom = json.loads(
            (DOCS / f"{doc_stem(world_name)}-headroom.json").read_text()
        )["seeds"]
        lines += [
            f"## {world_name} world",
            "",
            "| rule | "
            + " | ".join(f"seed {s}: pair, combined, H" for s in seeds)
            + " | mean combined | mean H |",
            "|---" * (len(seeds) + 3) + "|",
        ]
        rows = {"best pair (labels)": {}, "1/1": {}}
        for seed in seeds:
            best = ",".join(map(str, headroom[seed]["best"]))
            rows["best pair (labels)"][seed] = best
            rows["1/1"][seed] = "1.0,1.0"
            for rule in RULES:
                rows.setdefault(rule, {})[seed] = seeds[seed]["chosen"][rule]
        summary[world_name] = {}
        for rule, picks in rows.items():
            cells, comb, hs = [], [], []
            for seed, pair in picks.items():
                row = headroom[seed]["grid"][pair]
                comb.append(row["combined"])
                hs.append(row["H"])
                cells.append(f"({pair}) {row['combined']:.1f}, {row['H']:.1f}")
            mean_c, mean_h = sum(comb) / len(comb), sum(hs) / len(hs)
            summary[world_name][rule] = {"combined": mean_c, "H": mean_h}
            lines.append(
                f"| {rule} | " + " | ".join(cells) + f" | {mean_c:.1f} | {mean_h:.1f} |"
            )
        lines.append("")
    (DOCS / "quality-balance.md").write_text("\n".join(lines))
    (DOCS / "quality-balance.json").write_text(
        json.dumps({"summary": summary, "worlds": results}, indent=1, sort_keys=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worlds", nargs="+", default=["default", "quiet"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    results = {w: {str(s): screen(w, s) for s in args.seeds} for w in args.worlds}
    write_docs(results, time.time() - start)


if __name__ == "__main__":
    main()
