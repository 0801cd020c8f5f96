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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
        """The predicted label word of every text.

        Every prompt of a task opens with the same instruction: its tokens (the
        longest common prefix of the tokenised prompts, so no token boundary
        moves) run once and their keys and values are reused for every row;
        rows run in batches of similar length, so little is padding. Both
        change only the order of floating-point sums, not what is computed.
        """
        import copy

        from transformers import DynamicCache

        words = list(TASKS[task].classes.values())
        head = self.model.get_output_embeddings().weight[self.label_ids(task)]
        ids = self.tokenizer(
            [prompt(TASKS[task], t) for t in texts],
            truncation=True,
            max_length=self.max_length,
        )["input_ids"]
        common = min(len(x) for x in ids) - 1  # every row keeps a token of its own
        for x in ids:
            while common and x[:common] != ids[0][:common]:
                common -= 1
        prefix = DynamicCache()
        if common:
            self.model.model(
                input_ids=torch.tensor([ids[0][:common]]),
                cache=prefix,
                use_cache=True,
            )
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[str] = [""] * len(ids)
        pad = self.tokenizer.pad_token_id
        for b in range(0, len(order), self.batch_size):
            batch = order[b : b + self.batch_size]
            rest = [ids[i][common:] for i in batch]
            width = max(len(r) for r in rest)
            tokens = torch.full((len(batch), width), pad)
            mask = torch.zeros((len(batch), common + width), dtype=torch.long)
            mask[:, :common] = 1
            for j, r in enumerate(rest):
                tokens[j, : len(r)] = torch.tensor(r)
                mask[j, common : common + len(r)] = 1
            cache = copy.deepcopy(prefix)
            if common:
                cache.batch_repeat_interleave(len(batch))
            hidden = self.model.model(
                input_ids=tokens,
                attention_mask=mask,
                cache=cache,
                use_cache=True,
            ).last_hidden_state
            last = torch.tensor([len(r) - 1 for r in rest])
            logits = hidden[torch.arange(len(batch)), last] @ head.T
            for i, j in zip(batch, logits.argmax(-1).tolist(), strict=True):
                out[i] = words[j]
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
        with applied(self.params, updates or {}, scale):
            return {
                task: [
                    int(p == r["label"])
                    for p, r in zip(
                        self.predict(task, [r["text"] for r in rs]), rs, strict=True
                    )
                ]
                for task, rs in rows.items()
            }


@contextmanager
def applied(
    params: dict[str, torch.nn.Parameter],
    updates: dict[str, torch.Tensor],
    scale: float,
) -> Iterator[None]:
    """The weights plus ``scale`` x their updates inside the block, restored after."""
    saved = {}
    try:
        for name, delta in updates.items():
            weight = params[name]
            saved[name] = weight.detach().clone()
            weight.data += (scale * delta).to(weight.dtype)
        yield
    finally:
        for name, original in saved.items():
            params[name].data.copy_(original)
