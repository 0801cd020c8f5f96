"""lora_knots_ties against the paper's steps in dense float64."""

import oracles
import pytest
from conftest import (
    adapter_delta,
    rel_err,
)
from family import (
    INPUTS,
    WEIGHTS,
    family_config,
    run,
)


@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
@pytest.mark.parametrize("inputs", [INPUTS[:2], INPUTS])
def test_lora_knots_ties(three, density, inputs):
    """KnOTS-TIES equals the paper's steps in dense float64 (tests/oracles.py):
    TIES on the S-scaled coefficient blocks of the shared SVD, mixed ranks."""
    config = family_config("lora_knots_ties", rank=64)
    config["models"] = [
        m for m in config["models"] if m["model"].split("/")[-1] in inputs
    ]
    for m in config["models"]:
        m["parameters"]["density"] = density
    out = run(config)
    written = adapter_delta(out / "adapter")
    # s B A in float64 from the inputs' files: W' - W in float32 would add
    # rounding noise that the trim sees as extra directions
    exact = {n: adapter_delta(n) for n in inputs}
    for name in set().union(*exact.values()):
        present = [
            (exact[n][name], w)
            for n, w in zip(INPUTS, WEIGHTS, strict=False)
            if n in inputs and name in exact[n]
        ]
        expected = oracles.knots_ties(
            [d for d, _ in present], [w for _, w in present], [density] * len(present)
        )
        assert rel_err(written[name], expected) < 1e-5, name
