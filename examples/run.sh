#!/usr/bin/env bash
# Set everything up and run the main job end to end on a tiny local model:
# build base + two LoRAs, merge with the stock `mergekit-yaml`, merge again
# adapter-only with `mergekit-tada`, and check the outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
rm -rf examples/work
.venv/bin/python examples/build_toy.py examples/work
(
  cd examples/work
  ../../.venv/bin/mergekit-yaml ../tada.yml out
  ../../.venv/bin/mergekit-tada ../tada.yml out-adapter-only --adapter-only
)
.venv/bin/python examples/check_outputs.py examples/work
