"""Llama-shaped models with random weights, written shard by shard, and LoRA pairs.

    python bench/generate.py SIZE OUT_DIR [--sparse]

SIZE: tiny | small (~0.5 GB bf16) | medium (~2.9 GB bf16) | 7b (Llama-2-7B shapes).
Writes OUT_DIR/base (config, tokenizer, one safetensors shard per block plus
one for the embeddings and head, and the index) and OUT_DIR/lora-a, lora-b
(rank-16 PEFT LoRA adapters on all seven projections, different seeds). Never
holds more than one block's tensors. ``--sparse`` writes the base's shards as
sparse files (valid headers, zero data, no disk space): enough for the
adapter-only path, which reads nothing but headers.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

SIZES = {
    "tiny": dict(hidden=256, layers=4, intermediate=688, heads=4, kv_heads=4),
    "small": dict(hidden=1024, layers=16, intermediate=2816, heads=16, kv_heads=16),
    "medium": dict(hidden=2048, layers=24, intermediate=5632, heads=16, kv_heads=16),
    "7b": dict(hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32),
}
VOCAB = 32000


def block_shapes(i: int, s: dict) -> dict[str, tuple[int, ...]]:
    h, f = s["hidden"], s["intermediate"]
    kv = h // s["heads"] * s["kv_heads"]
    p = f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (h, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, h),
        p + "mlp.gate_proj.weight": (f, h),
        p + "mlp.up_proj.weight": (f, h),
        p + "mlp.down_proj.weight": (h, f),
    }


def stem_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    h = s["hidden"]
    return {
        "model.embed_tokens.weight": (VOCAB, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (VOCAB, h),
    }


def _random(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def _write_sparse(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A valid bf16 safetensors file whose data region is a hole (all zeros)."""
    header, offset = {}, 0
    for name, shape in sorted(shapes.items()):
        size = 2 * int(torch.tensor(shape).prod())
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        fh.truncate(8 + len(blob) + offset)


def make_base(out: Path, size: str, sparse: bool = False, seed: int = 0) -> Path:
    from transformers import LlamaConfig

    from mergekit_tada.toy import build_tokenizer

    s = SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(out)
    shards = [stem_shapes(s)] + [block_shapes(i, s) for i in range(s["layers"])]
    n = len(shards)
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(seed)
    for k, shapes in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        if sparse:
            _write_sparse(out / name, shapes)
        else:
            save_file(
                {t: _random(sh, gen) for t, sh in shapes.items()},
                out / name,
                metadata={"format": "pt"},
            )
        for t, sh in shapes.items():
            weight_map[t] = name
            total += 2 * int(torch.tensor(sh).prod())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def make_lora(base: Path, out: Path, size: str, seed: int, r: int = 16) -> Path:
    """A PEFT LoRA (config written by PEFT's LoraConfig) with random A and B."""
    from peft import LoraConfig

    from mergekit_tada.toy import LLAMA_TARGETS

    s = SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(LLAMA_TARGETS),
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base),
    ).save_pretrained(out)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(s["layers"]):
        for name, shape in block_shapes(i, s).items():
            if len(shape) != 2:
                continue
            module = name.removesuffix(".weight")
            d_out, d_in = shape
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = (
                torch.randn(r, d_in, generator=gen) / d_in**0.5
            )
            tensors[f"{key}.lora_B.weight"] = (
                torch.randn(d_out, r, generator=gen) * 0.01
            )
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("size", choices=sorted(SIZES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--sparse", action="store_true")
    args = ap.parse_args()
    base = make_base(args.out / "base", args.size, sparse=args.sparse)
    make_lora(base, args.out / "lora-a", args.size, seed=1)
    make_lora(base, args.out / "lora-b", args.size, seed=2)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    print(
        f"{args.size}: {size / 1e9:.2f} GB base ({'sparse' if args.sparse else 'dense'}) "
        f"and two rank-16 LoRAs in {args.out}"
    )
    os.sync()


if __name__ == "__main__":
    main()
