"""The calibration pass alone, or a plain block-streamed forward over the same prompts.

    python bench/calib.py tada|plain BASE PROMPTS LORA_A LORA_B

Both stream the same base block by block (mergekit_tada.streaming.StreamedModel)
over the same batches; ``tada`` also accumulates the probe statistics of both
adapters. Prints the pass's own time (imports excluded) as JSON.
"""

import json
import sys
import time

import torch

from mergekit_tada.adapters import LoraAdapter
from mergekit_tada.batches import make_batches, tokenizer_for
from mergekit_tada.probe.calibration import (
    large_allocations_unmapped,
    read_prompts,
    run_calibration,
)
from mergekit_tada.streaming import StreamedModel

mode, base, prompts, lora_a, lora_b = sys.argv[1:6]
batches = make_batches(tokenizer_for(base), read_prompts(prompts, 32), 256, 8)
start = time.perf_counter()
with large_allocations_unmapped():  # as in run_calibration, for both modes
    model = StreamedModel(base, torch.device("cpu"), torch.float32)
    if mode == "tada":
        adapters = {"a": LoraAdapter(lora_a), "b": LoraAdapter(lora_b)}
        run_calibration(base, batches, adapters, quiet=True, streamed=model)
    else:
        with torch.inference_mode():  # each block loaded once, run on every batch
            sinks = model.block_inputs(batches)
            hidden = [s[0][0] for s in sinks]
            for i in range(model.n_layers):
                with model.block(i) as layer:
                    for c, sink in enumerate(sinks):
                        _, args, kwargs = sink[i]
                        hidden[c] = layer(hidden[c], *args, **kwargs)
print(json.dumps({"mode": mode, "seconds": time.perf_counter() - start}))
