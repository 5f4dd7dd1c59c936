#!/usr/bin/env bash
# Demo: a short real pretraining on CPU, 2 processes through the deepspeed launcher, with
# gradient shaping on. Prints loss, validation loss, lr, tokens/s and what the shaper did.
#
#   bash launch/run_demo.sh                    # GradientStabilizer, 300 iterations (~3-4 min on 2 cores)
#   SHAPER=spamp bash launch/run_demo.sh       # SPAMP (or norm_clip, zclip, agc, adagc, ...; none: off)
#   ITERS=50 bash launch/run_demo.sh --seq-length 64     # extra arguments go to launch/pretrain.py
#
# Data: the Python standard library of this interpreter (tokenizer trained and corpus tokenised
# on first use, ~15 s, cached in $MEGATRON_SHAPING_CACHE or ./cache). Model: configs/models/llama-tiny.json.
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPER=${SHAPER:-gradient_stabilizer}
ZERO=${ZERO:-1}
ITERS=${ITERS:-300}
NPROC=${NPROC:-2}
CONFIG=configs/deepspeed/zero${ZERO}_bf16_${SHAPER}.json
[ -f "$CONFIG" ] || { echo "no DeepSpeed config $CONFIG (SHAPER=$SHAPER ZERO=$ZERO); see configs/deepspeed/" >&2; exit 2; }
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
DEEPSPEED=deepspeed
[ -x .venv/bin/deepspeed ] && DEEPSPEED=.venv/bin/deepspeed
exec "$DEEPSPEED" --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" launch/pretrain.py \
    --deepspeed_config "$CONFIG" --model-preset llama-tiny \
    --micro-batch-size 4 --global-batch-size 16 --train-iters "$ITERS" \
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 30 \
    --eval-interval 50 --eval-iters 4 --log-interval 10 "$@"
