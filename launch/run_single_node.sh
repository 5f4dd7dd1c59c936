#!/usr/bin/env bash
# Single node: NPROC processes (GPUs, or CPU ranks) through the deepspeed launcher.
#
#   NPROC=2 bash launch/run_single_node.sh --deepspeed_config configs/deepspeed/zero1_bf16_spamp.json \
#       --train-iters 200
#
# Every argument goes to launch/pretrain.py. Without a visible GPU the run uses DeepSpeed's CPU
# accelerator (gloo). With CUDA_VISIBLE_DEVICES set, one process per listed GPU. The launcher:
# $DEEPSPEED, else .venv/bin/deepspeed, else deepspeed on PATH (launch/_common.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_common.sh
NPROC=${NPROC:-2}
MASTER_PORT=${MASTER_PORT:-29500}
if [ "${DS_ACCELERATOR:-cuda}" != cpu ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    # --num_gpus would make the launcher drop CUDA_VISIBLE_DEVICES (and use GPUs 0..NPROC-1):
    # without it, it runs one process on each listed GPU
    echo "run_single_node: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES: one process per listed GPU (NPROC ignored)"
    exec "$DEEPSPEED" --master_port "$MASTER_PORT" launch/pretrain.py "$@"
fi
exec "$DEEPSPEED" --num_gpus "$NPROC" --master_port "$MASTER_PORT" launch/pretrain.py "$@"
