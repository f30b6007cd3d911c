#!/usr/bin/env bash
# The training-free sweep on SmolLM2-135M behind docs/results-training-free.md: every method with
# and without sinks, windows 16-256, 3 permutation seeds, then the SA + local configurations,
# then prefill timing at 2k/4k/8k. The grid runs as four shards side by side (one torch thread
# each; on a 2-core CPU about 90 minutes) and is merged into two tables and plots.
#
#   scripts/training_free_sweep.sh            # everything, into runs/
#   JOBS=1 scripts/training_free_sweep.sh     # one shard at a time
#   SKIP_TIMING=1 scripts/training_free_sweep.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SATTN="${SATTN:-.venv/bin/sattn}"
OUT="${OUT:-runs}"
JOBS="${JOBS:-4}"
GRID=(--windows 16,32,64,128,256 --seeds 0,1,2 --tasks perplexity,lastword,nextline
      --ppl-docs 2 --ppl-length 1024 --examples 16 --context 256)
SHARDS=(
  "a:full,sliding_window,sliding_window+sinks=4,moba,moba+sinks=4,stochastic+layout=block,stochastic+sinks=4+layout=block"
  "b:stochastic,stochastic+sinks=4"
  "c1:stochastic+sinks=4+local=0.5,stochastic+sinks=4+local=0.5+layout=block,stochastic+sinks=4+local=0.75"
  "c2:stochastic+sinks=4+local=0.25,stochastic+local=0.5,stochastic+sinks=4+local=0.5+ensemble=2"
)
running=0
for shard in "${SHARDS[@]}"; do
  name="${shard%%:*}"
  "$SATTN" eval --methods "${shard#*:}" "${GRID[@]}" --out "$OUT/sweep-$name" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
done
wait
"$SATTN" eval --merge "$OUT/sweep-a,$OUT/sweep-b" --out "$OUT/sweep-methods" --only \
  full,sliding_window,sliding_window+sinks=4,stochastic,stochastic+sinks=4,stochastic+layout=block,stochastic+sinks=4+layout=block,moba,moba+sinks=4
"$SATTN" eval --merge "$OUT/sweep-a,$OUT/sweep-c1,$OUT/sweep-c2" --out "$OUT/sweep-sa-configs" \
  --versus sliding_window+sinks=4,moba+sinks=4 --only \
  full,sliding_window+sinks=4,moba+sinks=4,stochastic+sinks=4+local=0.25,stochastic+sinks=4+local=0.5,stochastic+sinks=4+local=0.75,stochastic+local=0.5,stochastic+sinks=4+local=0.5+layout=block,stochastic+sinks=4+local=0.5+ensemble=2
if [ -z "${SKIP_TIMING:-}" ]; then
  "$SATTN" eval --tasks none --threads 2 --timing-window 128 --timing-repeats 2 \
    --prefill-timing 2048,4096,8192 --out "$OUT/timing-8k" --methods \
    full,sliding_window+sinks=4,stochastic+sinks=4,stochastic+sinks=4+layout=block,stochastic+sinks=4+local=0.5,moba+sinks=4
fi
