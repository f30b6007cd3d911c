#!/usr/bin/env bash
# Sets everything up, then runs the main job: the operator benchmark (dense vs SWA vs SA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/sattn bench --seq-lens 1024,2048,4096,8192,16384 --repeats 3 --out runs/bench "$@"
