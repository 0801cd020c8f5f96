#!/usr/bin/env bash
# Set up .venv with everything mergekit-tada needs (idempotent; CPU torch).
# pip resolves an unpinned torch to a multi-GB CUDA build, so torch==2.13.0
# (the CPU wheel) goes in first and constraints.txt pins it for the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
