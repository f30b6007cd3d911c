#!/usr/bin/env bash
# Sets everything up, then runs the linter and the whole test suite; fails if any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
