"""MiniLM token classifiers as PEFT saves them: `lambda: auto` reading the heads.

heads.py's protocol for PEFT ``TOKEN_CLS`` adapters: three word-tagging
tasks on the benchmark's real texts, each word tagged from WordNet (Debian's
``wordnet-base``): ``pos`` tags every word of the fortunes with its most
frequent part of speech (or none); ``noun_sense`` tags each noun of the
FOLDOC definitions with the lexicographer file (supersense) of its first
sense; ``verb_sense`` each verb of the WordNet verb glosses likewise (a word
is tagged in its base form, as WordNet lists it; other words are not
scored). Each task trains a ``BertForTokenClassification`` LoRA and head
(heads.py's targets, rank, steps and learning rate); the package merges
them, keeping each head beside the merged LoRA, and each task is scored
through ``PeftModel.from_pretrained`` on ``AutoModelForTokenClassification``
(accuracy over the tagged words of the task's split).

    python bench/real/token_heads.py --seeds 0 1 2

Results: docs/quality-real-token-heads.json; ``--table`` prints them.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from heads import WORK, Protocol, main, peft_classifier, rows, train_peft  # noqa: E402
from minilm import minilm_folder  # noqa: E402

RESULTS = HERE.parent.parent / "docs" / "quality-real-token-heads.json"
WORDNET = Path("/usr/share/wordnet")
PARTS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}  # index.<part>
# task -> (the data.py task whose texts it tags, WordNet part, classes): for
# the sense tasks each class a lexicographer file, the rest of the part "other"
TOKEN_TASKS = {
    "pos": ("fortune", None, ("noun", "verb", "adj", "adv", "none")),
    "noun_sense": (
        "foldoc",
        "noun",
        ("noun.act", "noun.artifact", "noun.cognition", "noun.communication")
        + ("noun.person", "other"),
    ),
    "verb_sense": (
        "wn_verb",
        "verb",
        ("verb.change", "verb.communication", "verb.contact", "verb.motion")
        + ("verb.stative", "other"),
    ),
}
LEXICOGRAPHER_FILES = {  # WordNet's lexnames: the files the classes name
    4: "noun.act",
    6: "noun.artifact",
    9: "noun.cognition",
    10: "noun.communication",
    18: "noun.person",
    30: "verb.change",
    32: "verb.communication",
    35: "verb.contact",
    38: "verb.motion",
    42: "verb.stative",
}


def parse_index(index: str, data: str) -> dict[str, tuple[int, int]]:
    """word -> (its synset count, lexicographer file number of its first
    sense), from WordNet's index.<part> and data.<part> texts."""
    files = {
        line.split(" ", 2)[0]: int(line.split(" ", 2)[1])
        for line in data.splitlines()
        if line and not line.startswith(" ")
    }
    words = {}
    for line in index.splitlines():
        if not line or line.startswith(" "):
            continue
        fields = line.split()
        pointers = int(fields[3])
        first = fields[4 + pointers + 2]  # after sense_cnt and tagsense_cnt
        words[fields[0]] = (int(fields[2]), files[first])
    return words


@functools.cache
def lexicon(part: str) -> dict[str, tuple[int, int]]:
    return parse_index(
        (WORDNET / f"index.{part}").read_text(errors="replace"),
        (WORDNET / f"data.{part}").read_text(errors="replace"),
    )


def tag(task: str, word: str, lexicons: dict) -> str | None:
    """The word's class in ``task`` (None: not scored)."""
    _, part, classes = TOKEN_TASKS[task]
    if not word.isalpha():
        return None
    key = word.lower()
    if part is None:  # the part of speech with the most senses
        counts = {p: lexicons[p].get(key, (0, 0))[0] for p in PARTS}
        best = max(counts, key=lambda p: (counts[p], -list(PARTS).index(p)))
        return best if counts[best] else "none"
    if key not in lexicons[part]:
        return None
    name = LEXICOGRAPHER_FILES.get(lexicons[part][key][1])
    return name if name in classes else "other"


def tagged(task: str, text: str) -> tuple[list[str], list[str | None]]:
    words = re.findall(r"[A-Za-z]+|[^\sA-Za-z]+", text)
    lexicons = {p: lexicon(p) for p in PARTS}
    return words, [tag(task, w, lexicons) for w in words]


def encode_words(tokenizer, task: str, chunk: list[dict]):
    """The batch and each token's class index (-100: not scored; a word is
    scored on its first token)."""
    classes = TOKEN_TASKS[task][2]
    pairs = [tagged(task, r["text"]) for r in chunk]
    batch = tokenizer(
        [w for w, _ in pairs],
        is_split_into_words=True,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=128,
    )
    labels = torch.full(batch["input_ids"].shape, -100)
    for i, (_, tags) in enumerate(pairs):
        previous = None
        for j, word in enumerate(batch.word_ids(i)):
            if word is not None and word != previous and tags[word] is not None:
                labels[i, j] = classes.index(tags[word])
            previous = word
    return batch, labels


def classifier(task: str):
    from transformers import AutoModelForTokenClassification

    return AutoModelForTokenClassification.from_pretrained(
        minilm_folder(), dtype=torch.float32, num_labels=len(TOKEN_TASKS[task][2])
    )


def source_rows(task: str, split: str) -> list[dict]:
    return rows(TOKEN_TASKS[task][0], split)


def train(task: str, seed: int, out: Path) -> Path:
    """heads.py's recipe for a TOKEN_CLS adapter."""

    def loss(model, tokenizer):
        def of(chunk: list[dict]) -> torch.Tensor:
            batch, labels = encode_words(tokenizer, task, chunk)
            return model(**batch, labels=labels).loss

        return of

    return train_peft(
        lambda: classifier(task),
        "TOKEN_CLS",
        loss,
        source_rows(task, "train"),
        seed,
        out,
        f"tag {task}",
    )


@torch.inference_mode()
def accuracy(adapter: Path, task: str, split: str) -> float:
    """The share of the split's tagged words this PEFT adapter tags right."""
    tokenizer, model = peft_classifier(lambda: classifier(task), adapter)
    data = source_rows(task, split)
    correct = total = 0
    for i in range(0, len(data), 64):
        batch, labels = encode_words(tokenizer, task, data[i : i + 64])
        predicted = model(**batch).logits.argmax(-1)
        scored = labels != -100
        correct += int((predicted[scored] == labels[scored]).sum())
        total += int(scored.sum())
    return correct / total


def prompts(task: str, seed: int) -> str:
    """The task's training texts (lambda: auto reads the first 16 or 64)."""
    return "".join(
        json.dumps({"text": r["text"]}) + "\n" for r in source_rows(task, "train")
    )


TOKENS = Protocol(
    "minilm_tok",
    tuple(TOKEN_TASKS),
    train,
    accuracy,
    prompts,
    RESULTS,
    rules=("lora_task_arithmetic", "lora_tsv_m", "tsv_m mean", "lora_iso_c")
    + ("lora_wudi", "lora_regmean", "regmean merged"),
)

if __name__ == "__main__":
    assert WORK.exists(), "run bench/real/setup.sh first"
    main(TOKENS)
