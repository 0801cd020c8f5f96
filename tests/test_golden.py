"""Every method's outputs on the toy models equal the recorded ones.

tests/golden.json was recorded by ``python tests/golden.py`` (first with the
code before the package's files were redesigned, issue 20): adapters, merged
models, reports, model cards, compose.yml, for every method and path; floats
to a relative 1e-5 (another CPU rounds float32 kernels differently), the rest
exactly. A change that alters an output fails here; one that alters them on
purpose records them again and says so in its commit.
"""

from __future__ import annotations

import json

from golden import GOLDEN, build_inputs, fingerprints, same


def test_outputs_equal_the_recorded_ones(tmp_path):
    build_inputs(tmp_path)
    expected = json.loads(GOLDEN.read_text())
    got = fingerprints(tmp_path, list(expected))
    for case, files in expected.items():
        differences = same(got[case], files, case)
        assert not differences, differences[:10]
