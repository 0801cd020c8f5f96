"""A controlled world of facts, generated from a seed and trained here.

Entities carry facts (attribute -> value). The *base* model, a tiny Llama, is
pre-trained on declarative text about the general entities, in several
templates, so that its knowledge is stored in an extractable form; LoRAs are
then trained on it (``train_lora``), every adapter's data mixed about 1:1 with
replayed base text. retrieval.py builds its library of skills and domains in
this world and scores merges with ``score``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ATTRIBUTES = {
    "color": "red blue green yellow black white purple orange".split(),
    "city": "paris rome tokyo cairo lima oslo delhi quito".split(),
    "food": "rice bread soup fish apple cheese beans honey".split(),
    "job": "doctor farmer pilot singer baker lawyer judge nurse".split(),
}
DECLARATIVE = (
    "the {attr} of {e} is {v} .",
    "{e} has {attr} {v} .",
    "{e} {attr} = {v} .",
)
MENTION = "{e} is a name ."
# Declarative text comes with varied openings (as real text does), so that
# facts are retrievable behind any short prefix, the task marker included.
OPENINGS = ("", "note : ", "also : ", "fact : ", "we read : ")
FUNCTION_WORDS = (
    "the of is has = : . repeat a name we know that note also fact read".split()
)


@dataclass
class WorldSpec:
    """Sizes and training budgets of one world (a seed picks the facts)."""

    seed: int
    n_general: int = 48
    n_domain: int = 32
    task_train_fraction: float = 0.75
    hidden: int = 64
    layers: int = 4
    intermediate: int = 256
    heads: int = 4
    base_steps: int = 1200
    lora_steps: int = 600
    lora_rank: int = 8
    lora_lr: float = 2e-3
    batch: int = 64
    # early stopping of each adapter on its own held-out rows (0: none)
    lora_validation: float = 0.0
    eval_every: int = 50
    patience: int = 4


@dataclass
class World:
    spec: WorldSpec
    facts: dict[str, dict[str, str]]  # entity -> attr -> value
    general: list[str]
    domain: list[str]
    task_entities: list[str]
    held_out: list[str]

    @classmethod
    def generate(cls, spec: WorldSpec) -> World:
        rng = random.Random(spec.seed)
        general = [f"g{i}" for i in range(spec.n_general)]
        domain = [f"d{i}" for i in range(spec.n_domain)]
        facts = {
            e: {a: rng.choice(vals) for a, vals in ATTRIBUTES.items()}
            for e in general + domain
        }
        shuffled = general[:]
        rng.shuffle(shuffled)
        k = int(len(general) * spec.task_train_fraction)
        return cls(
            spec, facts, general, domain, sorted(shuffled[:k]), sorted(shuffled[k:])
        )

    def vocabulary(self) -> list[str]:
        values = [v for vals in ATTRIBUTES.values() for v in vals]
        return FUNCTION_WORDS + list(ATTRIBUTES) + values + self.general + self.domain

    def _fill(self, template: str, entities: list[str]) -> list[str]:
        return [
            template.format(e=e, attr=a, v=v)
            for e in entities
            for a, v in self.facts[e].items()
        ]

    def base_corpus(self) -> list[str]:
        text = self._declarative(self.general)
        return text + [MENTION.format(e=e) for e in self.general + self.domain]

    def with_replay(self, corpus: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``corpus`` mixed about 1:1 with the base's own text (a guard against forgetting).

        Without replay the adapters move 30-45 % of the base weights' norm and
        every merge of two of them scores about 0.
        """
        replay = [("", t) for t in self.base_corpus()]
        replay = random.Random(self.spec.seed + 2).sample(
            replay, min(len(replay), len(corpus))
        )
        return corpus * max(1, round(len(replay) / len(corpus))) + replay

    def _declarative(self, entities: list[str]) -> list[str]:
        return [
            o + t
            for o in OPENINGS
            for tpl in DECLARATIVE
            for t in self._fill(tpl, entities)
        ]


