#!/usr/bin/env bash
# Issue 7 evidence grid, one command (resumes: finished runs in OUT/results.jsonl are skipped).
#   bash tools/experiments/run_grid.sh [--out runs/grid] [--plan grid|smoke] [...run_grid.py args]
# then: python tools/experiments/analyze.py --runs runs/grid
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
export DS_ACCELERATOR=cpu
exec deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29533}" tools/experiments/run_grid.py "$@"
