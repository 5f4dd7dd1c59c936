#!/usr/bin/env bash
# Fresh machine -> a short real pretraining run, in one command:
#   1. set-up: tools/setup_env.sh (./.venv with the pinned CPU stack: torch 2.13.0 CPU, deepspeed
#      0.19.8, ...; a few minutes the first time, seconds after) and DeepSpeed's shared-memory
#      comm op, which DeepSpeed JIT-compiles on first use (about 2 minutes once, then cached);
#   2. launch/run_demo.sh: llama-tiny on the Python standard library sources, 2 processes through
#      the deepspeed launcher, GradientStabilizer on (SHAPER=spamp for SPAMP), fp32 on CPUs without
#      AMX (PRECISION=bf16 to force bf16), printing loss, validation loss and shaping statistics.
#      About 2 minutes on 2 idle cores, including the tokenizer training of the first run.
# Prints the time of each part at the end. Extra arguments go to launch/pretrain.py; SHAPER, ITERS,
# ZERO, NPROC, PRECISION as in run_demo.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
bash tools/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
if [ "$DS_ACCELERATOR" = cpu ]; then
    # Build (or load the cached) comm op now, so the demo's time is the demo's.
    python - <<'PY' 2>&1 | grep -v "real_accelerator.py" || true
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder("ShareMemCommBuilder").load()
PY
fi
t1=$(date +%s)
status=0
bash launch/run_demo.sh "$@" || status=$?
t2=$(date +%s)
printf 'quickstart: set-up %ds, demo %dm%02ds, total %dm%02ds\n' $((t1 - t0)) $(((t2 - t1) / 60)) $(((t2 - t1) % 60)) \
    $(((t2 - t0) / 60)) $(((t2 - t0) % 60))
exit "$status"