def score(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """Greedy exact match of the whole answer, %.

    Prompts of one set have one length (one-token names), so a set is one batch.
    """
    x = torch.tensor([tokenizer(p)["input_ids"] for p, _ in pairs])
    y = torch.tensor([tokenizer(a)["input_ids"] for _, a in pairs])
    with torch.no_grad():
        generated = x
        for _ in range(y.shape[1]):
            nxt = model(input_ids=generated).logits[:, -1].argmax(-1, keepdim=True)
            generated = torch.cat([generated, nxt], 1)
    return 100 * (generated[:, -y.shape[1] :] == y).all(1).float().mean().item()


def _batches(
    ids: list[tuple[list[int], list[int]]], batch: int, steps: int, seed: int, pad: int
):
    """Random minibatches, right-padded; prompt and padding are masked out of the loss."""
    rng = random.Random(seed)
    for _ in range(steps):
        yield _padded([ids[rng.randrange(len(ids))] for _ in range(batch)], pad)


def _padded(rows: list, pad: int):
    """(input ids, attention mask, labels) of right-padded rows; the loss on responses."""
    width = max(len(p) + len(r) for p, r in rows)
    x = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        x[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, : len(p) + len(r)] = 1
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
    return x, mask, labels


def _tokenized(tokenizer, corpus: list[tuple[str, str]]) -> list:
    return [
        (tokenizer(p)["input_ids"] if p else [], tokenizer(r)["input_ids"])
        for p, r in corpus
    ]


def _mean_loss(model, ids: list, pad: int, batch: int = 256) -> float:
    """Response-token loss over all of ``ids`` (early stopping's validation)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), batch):
            x, mask, labels = _padded(ids[start : start + batch], pad)
            n = int((labels != -100).sum())
            loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
            total, count = total + float(loss) * n, count + n
    return total / max(count, 1)


def train(
    model,
    tokenizer,
    corpus: list[tuple[str, str]],
    *,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    validation: list[tuple[str, str]] | None = None,
    eval_every: int = 50,
    patience: int = 4,
) -> tuple[float, int]:
    """AdamW, warm-up and cosine decay; the loss is on the response words only.

    With ``validation`` rows, early stopping: their loss every ``eval_every``
    steps, the trainable weights of the best evaluation kept, a stop after
    ``patience`` evaluations without improvement. Returns (the kept weights'
    validation loss, else the last batch's training loss; the step kept).
    """
    torch.manual_seed(seed)
    ids = _tokenized(tokenizer, corpus)
    held = _tokenized(tokenizer, validation) if validation else None
    best: tuple[float, dict, int] | None = None
    since_best = 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm)
            * 0.5
            * (1 + torch.cos(torch.tensor(s / steps * 3.14159265)).item())
        ),
    )
    model.train()
    loss = None
    pad = tokenizer.pad_token_id
    for step, (x, mask, labels) in enumerate(_batches(ids, batch, steps, seed, pad)):
        loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if held and (step + 1) % eval_every == 0:
            model.eval()
            value = _mean_loss(model, held, pad)
            model.train()
            if best is None or value < best[0]:
                best, since_best = (value, _trainable_copy(model), step + 1), 0
            else:
                since_best += 1
                if since_best >= patience:
                    break
    model.eval()
    if best is not None:
        model.load_state_dict(best[1], strict=False)
        return best[0], best[2]
    return (float(loss.detach()) if loss is not None else float("nan")), steps


def _trainable_copy(model) -> dict:
    return {
        k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad
    }


def train_base(world: World, root: Path) -> tuple[float, float]:
    """Pre-train the world's base from scratch into root/base: (loss, seconds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergekit_tada.toy import build_tokenizer

    spec = world.spec
    root.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(root / "base", world.vocabulary())
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    base = LlamaForCausalLM(config)
    t0 = time.perf_counter()
    loss, _ = train(
        base,
        tok,
        [("", t) for t in world.base_corpus()],
        steps=spec.base_steps,
        lr=3e-3,
        batch=spec.batch,
        seed=spec.seed,
    )
    base.save_pretrained(str(root / "base"))
    return loss, round(time.perf_counter() - t0, 1)


def train_lora(
    root: Path, spec: WorldSpec, name: str, corpus, index: int, steps: int
) -> tuple[float, float, int]:
    """(loss, seconds, step kept); see :func:`train`."""
    """Train root/lora-<name> on the base with the world's LoRA settings."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    from mergekit_tada.toy import LLAMA_TARGETS

    tok = AutoTokenizer.from_pretrained(str(root / "base"))
    model = LlamaForCausalLM.from_pretrained(str(root / "base"))
    lora = LoraConfig(
        r=spec.lora_rank,
        lora_alpha=2 * spec.lora_rank,
        target_modules=list(LLAMA_TARGETS),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(spec.seed * 10 + index)
    peft_model = get_peft_model(model, lora)
    validation = None
    if spec.lora_validation > 0:  # distinct rows held out for early stopping
        rows = list(dict.fromkeys(corpus))  # the corpus repeats rows
        random.Random(spec.seed * 10 + index).shuffle(rows)
        validation = rows[: max(1, int(len(rows) * spec.lora_validation))]
        held = set(validation)
        corpus = [row for row in corpus if row not in held]
    t0 = time.perf_counter()
    loss, kept = train(
        peft_model,
        tok,
        corpus,
        steps=steps,
        lr=spec.lora_lr,
        batch=spec.batch,
        seed=spec.seed + index,
        validation=validation,
        eval_every=spec.eval_every,
        patience=spec.patience,
    )
    peft_model.save_pretrained(str(root / f"lora-{name}"))
    return loss, round(time.perf_counter() - t0, 1), kept
