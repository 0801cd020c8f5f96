"""Build the example's tiny models in a folder: a Llama-style base and two LoRAs.

No weights can be downloaded here, so the example makes its own: a random
4-layer Llama with a word-level tokenizer, an "instruct" (task) LoRA on all
seven projections and a "bio" (domain) LoRA on attention and MLP, saved by PEFT.
"""

import sys
from pathlib import Path

from mergekit_tada.toy import build_llama, build_lora

root = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/work")
root.mkdir(parents=True, exist_ok=True)
build_llama(root / "base", hidden=64, layers=4, intermediate=128, seed=0)
build_lora(root / "base", root / "lora-instruct", r=8, alpha=16, seed=1)
build_lora(
    root / "base",
    root / "lora-bio",
    r=8,
    alpha=16,
    seed=2,
    targets=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
)
# 32 unlabeled domain prompts for the calibration probe (one per line)
subjects = ["protein", "enzyme", "receptor", "gene", "tumor", "cell", "patient", "dose"]
verbs = ["binding of the", "with the", "in the", "and the"]
prompts = [
    f"the {a} {v} {b} in the trial"
    for i, (a, v, b) in enumerate(
        (subjects[i % 8], verbs[i % 4], subjects[(3 * i + 1) % 8]) for i in range(32)
    )
]
(root / "bio_prompts.txt").write_text("\n".join(prompts) + "\n")
print(f"built base, lora-instruct, lora-bio and bio_prompts.txt in {root}")
