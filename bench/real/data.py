"""Labelled text from Debian packages: the real-text tasks of the benchmark.

Every task is a six-way classification written as a next-token question: a
prompt ending in ``Answer:`` and a one-token label word (with its leading
space) per class, scored by rank classification over the task's six labels.
Parsers take text and return ``(text, class)`` rows, so they are tested on
tiny inputs without the Debian files (tests/test_real_bench.py).

Sources (Debian packages, installed by bench/real/setup.sh):
* ``wordnet-base``: noun and verb synsets with their lexicographer file
  (WordNet's supersense), the gloss as text;
* ``fortunes``: which fortune file an epigram comes from;
* ``apt-cache dumpavail``: package descriptions -> archive section, one
  package per source package (no near-duplicate descriptions across splits);
* ``dict-foldoc``: FOLDOC definitions -> their first subject tag.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str
    classes: dict[str, str]  # class in the source -> one-token label word
    source: str  # where the rows come from, for the docs


# the language regime: the same skill asked in English (the task's own
# language) and in French (the domain: a language the base model reads poorly)
LANGUAGE_TOPICS = {
    "games": "games",
    "graphics": "graphics",
    "mail": "mail",
    "net": "network",
    "math": "math",
    "sound": "sound",
}
LANGUAGE_INSTRUCTION = (
    "What is this about? (games, graphics, mail, network, math, sound)"
)

TASKS = {
    "wn_noun": Task(
        "wn_noun",
        "What kind of thing does this dictionary entry name? "
        "(animal, plant, food, person, place, object)",
        {
            "05": "animal",
            "20": "plant",
            "13": "food",
            "18": "person",
            "15": "place",
            "06": "object",
        },
        "wordnet-base data.noun: noun synsets by lexicographer file",
    ),
    "wn_verb": Task(
        "wn_verb",
        "What kind of action does this dictionary entry describe? "
        "(motion, speech, change, touch, thought, eating)",
        {
            "38": "motion",
            "32": "speech",
            "30": "change",
            "35": "touch",
            "31": "thought",
            "34": "eating",
        },
        "wordnet-base data.verb: verb synsets by lexicographer file",
    ),
    "fortune": Task(
        "fortune",
        "Which collection is this quotation from? "
        "(computers, food, law, love, sports, politics)",
        {c: c for c in ("computers", "food", "law", "love", "sports", "politics")},
        "fortunes: the fortune file of each epigram",
    ),
    "debian": Task(
        "debian",
        "Which archive section does this software package belong to? "
        "(science, sound, text, admin, web, editors)",
        {c: c for c in ("science", "sound", "text", "admin", "web", "editors")},
        "apt-cache dumpavail: package descriptions by Section",
    ),
    "foldoc": Task(
        "foldoc",
        "What is the subject of this computing dictionary entry? "
        "(language, programming, jargon, company, hardware, system)",
        {
            "language": "language",
            "programming": "programming",
            "jargon": "jargon",
            "company": "company",
            "hardware": "hardware",
            "operating system": "system",
        },
        "dict-foldoc: FOLDOC entries by their first subject tag",
    ),
    # TaDA's regime: one skill (topic in six classes) learned on package
    # descriptions, asked of computing-dictionary entries (the domain)
    "topic_debian": Task(
        "topic_debian",
        "What is this about? (games, graphics, database, mail, network, math)",
        {
            "games": "games",
            "graphics": "graphics",
            "database": "database",
            "mail": "mail",
            "net": "network",
            "math": "math",
        },
        "apt-cache dumpavail: descriptions of sections games, graphics, "
        "database, mail, net, math",
    ),
    "topic_foldoc": Task(
        "topic_foldoc",
        "What is this about? (games, graphics, database, mail, network, math)",
        {
            "games": "games",
            "graphics": "graphics",
            "database": "database",
            "messaging": "mail",
            "networking": "network",
            "mathematics": "math",
        },
        "dict-foldoc: entries tagged games, graphics, database, messaging, "
        "networking, mathematics",
    ),
    # knowledge as the domain: the same skill asked of the FOLDOC term alone
    "topic_terms": Task(
        "topic_terms",
        "What is this about? (games, graphics, database, mail, network, math)",
        {w: w for w in ("games", "graphics", "database", "mail", "network", "math")},
        "topic_foldoc's rows, the term alone (what it is about is stated only "
        "in its definition)",
    ),
    "topic_en": Task(
        "topic_en",
        LANGUAGE_INSTRUCTION,
        LANGUAGE_TOPICS,
        "apt-cache dumpavail: English descriptions of sections games, graphics, "
        "mail, net, math, sound (no source package of topic_fr's val or test)",
    ),
    "topic_fr": Task(
        "topic_fr",
        LANGUAGE_INSTRUCTION,
        LANGUAGE_TOPICS,
        "Debian's Translation-fr: French descriptions of the same sections",
    ),
    "topic_de": Task(
        "topic_de",
        LANGUAGE_INSTRUCTION,
        LANGUAGE_TOPICS,
        "Debian's Translation-de: German descriptions of the same sections "
        "(no source package of topic_en)",
    ),
}
MULTITASK = ("wn_noun", "wn_verb", "fortune", "debian", "foldoc")


def _clean(text: str, limit: int = 240) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text[:limit].rsplit(" ", 1)[0] if len(text) > limit else text


def parse_wordnet(data: str) -> Iterable[tuple[str, str]]:
    """``data.noun``/``data.verb`` lines -> ("lemma: gloss", lexfile number)."""
    for line in data.splitlines():
        if not line or line.startswith(" "):
            continue
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        if len(fields) < 5 or not gloss:
            continue
        lemma = fields[4].replace("_", " ")
        gloss = gloss.split(";")[0].strip()
        yield _clean(f"{lemma}: {gloss}"), fields[1]


def parse_fortunes(text: str, name: str) -> Iterable[tuple[str, str]]:
    """A fortune file (entries separated by lines of ``%``) -> (epigram, file)."""
    for entry in re.split(r"^%\s*$", text, flags=re.M):
        entry = _clean(entry)
        if len(entry) >= 20:
            yield entry, name


def _stanzas(text: str) -> Iterable[dict[str, str]]:
    """Debian control stanzas -> fields; continuation lines joined, the
    paragraph marks (" .") dropped."""
    for stanza in text.split("\n\n"):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.startswith(" ") and key:
                fields[key] += " " + line.strip().strip(".")
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


def parse_package_index(text: str) -> Iterable[tuple[str, str, str, str]]:
    """``apt-cache dumpavail`` -> (package, description, section, source) per package."""
    for fields in _stanzas(text):
        if "Description" not in fields or "Section" not in fields:
            continue
        package = fields.get("Package", "")
        source = fields.get("Source", package).split()[0]
        section = fields["Section"].rsplit("/", 1)[-1]
        yield package, _clean(fields["Description"]), section, source


def _one_per_source(
    rows: Iterable[tuple[str, str, str]],
) -> Iterable[tuple[str, str, str]]:
    """(description, section, source) rows, the first of each source package."""
    seen = set()
    for row in rows:
        if row[2] not in seen:
            seen.add(row[2])
            yield row


def parse_packages(text: str) -> Iterable[tuple[str, str, str]]:
    """``apt-cache dumpavail`` -> (description, section, source), one per source."""
    return _one_per_source(
        (description, section, source)
        for _, description, section, source in parse_package_index(text)
    )


def parse_translations(text: str, language: str) -> dict[str, str]:
    """A Debian ``Translation-<language>`` index -> package -> description."""
    key = f"Description-{language}"
    return {
        f["Package"]: _clean(f[key])
        for f in _stanzas(text)
        if "Package" in f and key in f
    }


def translated_packages(
    index: str, translations: dict[str, str]
) -> Iterable[tuple[str, str, str]]:
    """(translated description, section, source), one per source package that
    has a translation."""
    return _one_per_source(
        (translations[package], section, source)
        for package, _, section, source in parse_package_index(index)
        if package in translations
    )


def parse_foldoc(text: str) -> Iterable[tuple[str, str]]:
    """FOLDOC's dict text -> ("term: definition", first subject tag)."""
    for block in re.split(r"\n(?=\S)", text):
        lines = block.split("\n")
        term = lines[0].strip()
        body = " ".join(s.strip() for s in lines[1:]).strip()
        match = re.match(r"<([a-z ,-]+)>\s*(.*)", body)
        if not term or not match:
            continue
        subject = match.group(1).split(",")[0].strip()
        definition = re.sub(r"[{}]", "", match.group(2))
        definition = re.sub(r"\(\d{4}-\d\d-\d\d\)", "", definition)
        if len(definition) >= 20:
            yield _clean(f"{term}: {definition}"), subject


