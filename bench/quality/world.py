"""A controlled task x domain world, generated from a seed and trained here.

Entities carry facts (attribute -> value). The *base* model is pre-trained on
declarative text about the general entities, in several templates, so that
its knowledge is stored in an extractable form. Then three PEFT LoRAs are
trained on the base:

- task: an output format on general entities only: after the marker
  "repeat :", give the answer twice ("repeat : the color of g3 is red red ."),
  a skill the base does not have. As in supervised fine-tuning, the loss is
  on the response only: the prompt ends with the first answer word, so the
  adapter learns the format, not the facts;
- domain: plain declarative text about the domain entities only
  ("the color of d7 is blue ."), knowledge the base does not have;
- joint: both data sets (the upper reference).

Every adapter's data is mixed about 1:1 with replayed base text.

The combined evaluation asks task-format prompts about domain entities
("repeat : the color of d7 is" -> "blue blue"): neither single adapter answers
them. The task prompt keeps the declarative prefix so that the facts are
retrieved at the same position as in the domain text (a question template
makes even the jointly trained adapter fail to extract new facts; see
docs/quality.md). Controls: task-format prompts about
held-out general entities (the skill) and declarative completions about the
domain entities (the knowledge). Calibration prompts are unlabeled domain
sentences in a template the domain adapter never saw, so they are disjoint
from the evaluation and from the training text.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
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
CALIBRATION = "we know that {e} has the {attr} {v} ."  # unseen by every adapter
QUESTION = "repeat : the {attr} of {e} is"
CONTROL = "the {attr} of {e} is"
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
    extra: dict = field(default_factory=dict)


# Named worlds (bench/quality/run.py --world NAME): WorldSpec overrides.
WORLDS: dict[str, dict] = {
    # adapters move a third to a half of the base weights' norm (v9)
    "default": {},
    # adapters as small perturbations, as a LoRA is in a real model: a wider
    # base, 8 domain entities (32 facts), rank-4 adapters at a low learning
    # rate, early-stopped on their own held-out rows (docs/quality.md)
    "quiet": {
        "hidden": 256,
        "intermediate": 1024,
        "heads": 8,
        "base_steps": 2400,
        "n_domain": 8,
        "lora_rank": 4,
        "lora_lr": 2e-4,
        "lora_steps": 3000,
        "lora_validation": 0.1,
    },
}


def world_root(work: Path, world: str, seed: int) -> Path:
    """Where a world is cached (the default world keeps its old folders)."""
    return work / (f"seed-{seed}" if world == "default" else f"{world}-seed-{seed}")


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

    def task_corpus(self) -> list[tuple[str, str]]:
        prompts = self._fill(QUESTION + " {v}", self.task_entities)
        return [(p, p.split()[-1] + " .") for p in prompts]

    def domain_corpus(self) -> list[tuple[str, str]]:
        return [("", t) for t in self._declarative(self.domain)]

    def joint_corpus(self) -> list[tuple[str, str]]:
        """Both data sets, the task one repeated so that each is half the samples."""
        task, domain = self.task_corpus(), self.domain_corpus()
        return task * max(1, round(len(domain) / len(task))) + domain

    def with_replay(self, corpus: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``corpus`` mixed about 1:1 with the base's own text (a guard against forgetting).

        Without replay the adapters move 30-45 % of the base weights' norm and
        every merge of the two scores about 0 (docs/quality.md, world v7).
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

    def calibration_prompts(self) -> list[str]:
        """All 4 x n_domain calibration sentences, shuffled (a run takes the first N)."""
        prompts = self._fill(CALIBRATION, self.domain)
        random.Random(self.spec.seed + 1).shuffle(prompts)
        return prompts

    def eval_sets(self) -> dict[str, list[tuple[str, str]]]:
        """name -> [(prompt, answer)]; answers are words, one token each."""

        def pairs(template: str, entities: list[str]) -> list[tuple[str, str]]:
            return [
                (template.format(e=e, attr=a), v)
                for e in entities
                for a, v in self.facts[e].items()
            ]

        def twice(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
            return [(p, f"{v} {v}") for p, v in items]

        return {
            "combined": twice(pairs(QUESTION, self.domain)),
            "task": twice(pairs(QUESTION, self.held_out)),
            "domain": pairs(CONTROL, self.domain),
        }


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


def update_sizes(root: Path) -> dict[str, float]:
    """Per adapter: median and largest ||s B A||_F / ||W||_F over its modules."""
    from safetensors.torch import load_file

    weights = load_file(str(root / "base" / "model.safetensors"))
    sizes = {}
    for name in ("task", "domain"):
        folder = root / f"lora-{name}"
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        scaling = config["lora_alpha"] / config["r"]
        ratios = sorted(
            float(
                (scaling * tensors[key.replace(".lora_A.", ".lora_B.")] @ A).norm()
                / weights[
                    key.removeprefix("base_model.model.").replace(".lora_A", "")
                ].norm()
            )
            for key, A in tensors.items()
            if ".lora_A." in key
        )
        sizes[f"{name}_median"] = ratios[len(ratios) // 2]
        sizes[f"{name}_max"] = ratios[-1]
    return sizes


def build(world: World, root: Path, log=print) -> dict:
    """Train the base and the three adapters of ``world`` under ``root``."""
    spec = world.spec
    info: dict = {"spec": asdict(spec)}
    info["base_loss"], info["base_seconds"] = train_base(world, root)
    log(f"  base: loss {info['base_loss']:.3f} in {info['base_seconds']} s")
    corpora = {
        "task": world.with_replay(world.task_corpus()),
        "domain": world.with_replay(world.domain_corpus()),
        "joint": world.with_replay(world.joint_corpus()),
    }
    for i, (name, corpus) in enumerate(corpora.items()):
        steps = spec.lora_steps * (2 if name == "joint" else 1)
        loss, seconds, kept = train_lora(root, spec, name, corpus, i, steps)
        info[f"{name}_loss"], info[f"{name}_seconds"] = loss, seconds
        info[f"{name}_kept_step"] = kept
        log(f"  {name} LoRA: loss {loss:.3f} in {seconds} s (weights of step {kept})")
    (root / "calibration.txt").write_text("\n".join(world.calibration_prompts()) + "\n")
    (root / "world.json").write_text(
        json.dumps(info | {"facts": world.facts}, indent=1)
    )
    return info
