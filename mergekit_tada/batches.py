"""The token batches a streamed pass runs on, and what reads them: the base's
tokenizer, and whether the base is a causal LM (KL on next tokens) or an
encoder (hidden states). Shared by every pass over prompts (probe/, training/,
``lambda: auto``)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergekit_tada.errors import TadaError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    extra: dict

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            {k: v.to(device) for k, v in self.extra.items()},
        )

    def forward_kwargs(self) -> dict:
        # use_cache=False: a KV cache would keep every streamed block's keys and
        # values alive for the whole pass.
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "use_cache": False,
            **self.extra,
        }


def make_batches(
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
    what: str = "prompts",
) -> list[Batch]:
    """Right-padded chunks (causal masks keep valid tokens blind to padding).

    ``what`` names the prompts (key and file) in the error when they give no
    token at all, and in the warning when every token is the unknown token."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        extra = {
            k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")
        }
        batches.append(Batch(enc["input_ids"], enc["attention_mask"], extra))
    tokens = token_count(batches)
    if tokens == 0:
        raise TadaError(
            f"{what}: its {len(texts)} prompt(s) tokenize to no tokens with the "
            "base model's tokenizer (its normalizer removes every character?); "
            "give prompts in text the base's tokenizer reads"
        )
    unknown = tokenizer.unk_token_id
    if unknown is not None and tokens == sum(
        int((b.input_ids[b.attention_mask.bool()] == unknown).sum()) for b in batches
    ):
        LOG.warning(
            "%s: every one of its %d tokens is the unknown token %r: the "
            "prompts say nothing to the base model (another script or alphabet?)",
            what,
            tokens,
            tokenizer.unk_token,
        )
    return batches


def batches_digest(batches: Sequence[Batch]) -> str:
    """sha256 of every token id and mask used: what cache keys cover."""
    digest = hashlib.sha256()
    for b in batches:
        digest.update(b.input_ids.numpy().tobytes())
        digest.update(b.attention_mask.numpy().tobytes())
    return digest.hexdigest()


def token_count(batches: Sequence[Batch]) -> int:
    """Valid (non-padding) tokens in the batches."""
    return int(sum(int(b.attention_mask.sum()) for b in batches))


def is_causal_lm(base_path: str) -> bool:
    """Whether the base's checkpoint is a causal LM (``...ForCausalLM``,
    GPT-2's ``GPT2LMHeadModel``: a class transformers' AutoModelForCausalLM
    builds), by the architectures its config names."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return any(
        a in causal for a in AutoConfig.from_pretrained(base_path).architectures or []
    )


def tokenizer_for(base_path: str, needed_by: str = "prompts"):
    """The base's tokenizer; ``needed_by`` (method and key, as ``lora_regmean:
    data``) says in the error what needs it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base_path)
    except Exception as error:
        raise TadaError(
            f"{needed_by}: base model {base_path} has no usable tokenizer "
            f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
            "these prompts are tokenized with the base's tokenizer: put its "
            "tokenizer files in the base folder"
        ) from None