def read_foldoc(path: str) -> str:
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
        return fh.read()


def split_group(key: str) -> float:
    """A stable number in [0, 1) per group key (a source package, a text)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32


def balanced_splits(
    rows: list[tuple[str, str, str]],
    task: Task,
    sizes: dict[str, int],
    seed: int = 0,
) -> dict[str, list[dict]]:
    """rows (text, class, group) -> splits of ``sizes[split]`` rows per class.

    Groups (source packages, or the text itself) never straddle splits: the
    groups of each class are ordered by a hash and dealt to the splits in
    order, then each split is shuffled with ``seed``.
    """
    by_class: dict[str, list[tuple[str, str, str]]] = {c: [] for c in task.classes}
    seen = set()
    for text, cls, group in rows:
        if cls in by_class and text not in seen:
            seen.add(text)
            by_class[cls].append((text, cls, group))
    need = sum(sizes.values())
    splits: dict[str, list[dict]] = {name: [] for name in sizes}
    for cls, items in by_class.items():
        if len(items) < need:
            raise ValueError(
                f"{task.name}: class {cls} has {len(items)} rows, {need} needed"
            )
        items.sort(key=lambda r: (split_group(r[2]), r[0]))
        start = 0
        for name, size in sizes.items():
            for text, _, _ in items[start : start + size]:
                splits[name].append(
                    {"text": text, "label": task.classes[cls], "task": task.name}
                )
            start += size
    rng = random.Random(seed)
    for rows_ in splits.values():
        rng.shuffle(rows_)
    return splits


def term_rows(rows: list[dict]) -> list[dict]:
    """FOLDOC rows ("term: definition") with the term alone."""
    return [
        r | {"text": r["text"].partition(": ")[0], "task": "topic_terms"} for r in rows
    ]


def tagged_rows(rows: list[dict]) -> list[dict]:
    """FOLDOC rows ("term: definition") as the dictionary prints them, the
    subject tag after the term ("term: <games> definition"): text that states
    what each term is about."""
    subject = {label: tag for tag, label in TASKS["topic_foldoc"].classes.items()}
    out = []
    for r in rows:
        term, _, definition = r["text"].partition(": ")
        text = f"{term}: <{subject[r['label']]}> {definition}"
        out.append(r | {"text": text, "task": "foldoc_tagged"})
    return out


def prompt(task: Task, text: str) -> str:
    """The question put to the model; the answer is ' ' + label."""
    return f"{task.instruction}\n{text}\nAnswer:"
