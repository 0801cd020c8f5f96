"""LoRA fine-tunes of the base: a task adapter per labelled task, a domain adapter
on unlabelled text, and the jointly trained reference.

Rank 8, alpha 16, all seven projections of every layer (PEFT), AdamW. Task
adapters learn the answer token after the prompt (loss on the label only);
the domain adapter learns the plain text (causal-LM loss on every token).
Each seed changes the LoRA initialisation and the order of the rows.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from data import TASKS, prompt

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _examples(rows: list[dict], tokenizer, kind: str) -> list[tuple[list[int], int]]:
    """(token ids, index of the first scored token) per row."""
    out = []
    for r in rows:
        if kind == "task":
            ids = tokenizer(prompt(TASKS[r["task"]], r["text"]))["input_ids"][:95]
            ids += tokenizer(" " + r["label"], add_special_tokens=False)["input_ids"]
            out.append((ids, len(ids) - 1))
        else:
            ids = tokenizer(r["text"])["input_ids"][:96]
            out.append((ids, 1))
    return out


def train_lora(
    base: str | Path,
    out: str | Path,
    rows: dict[str, list[dict]],
    seed: int,
    epochs: int = 2,
    lr: float = 1e-3,
    batch_size: int = 16,
    quiet: bool = False,
    row_mean: bool = False,
) -> Path:
    """Train one LoRA on ``rows``: kind ("task" | "domain") -> rows; save a PEFT folder.

    ``row_mean``: every row weighs the same in a batch's loss (the mean of its
    scored tokens, then the mean over rows) instead of every scored token: in
    a mixed batch a labelled row scores one token and a text row ~96, so by
    tokens the labels would weigh ~1 % of the loss."""
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if (out / "adapter_model.safetensors").exists():
        return out
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(model, config)
    examples = [e for kind, rs in rows.items() for e in _examples(rs, tokenizer, kind)]
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr
    )
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id
    steps = epochs * ((len(examples) + batch_size - 1) // batch_size)
    bar = tqdm(total=steps, desc=f"train {out.name}", disable=quiet)
    model.train()
    for _ in range(epochs):
        rng.shuffle(examples)
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), pad)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100)
            for j, (row, first) in enumerate(batch):
                ids[j, : len(row)] = torch.tensor(row)
                mask[j, : len(row)] = 1
                labels[j, first : len(row)] = torch.tensor(row[first:])
            if row_mean:
                loss = rows_loss(
                    model(input_ids=ids, attention_mask=mask).logits, labels
                )
            else:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            step(optimizer, loss, bar)
    bar.close()
    return save_adapter(model, out)


def rows_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, the mean over each row's scored tokens, then over rows."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    scored = labels != -100
    nll = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels.clamp(min=0), reduction="none"
    )
    return ((nll * scored).sum(1) / scored.sum(1)).mean()


def step(optimizer, loss, bar) -> None:
    """One optimiser step, the loss shown on the progress bar."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.update()


def save_adapter(model, out: Path, also=lambda: None) -> Path:
    """Save the PEFT folder (and ``also``'s files) before the folder gets its
    name, so a killed run leaves nothing that a later run takes as trained."""
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    also()
    tmp.rename(out)
    return out
