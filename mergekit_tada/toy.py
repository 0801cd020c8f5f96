"""Tiny models and adapters built locally (no downloads exist on these machines).

Used by the examples, the tests and the benchmarks: a random Llama-style base
with a word-level tokenizer, and real PEFT LoRA adapters saved by PEFT itself.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch

from mergekit_tada.adapters import HEAD_TASK_MODELS, head_task_model

LLAMA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
_WORDS = (
    "the a of and to in is was for on with as by at from protein cell gene patient "
    "dose trial tumor enzyme receptor binding answer question format list step "
    "first second then because therefore explain summarize translate"
).split()


# A byte-level BPE's names for printable ASCII ("Ġ" is its space).
_BYTE_LEVEL_CHARACTERS = ("Ġ", *(chr(c) for c in range(33, 127)))


def build_tokenizer(path: str | os.PathLike, words: Sequence[str] = _WORDS):
    """A word-level fast tokenizer with the usual special tokens, saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tok.save_pretrained(str(path))
    return tok


def build_llama(
    path: str | os.PathLike,
    *,
    hidden: int = 32,
    layers: int = 2,
    intermediate: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tie_embeddings: bool = False,
) -> str:
    """Save a random Llama-style causal LM (and its tokenizer) to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(path)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(str(path))
    return str(path)


def _build_tiny(path: str | os.PathLike, model_type: str, causal: bool, **sizes) -> str:
    """A random two-layer model of ``model_type`` from transformers' own config;
    ``sizes`` change the shared tiny sizes (a value of None drops the key)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    # transformers imposes some families' own tokenizer class whatever the
    # folder's tokenizer says (qwen2: a byte-level BPE, which drops every word
    # of a word-level vocabulary): give those the characters as well.
    for words in (_WORDS, (*_WORDS, *_BYTE_LEVEL_CHARACTERS)):
        tok = build_tokenizer(path, words)
        values = {
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "pad_token_id": tok.pad_token_id,
            **sizes,
        }
        values = {k: v for k, v in values.items() if v is not None}
        config = AutoConfig.for_model(model_type, **values)
        torch.manual_seed(3)
        auto = AutoModelForCausalLM if causal else AutoModel
        auto.from_config(config).save_pretrained(str(path))
        if len(AutoTokenizer.from_pretrained(str(path))("the protein").input_ids) > 1:
            break
    return str(path)


def build_decoder(path: str | os.PathLike, model_type: str) -> str:
    """A random two-layer causal LM of another family (mistral, qwen2, gemma, ...),
    its LM head tied or not as the family's config has it by default (qwen3_moe:
    layer 0 of four experts, layer 1 a dense MLP: blocks that differ)."""
    sizes = {"num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 128}
    if model_type == "gpt2":  # its own names for the sizes; no grouped kv heads
        sizes = {"n_inner": 48, "n_positions": 128, "intermediate_size": None}
    if model_type == "qwen3_moe":  # 4 experts (not 128), layer 1 a dense MLP
        sizes |= {"num_experts": 4, "num_experts_per_tok": 2, "mlp_only_layers": [1]}
        sizes |= {"moe_intermediate_size": 24}
    if model_type == "falcon":  # head_dim is derived; grouped kv heads as below
        sizes |= {"new_decoder_architecture": True, "num_kv_heads": 2}
        sizes |= {"head_dim": None, "num_key_value_heads": None}
    return _build_tiny(path, model_type, True, **sizes)


def build_encoder(path: str | os.PathLike, model_type: str) -> str:
    """A random two-layer encoder (bert, roberta, xlm-roberta, distilbert, ...)."""
    sizes: dict = {"max_position_embeddings": 136}
    if model_type == "distilbert":  # its own name for the MLP's size
        sizes |= {"hidden_dim": 48, "intermediate_size": None}
    return _build_tiny(path, model_type, False, **sizes)


def build_lora(
    base_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    r: int = 4,
    alpha: float = 8,
    targets: Sequence[str] | str = LLAMA_TARGETS,
    seed: int = 1,
    std: float = 0.1,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    task_type: str | None = "CAUSAL_LM",
    num_labels: int = 2,
    **lora_kwargs,
) -> str:
    """A real PEFT LoRA adapter on ``base_path`` with random (nonzero) A and B
    (a classifier's task type, SEQ_CLS, TOKEN_CLS or QUESTION_ANS: with a
    random head of ``num_labels`` classes; 2 for QUESTION_ANS, start and end)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    if task_type in HEAD_TASK_MODELS:
        model = head_task_model(task_type).from_pretrained(
            str(base_path), dtype=torch.float32, num_labels=num_labels
        )
    else:
        auto = AutoModelForCausalLM if task_type == "CAUSAL_LM" else AutoModel
        model = auto.from_pretrained(str(base_path), dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets if isinstance(targets, str) else list(targets),
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        task_type=task_type,
        lora_dropout=0.0,
        **lora_kwargs,
    )
    with warnings.catch_warnings():  # PEFT reads a deprecated transformers flag
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:  # a head
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    # the base's embedding weights are not part of the adapter
    peft_model.save_pretrained(str(out_path), save_embedding_layers=False)
    return str(out_path)
