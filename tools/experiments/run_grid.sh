#!/usr/bin/env bash
# Issue 7 evidence grid, one command (resumes: finished runs in OUT/results.jsonl are skipped).
#   bash tools/experiments/run_grid.sh [--out runs/grid] [--plan grid|smoke] [...run_grid.py args]
# then: python tools/experiments/analyze.py --runs runs/grid --plots docs/results
# Runs execute sequentially inside one deepspeed launch of 2 processes; the launch is repeated
# every MAX_RUNS runs (default 60) because each run leaks ~10 MB per rank, until OUT/DONE exists.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
export DS_ACCELERATOR=cpu
OUT=runs/grid
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do [ "${args[$i]}" = "--out" ] && OUT="${args[$((i + 1))]}"; done
for launch in $(seq 1 50); do
    deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29533}" tools/experiments/run_grid.py \
        --max-runs "${MAX_RUNS:-60}" --out "$OUT" "$@"
    [ -f "$OUT/DONE" ] && exit 0
done
echo "grid not finished after 50 launches" >&2
exit 1
