"""How PEFT users merge LoRAs today: add_weighted_adapter (svd or cat), then save.

python bench/peft_merge.py BASE LORA_A LORA_B svd|cat OUT
"""

import sys
import time

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base, lora_a, lora_b, combination, out = sys.argv[1:6]
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, lora_a, adapter_name="a")
model.load_adapter(lora_b, adapter_name="b")
loaded = time.perf_counter()
model.add_weighted_adapter(
    ["a", "b"], [0.5, 0.5], "merged", combination_type=combination
)
merged = time.perf_counter()
model.save_pretrained(out, selected_adapters=["merged"])
print(f"load {loaded - start:.1f} s, add_weighted_adapter {merged - loaded:.1f} s")
