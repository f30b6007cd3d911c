#!/usr/bin/env bash
# Loss by position in small models trained here: full, SWA and the SA + local union (same mean
# keys per query), 150 steps of 8 x 1,024 bytes each, then scored on held-out documents.
# Usage: bash scripts/longrange_position.sh [extra sattn train options, e.g. --overwrite]
set -euo pipefail
cd "$(dirname "$0")/.."
SATTN="${SATTN:-.venv/bin/sattn}"
for method in full sliding_window stochastic_local; do
  "$SATTN" train "configs/longrange/position-$method.yaml" --no-progress "$@"
done
"$SATTN" position-loss --checkpoints runs/longrange-position/full/final,runs/longrange-position/sliding_window/final,runs/longrange-position/stochastic_local/final \
  --seq-len 1024 --docs 10 --seed 0 --threads 1 --out runs/longrange-position/report --no-progress
