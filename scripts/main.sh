#!/usr/bin/env bash
# Sets everything up, then runs the main job on the embedded default: the training-free
# comparison of full attention, SWA, SA and MoBA on SmolLM2-135M, with tasks built from real
# offline text (perplexity, passkey, last word, next line). Prints the table; writes JSON,
# markdown and a plot under runs/quick. Extra arguments go to `sattn eval`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/sattn eval --quick --out runs/quick "$@"
