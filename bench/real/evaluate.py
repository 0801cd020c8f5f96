"""Rank classification of a base model with an adapter's update applied in place.

For every row the model reads ``prompt(task, text)`` and the prediction is the
task label whose one-token word (with its leading space) has the highest
next-token logit at the last prompt position: lm-eval-harness's
``multiple_choice`` scoring for one-token choices (the log-likelihood of a
one-token continuation ranks as its logit). The base is loaded once; an
adapter folder's update (PEFT format, any rank pattern) is added to the
weights, times ``scale``, for one evaluation and the touched weights are
restored from a copy afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from data import TASKS, prompt


def adapter_updates(folder: str | Path) -> dict[str, torch.Tensor]:
    """module weight name -> dense s * B @ A of a PEFT LoRA folder (float64)."""
    from mergekit_tada.adapters import LoraAdapter

    adapter = LoraAdapter(str(folder))
    out = {}
    for module in adapter.modules:
        f = adapter.factors(module)  # scaling folded into B
        out[f"{module}.weight"] = f.B.double() @ f.A.double()
    return out


class Evaluator:
    """The base model, loaded once, scored with any adapter's update applied."""

    def __init__(self, base: str | Path, batch_size: int = 32, max_length: int = 96):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        self.model.eval().requires_grad_(False)
        self.params = dict(self.model.named_parameters())
        self.batch_size, self.max_length = batch_size, max_length

    def label_ids(self, task: str) -> list[int]:
        return [
            self.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0]
            for w in TASKS[task].classes.values()
        ]

    @torch.inference_mode()
    def predict(self, task: str, texts: Sequence[str]) -> list[str]:
        """The predicted label word of every text."""
        words = list(TASKS[task].classes.values())
        head = self.model.get_output_embeddings().weight[self.label_ids(task)]
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                [prompt(TASKS[task], t) for t in texts[i : i + self.batch_size]],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            )
            hidden = self.model.model(**enc).last_hidden_state
            last = enc["attention_mask"].sum(1) - 1
            logits = hidden[torch.arange(len(last)), last] @ head.T
            out += [words[j] for j in logits.argmax(-1).tolist()]
        return out

    def correct(
        self,
        rows: dict[str, list[dict]],
        adapter: str | Path | None = None,
        scale: float = 1.0,
        updates: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, list[int]]:
        """task -> 1/0 per row, with ``adapter`` (or ``updates``) x ``scale`` applied."""
        if updates is None and adapter is not None:
            updates = adapter_updates(adapter)
        saved = {}
        try:
            for name, delta in (updates or {}).items():
                weight = self.params[name]
                saved[name] = weight.detach().clone()
                weight.data += (scale * delta).to(weight.dtype)
            return {
                task: [
                    int(p == r["label"])
                    for p, r in zip(
                        self.predict(task, [r["text"] for r in rs]), rs, strict=True
                    )
                ]
                for task, rs in rows.items()
            }
        finally:
            for name, original in saved.items():
                self.params[name].data.copy_(original)
