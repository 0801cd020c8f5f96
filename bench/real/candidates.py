"""Two task x domain candidates measured outside run.py (seed 0; docs/quality-real.md,
"Looking for a regime with headroom"); neither has headroom, so neither is a
``Regime``.

    python bench/real/candidates.py bilingual|opaque [--seed 0]

* ``bilingual``: the German regime, its domain adapter reading bilingual text
  (720 packages of sections no topic uses: the German description, then the
  English one), so that predicting the English needs the German read.
* ``opaque``: the dictionary regime with every FOLDOC term replaced by an id
  ("Q51359", in its definition too), so that a term's name carries no prior.

Prints combined / control / H on val and test for the adapters alone, their
sums and the jointly trained adapter (every row weighing alike).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from pathlib import Path

from build import dumpavail, other_sections, translations
from data import TASKS, _clean, _one_per_source, parse_package_index
from evaluate import adapter_updates
from run import Bench, accuracy, harmonic
from train import train_lora


def bilingual(bench: Bench) -> tuple[dict, list[dict], str, str]:
    """(labelled question rows per split, domain texts, combined task, control task)."""
    german = translations("de")
    pairs = _one_per_source(
        (
            f"Deutsch: {_clean(german[package], 150)}\nEnglish: {_clean(english, 150)}",
            section,
            source,
        )
        for package, english, section, source in parse_package_index(dumpavail())
        if package in german and section not in TASKS["topic_fr"].classes
    )
    domain = [
        {"text": r["text"]} for r in other_sections(list(pairs), "text_de_en")["train"]
    ]
    split = {s: bench.split("topic_de", s) for s in ("val", "test")}
    return split, domain, "topic_de", "topic_en"


def opaque(bench: Bench) -> tuple[dict, list[dict], str, str]:
    subject = {label: tag for tag, label in TASKS["topic_foldoc"].classes.items()}
    ids: dict[str, str] = {}
    rows: dict[str, list[dict]] = {}
    for r in bench.rows["topic_foldoc"]:
        term, _, definition = r["text"].partition(": ")
        if term not in ids:
            n = int(hashlib.sha256(term.encode()).hexdigest()[:8], 16) % 90000
            while f"Q{n + 10000}" in ids.values():
                n = (n + 1) % 90000
            ids[term] = f"Q{n + 10000}"
        definition = re.sub(re.escape(term), ids[term], definition, flags=re.I)
        rows.setdefault(r["split"], []).append(
            {
                "task": "topic_terms",
                "text": ids[term],
                "label": r["label"],
                "def": definition,
            }
        )
    domain = [
        {"text": f"{x['text']}: <{subject[x['label']]}> {x['def']}"}
        for split in rows.values()
        for x in split
    ]
    return rows, domain, "topic_terms", "topic_debian"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("candidate", choices=["bilingual", "opaque"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="bench/work/real")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bench = Bench(Path(args.work), quick=False)
    root = bench.work / "full" / f"{args.candidate}/seed{args.seed}"
    if args.candidate == "bilingual":
        questions, domain, combined, control = bilingual(bench)
        task_rows, epochs = bench.split(control, "train"), 1
    else:
        questions, domain, combined, control = opaque(bench)
        task_rows, epochs = bench.split(control, "train") + questions["train"], 8
    seed = args.seed
    task = train_lora(bench.base, root / "lora-task", {"task": task_rows}, seed, 1)
    dom = train_lora(bench.base, root / "lora-domain", {"domain": domain}, seed, epochs)
    joint = train_lora(
        bench.base,
        root / "lora-joint",
        {"task": task_rows, "domain": domain * epochs},
        seed,
        1,
        row_mean=True,
    )
    T, D, J = (adapter_updates(a) for a in (task, dom, joint))
    for name, updates in (
        ("base", {}),
        ("task adapter alone", T),
        ("domain adapter alone", D),
        ("task + domain", {k: T[k] + D[k] for k in T}),
        ("task + domain / 2", {k: T[k] + D[k] / 2 for k in T}),
        ("task + 2 domain", {k: T[k] + 2 * D[k] for k in T}),
        ("jointly trained", J),
    ):
        for split in ("val", "test"):
            rows = {combined: questions[split], control: bench.split(control, split)}
            r = bench.evaluator.correct(rows, updates=updates)
            a, b = accuracy(r[combined]), accuracy(r[control])
            print(
                f"{name:22s} {split:4s} {100 * a:5.1f} / {100 * b:5.1f}  H {100 * harmonic(a, b):5.1f}"
            )


if __name__ == "__main__":
    main()
