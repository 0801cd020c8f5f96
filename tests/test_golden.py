"""Every method's output bytes on the toy models equal the recorded ones.

tests/golden.json was recorded by ``python tests/golden.py`` with the code
before the package's files were redesigned (issue 20): adapters, merged
models, reports, plots, model cards, compose.yml, for every method and path.
A change that alters one byte of any output fails here; one that alters them
on purpose records them again and says so in its commit.
"""

from __future__ import annotations

import json

from golden import GOLDEN, build_inputs, fingerprints


def test_outputs_are_byte_identical_to_the_recorded_ones(tmp_path):
    build_inputs(tmp_path)
    expected = json.loads(GOLDEN.read_text())
    got = fingerprints(tmp_path, list(expected))
    for case, files in expected.items():
        assert got[case] == files, case
