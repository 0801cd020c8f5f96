"""What every multi-adapter method shares: the merged model equals base + its adapter,
and the report and card speak of the method."""

import json

import pytest
from conftest import (
    assert_adapter_matches_model,
)
from family import (
    family_config,
    run,
)

from mergekit_tada.methods.registry import FAMILY


@pytest.mark.parametrize("method", FAMILY)
def test_merged_model_agrees_with_adapter(three, method):
    out = run(family_config(method, rank=6, pico=method == "lora_tsv_m"), random_seed=3)
    assert_adapter_matches_model(out)
    assert not (out / "tada_report.json").exists()
    report = json.loads((out / "merge_report.json").read_text())
    assert report["settings"]["merge_method"] == method
    assert len(report["modules"]) == 21
    # the report and the card speak of this method, not of TaDA's gates
    assert "dropped_task" not in report["summary"]
    card = (out / "README.md").read_text()
    section = card[card.index("## mergekit-tada") :]
    assert f"`{method}`" in section and "merge_report.json" in section
    for word in ("gate", "probe", "conflicting"):
        assert word not in section, word
    assert "weights per input (config order): [" in section
