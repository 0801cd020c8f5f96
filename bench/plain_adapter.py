"""The floor for an adapter-only merge process: torch + safetensors and nothing else.

Reads two PEFT adapters' factors, writes their exact sum as one adapter (the
factors stacked: B = [s1 B1 | s2 B2], A = [A1; A2]) with a minimal config.
What ``bench/startup.py adapter-only`` compares ``mergekit-tada --adapter-only``
against. Usage: python bench/plain_adapter.py LORA_A LORA_B OUT
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

a_dir, b_dir, out = sys.argv[1:4]
configs = [
    json.load(open(os.path.join(d, "adapter_config.json"))) for d in (a_dir, b_dir)
]
tensors = [
    load_file(os.path.join(d, "adapter_model.safetensors")) for d in (a_dir, b_dir)
]
merged = {}
for key in tensors[0]:
    if ".lora_A." not in key:
        continue
    b_key = key.replace(".lora_A.", ".lora_B.")
    As, Bs = [], []
    for cfg, t in zip(configs, tensors, strict=True):
        if key in t:
            As.append(t[key].float())
            Bs.append(t[b_key].float() * cfg["lora_alpha"] / cfg["r"])
    merged[key] = torch.cat(As).contiguous()
    merged[b_key] = torch.cat(Bs, dim=1).contiguous()
os.makedirs(out, exist_ok=True)
save_file(
    merged, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"}
)
rank = sum(c["r"] for c in configs)
config = dict(configs[0], r=rank, lora_alpha=rank)
json.dump(config, open(os.path.join(out, "adapter_config.json"), "w"))
