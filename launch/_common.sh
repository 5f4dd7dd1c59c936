# Sourced by the launchers (run_single_node.sh, run_multinode.sh, pretrain.sbatch) from the
# repository root: which deepspeed launcher to run and which accelerator.
#
# DEEPSPEED: $DEEPSPEED, else the project's .venv/bin/deepspeed (what launch/quickstart.sh and
# tools/setup_env.sh install), else `deepspeed` on PATH.
if [ -z "${DEEPSPEED:-}" ]; then
    if [ -x .venv/bin/deepspeed ]; then DEEPSPEED=.venv/bin/deepspeed; else DEEPSPEED=deepspeed; fi
fi
if ! command -v "$DEEPSPEED" >/dev/null 2>&1; then
    echo "$(basename "$0"): no deepspeed launcher ($DEEPSPEED): run 'bash tools/setup_env.sh' first, or set DEEPSPEED" >&2
    exit 127
fi
# DS_ACCELERATOR: as set, else cpu when no CUDA device is visible (nvidia-smi, or torch where a
# container has no nvidia-smi), so that a CPU-only machine runs DeepSpeed's CPU accelerator (gloo).
if [ -z "${DS_ACCELERATOR:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    py="$(dirname "$(command -v "$DEEPSPEED")")/python"
    [ -x "$py" ] || py=python3
    if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
        export DS_ACCELERATOR=cpu
    fi
fi
