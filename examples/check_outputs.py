"""Check the example's outputs: the adapter loads in PEFT and equals out/."""

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

work = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/work")
out = work / "out"
base = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float32)
merged = (
    PeftModel.from_pretrained(base, out / "adapter").merge_and_unload().state_dict()
)
written = {}
for shard in out.glob("*.safetensors"):
    written.update(load_file(shard))
worst = max(float((merged[k] - written[k]).abs().max()) for k in written)
report = json.loads((out / "tada_report.json").read_text())
summary = report["summary"]
print(f"modules merged: {summary['modules']}")
print(
    f"directions dropped as conflicting: task {summary['dropped_task']}, "
    f"domain {summary['dropped_domain']}"
)
print(f"mean truncation energy: {summary['mean_truncation_energy']:.4f}")
calibration = report["inputs"]["calibration"]
print(
    f"calibration: {calibration['prompts']} prompts, {calibration['tokens']} tokens, "
    f"cache hit: {calibration['cache_hit']}"
)
for name, m in report["modules"].items():
    if name.endswith("q_proj"):
        print(
            f"  {name}: probe task {m['probe_task']:.3f} domain {m['probe_domain']:.3f}"
            f" -> gates task {m['task_gate']:.2f} domain {m['domain_gate']:.2f}"
        )
print(f"gates by depth: {out / 'gates.png'}")
print(f"max |PEFT merge_and_unload(out/adapter) - out/| = {worst:.2e}")
same = (out / "adapter" / "adapter_model.safetensors").read_bytes() == (
    work / "out-adapter-only" / "adapter" / "adapter_model.safetensors"
).read_bytes()
print(f"adapter-only run wrote the same adapter bytes: {same}")
if worst > 1e-5 or not same:
    sys.exit("example check FAILED")
print("example OK")
