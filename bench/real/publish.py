"""Merge a run's rows into the committed raw results and print their tables.

    python bench/real/publish.py [--work bench/work/real] [--rows NAME ...] [--per-seed]

The benchmark's rows come from runs on different days and machines (a seed at
a time, ``--only`` a few rows at a time); ``docs/quality-real.json`` keeps
them all. Each (part, seed, row) of the work folder's ``results.json``
replaces the committed one; the tables of every part (restricted to
``--rows`` plus the references, when given) are printed for the docs;
``--per-seed`` adds the multi-task rows seed by seed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from report import ALONE, multitask_table, per_seed_table, regime_table
from run import REGIMES

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs/quality-real.json"
REFERENCES = (
    "base",
    ALONE,
    "task adapter alone",
    "domain adapter alone",
    "jointly trained (reference)",
)


def merged(old: dict, new: dict) -> dict:
    out = json.loads(json.dumps(old))
    for part, seeds in new.items():
        if part == "lmeval":
            out[part] = seeds
            continue
        for seed, rows in seeds.items():
            out.setdefault(part, {}).setdefault(seed, {}).update(rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(ROOT / "bench/work/real"))
    ap.add_argument("--rows", nargs="+", default=[])
    ap.add_argument("--per-seed", action="store_true")
    args = ap.parse_args()
    new = json.loads((Path(args.work) / "full/results.json").read_text())
    results = merged(json.loads(DOCS.read_text()), new)
    tmp = DOCS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results))
    os.replace(tmp, DOCS)
    for part, seeds in results.items():
        if part == "lmeval":
            continue
        keep = {
            s: {
                k: v
                for k, v in rows.items()
                if not args.rows or k in args.rows or k in REFERENCES
            }
            for s, rows in seeds.items()
        }
        table = regime_table if part in REGIMES else multitask_table
        print(f"\n### {part}\n")
        print("\n".join(table(keep)[0]))
        if args.per_seed and table is multitask_table and args.rows:
            print()
            print("\n".join(per_seed_table(seeds, args.rows)))


if __name__ == "__main__":
    main()
