#!/usr/bin/env bash
# Demo: a short real pretraining on CPU, 2 processes through the deepspeed launcher, with
# gradient shaping on. Prints loss, validation loss, lr, tokens/s, what the shaper did, and at the
# end the wall time.
#
#   bash launch/run_demo.sh                    # GradientStabilizer, 150 iterations (~2 min on 2 cores, fp32)
#   SHAPER=spamp bash launch/run_demo.sh       # SPAMP (or norm_clip, zclip, agc, adagc, ...; none: off)
#   PRECISION=bf16 bash launch/run_demo.sh     # bf16 (default: auto, see below); PRECISION=fp32 forces fp32
#   ITERS=50 bash launch/run_demo.sh --seq-length 64     # extra arguments go to launch/pretrain.py
#
# Precision. PRECISION=auto (the default) picks bf16 on an accelerator (DS_ACCELERATOR other than
# cpu) and on CPUs with AMX (the amx_bf16 flag in /proc/cpuinfo), and fp32 on other CPUs. Not
# avx512_bf16 alone: on a 2-core CPU that has it, this demo trained 434 tokens/s in bf16 against
# 3,555 in fp32 (bf16 CPU training in PyTorch is far slower than fp32 without AMX). bf16 runs use
# configs/deepspeed/zero${ZERO}_bf16_${SHAPER}.json; fp32 runs the same file with "bf16" turned
# off, written to runs/demo/.
#
# Data: the Python standard library of this interpreter (tokenizer trained and corpus tokenised
# on first use, ~15 s, cached in $MEGATRON_SHAPING_CACHE or ./cache). Model: configs/models/llama-tiny.json.
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPER=${SHAPER:-gradient_stabilizer}
ZERO=${ZERO:-1}
ITERS=${ITERS:-150}
NPROC=${NPROC:-2}
PRECISION=${PRECISION:-auto}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
BF16_CONFIG=configs/deepspeed/zero${ZERO}_bf16_${SHAPER}.json
[ -f "$BF16_CONFIG" ] || { echo "no DeepSpeed config $BF16_CONFIG (SHAPER=$SHAPER ZERO=$ZERO); see configs/deepspeed/" >&2; exit 2; }
PYTHON=python3
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
DEEPSPEED=deepspeed
[ -x .venv/bin/deepspeed ] && DEEPSPEED=.venv/bin/deepspeed

if [ "$PRECISION" = auto ]; then
    if [ "$DS_ACCELERATOR" != cpu ]; then
        PRECISION=bf16; why="accelerator $DS_ACCELERATOR"
    elif grep -qw amx_bf16 "${CPUINFO:-/proc/cpuinfo}" 2>/dev/null; then
        PRECISION=bf16; why="CPU with AMX (amx_bf16)"
    else
        PRECISION=fp32; why="CPU without AMX: bf16 would be several times slower"
    fi
else
    why="PRECISION=$PRECISION"
fi
case "$PRECISION" in
    bf16) CONFIG=$BF16_CONFIG ;;
    fp32)
        CONFIG=runs/demo/zero${ZERO}_fp32_${SHAPER}.json
        mkdir -p runs/demo
        "$PYTHON" - "$BF16_CONFIG" "$CONFIG" <<'PY'
import json, sys
src, dst = sys.argv[1], sys.argv[2]
with open(src) as f:
    text = f.read()
cfg = json.loads(text.replace("_bf16_", "_fp32_"))   # monitor job name and spike-log path
cfg["bf16"] = {"enabled": False}
with open(dst, "w") as f:
    json.dump(cfg, f, indent=2)
PY
        ;;
    *) echo "PRECISION must be auto, bf16 or fp32 (got $PRECISION)" >&2; exit 2 ;;
esac
echo "run_demo: $PRECISION ($why), $ITERS iterations, $NPROC processes, config $CONFIG"

CMD=("$DEEPSPEED" --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" launch/pretrain.py
    --deepspeed_config "$CONFIG" --model-preset llama-tiny
    --micro-batch-size 4 --global-batch-size 16 --train-iters "$ITERS"
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 15
    --eval-interval 50 --eval-iters 4 --log-interval 10 "$@")
if [ -n "${DRY_RUN:-}" ]; then       # print the command instead of running it (tests)
    echo "${CMD[*]}"
    exit 0
fi
start=$(date +%s)
status=0
"${CMD[@]}" || status=$?
secs=$(( $(date +%s) - start ))
printf 'run_demo: wall time %dm%02ds (%s, %s iterations, %s processes)%s\n' $((secs / 60)) $((secs % 60)) \
    "$PRECISION" "$ITERS" "$NPROC" "$([ "$status" -ne 0 ] && echo ", FAILED with status $status")"
exit "$status"
