#!/usr/bin/env bash
# Several nodes listed in a DeepSpeed hostfile ("HOST slots=N" per line, see hostfile.example).
#
# pdsh (default): run once, on the first host; the deepspeed launcher starts every node over
# passwordless ssh/pdsh:
#   HOSTFILE=launch/hostfile bash launch/run_multinode.sh --deepspeed_config ... --train-iters 1000
#
# No ssh: run once per node, each with its NODE_RANK (0 = first hostfile line) and the same
# MASTER_ADDR (the first node's address) and MASTER_PORT:
#   NO_SSH=1 NODE_RANK=0 MASTER_ADDR=10.0.0.1 HOSTFILE=launch/hostfile bash launch/run_multinode.sh ...
#   NO_SSH=1 NODE_RANK=1 MASTER_ADDR=10.0.0.1 HOSTFILE=launch/hostfile bash launch/run_multinode.sh ...
#
# Every argument goes to launch/pretrain.py. The data cache ($MEGATRON_SHAPING_CACHE, default
# ./cache) and --data-cache-path must be on a filesystem every node shares: megatron-core builds
# the dataset indices on global rank 0 only and the other nodes read them there. With pdsh
# the deepspeed launcher forwards only some variables (PYTHON*, NCCL*, UCX*, ...) to the other
# nodes: put MEGATRON_SHAPING_CACHE=... and any other the nodes need in .deepspeed_env (in the
# current or home directory); with NO_SSH=1 set them on every node. Relative paths in the
# arguments (--save, --deepspeed_config, ...) are taken from the repository root.
set -euo pipefail
HOSTFILE=${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile}
# Resolved against the caller's directory, before the cd below; a missing hostfile would make
# the deepspeed launcher warn and train on this node alone
[ -f "$HOSTFILE" ] || { echo "run_multinode: HOSTFILE $HOSTFILE: no such file (from $(pwd))" >&2; exit 2; }
HOSTFILE="$(cd "$(dirname "$HOSTFILE")" && pwd)/$(basename "$HOSTFILE")"
cd "$(dirname "$0")/.."
source launch/_common.sh
MASTER_PORT=${MASTER_PORT:-29500}
if [ "${NO_SSH:-0}" = "1" ]; then
    exec "$DEEPSPEED" --hostfile "$HOSTFILE" --no_ssh --node_rank "${NODE_RANK:?set NODE_RANK}" \
        --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "$MASTER_PORT" \
        launch/pretrain.py "$@"
fi
exec "$DEEPSPEED" --hostfile "$HOSTFILE" --launcher pdsh ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} \
    --master_port "$MASTER_PORT" launch/pretrain.py "$@"
