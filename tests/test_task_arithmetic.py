"""lora_task_arithmetic: the exact weighted sum, lossless or truncated."""

import json

from conftest import (
    adapter_delta,
    assert_adapter_matches_model,
    rel_err,
)
from family import (
    WEIGHTS,
    best_rank,
    family_config,
    run,
    stacked,
)


def test_task_arithmetic_lossless_and_truncated(three):
    out = run(family_config("lora_task_arithmetic", lossless=True))
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    rank = {
        "q_proj": 15,
        "k_proj": 4,
        "v_proj": 10,
        "o_proj": 9,
        "gate_proj": 4,
        "up_proj": 15,
        "down_proj": 10,
    }  # sums of the inputs' ranks
    for layer in range(3):
        for proj, r in rank.items():
            group = "self_attn" if proj[0] in "qkvo" else "mlp"
            module = f"model.layers.{layer}.{group}.{proj}"
            assert cfg["rank_pattern"].get(module, cfg["r"]) == r, module
            assert cfg["alpha_pattern"].get(module, cfg["lora_alpha"]) == r, module
    assert_adapter_matches_model(out)  # PEFT honours the written rank_pattern
    ours = adapter_delta(out / "adapter")
    assert set(ours) == set(three["lora-task"])
    for name, delta in ours.items():
        expected = sum(
            w * d for w, d in zip(WEIGHTS, stacked(three, name), strict=True)
        )
        assert rel_err(delta, expected) < 1e-5, name
    out = run(family_config("lora_task_arithmetic", rank=3), "out3")
    for name, delta in adapter_delta(out / "adapter").items():
        expected = sum(
            w * d for w, d in zip(WEIGHTS, stacked(three, name), strict=True)
        )
        assert rel_err(delta, best_rank(expected, 3)) < 1e-5, name
