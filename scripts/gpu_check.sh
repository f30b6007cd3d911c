#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU: the operator tests on the GPU, then `sattn bench`
# in bf16 at 4k-64k tokens, window 256 (dense flash via SDPA, FlexAttention SWA, our SWA, SA band
# and block; forward and forward+backward). Writes gpu-check/ (test log, bench.json/.md/.png).
#
# setup.sh installs the CPU wheel of torch; on a GPU machine install the CUDA build first, e.g.
#   TORCH_INDEX=https://download.pytorch.org/whl/cu128 bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    "$PY" -m pip install -q torch==2.13.0 ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
fi
"$PY" -m pip install -q -e ".[all]" transformers==5.24.0 accelerate==1.15.0 safetensors==0.8.0
"$PY" -c "import torch, sys; print(torch.__version__, torch.cuda.get_device_name(0))" \
    || { echo "gpu_check: no CUDA GPU visible to torch" >&2; exit 2; }
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
# Every backend against the reference, on the GPU (tests/conftest.py reads SATTN_TEST_DEVICE).
SATTN_TEST_DEVICE=cuda "$PY" -m pytest -q tests/ops 2>&1 | tee "$OUT/tests-ops-cuda.log"
"$PY" -m stochastic_attention.cli bench --device cuda --dtype bfloat16 --window 256 \
    --seq-lens 4096,8192,16384,32768,65536 --full-max-len 65536 --modes fwd,fwd+bwd \
    --methods full,sliding_window,sliding_window_flex,stochastic,stochastic_block,stochastic_flex,stochastic_block_flex \
    --out "$OUT" --no-progress
