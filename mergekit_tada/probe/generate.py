"""Prompts a model writes itself: RegMean with nothing but the adapters.

With base-model Grams, every model's Gram on shared text is the same and
RegMean gives the weighted mean; the text has to differ per adapter. Each
model t (base + adapter t, hooks on its linears: weights untouched) samples
``samples`` texts of ``length`` new tokens from the beginning-of-sequence
token alone, seeded, on one torch thread (the samples' bits do not depend on
the thread count). Texts are cached by content (base and adapter hashes,
settings). Generation needs the whole model in memory (a token at a time
through every block): for models larger than memory, give ``data`` files.
"""

from __future__ import annotations

import logging

import torch

from mergekit_tada.adapters import LoraAdapter
from mergekit_tada.batches import is_causal_lm
from mergekit_tada.cache import ContentCache
from mergekit_tada.errors import TadaError
from mergekit_tada.lowrank import seeded, single_thread
from mergekit_tada.probe.grams import adapter_applied

LOG = logging.getLogger(__name__)


def generated_texts(
    base_path: str,
    base_files: list[str],
    adapters: dict[str, LoraAdapter],
    settings: dict,
    cache: ContentCache,
    device: str,
) -> dict[str, list[str]]:
    """label -> texts model ``label`` wrote (from the cache where present)."""
    common = {
        "base": cache.file_hashes(base_files),
        "settings": {k: settings[k] for k in ("samples", "generate_length", "seed")},
        "device": torch.device(device).type,
    }
    keys = {t: cache.key(common | {"adapter": a.hashes}) for t, a in adapters.items()}
    texts = {t: (cache.load(k, "texts") or {}).get("texts") for t, k in keys.items()}
    todo = [t for t, found in texts.items() if not found]
    if not todo:
        return texts
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(base_path)
    if not is_causal_lm(base_path):
        raise TadaError(
            f"regmean: data: generate needs a causal language model; {base_path} is "
            f"{', '.join(config.architectures or [config.model_type])}: give data files"
        )
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model.to(device).eval()
    start = tokenizer.bos_token_id
    if start is None:
        start = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    n = settings["samples"]
    for t in todo:
        ids = torch.full((n, 1), start, dtype=torch.long, device=device)
        with (
            adapter_applied(model, adapters[t], device),
            single_thread(device),
            seeded(settings["seed"]),
            torch.inference_mode(),
        ):
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=settings["generate_length"],
                pad_token_id=pad,
            )
        written = [
            s.strip()
            for s in tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
        ]
        written = [s for s in written if s]
        if not written:
            raise TadaError(f"regmean: model {t} wrote only empty texts")
        cache.store(keys[t], {"texts": written}, "texts")
        LOG.info("regmean: model %s wrote %d texts", t, len(written))
        texts[t] = written
    return texts
