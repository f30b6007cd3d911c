#!/usr/bin/env bash
# The small-scale pre-training comparison: full, SWA, SA and gated SA + SWA, 2 seeds each,
# byte-level, on the offline corpora (Shakespeare, King James Bible, Wikipedia shard).
# Writes docs/results-pretraining.md and docs/results-pretraining.png; re-running skips
# finished runs and resumes interrupted ones. About an hour on a free 2-core CPU.
#
#   scripts/pretrain_comparison.sh                      # the full comparison (400 steps)
#   STEPS=200 SEEDS="0" scripts/pretrain_comparison.sh  # a reduced version
#   scripts/pretrain_comparison.sh --report-only        # re-score finished runs, train nothing
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-400}"
SEEDS="${SEEDS:-0,1}"
OUT="${OUT:-runs/pretrain-comparison}"
CLOZE="${CLOZE:-200}"  # examples per zero-shot cloze task
HEADER="${HEADER:-Small-scale comparison: 4 layers, d=128, 4 heads, window 32, sequence 512, byte-level, ${STEPS} steps of 8 x 512 tokens.}"
exec "${PYTHON:-.venv/bin/python}" -m stochastic_attention.cli pretrain-compare \
  configs/pretrain/full.yaml configs/pretrain/sliding_window.yaml configs/pretrain/stochastic.yaml \
  configs/pretrain/gated.yaml \
  --seeds "$SEEDS" --out "$OUT" --report docs/results-pretraining.md \
  --set "train.steps=${STEPS}" --set train.threads=1 --cloze-examples "$CLOZE" --header "$HEADER" \
  --no-progress "$@"
