#!/usr/bin/env python
"""Pretrain a LLaMA with DeepSpeed and gradient shaping.

    deepspeed --num_gpus 2 launch/pretrain.py --model-preset llama-tiny \\
        --deepspeed_config configs/deepspeed/zero1_bf16_gradient_stabilizer.json \\
        --micro-batch-size 4 --global-batch-size 16 --train-iters 200 --lr 3e-3

Arguments follow Megatron-LM's names. Without ``--data-path`` it trains on the running
interpreter's standard-library sources (tokenizer trained and corpus tokenised on first use,
cached under $MEGATRON_SHAPING_CACHE or ./cache). The DeepSpeed config's "gradient_shaping"
section selects the shaper; ``megatron_shaping.initialize`` attaches it.

Batch sizes, the learning rate and the schedule come from the command line and override the
DeepSpeed config (``train_batch_size``, ``train_micro_batch_size_per_gpu``,
``gradient_accumulation_steps``, ``optimizer.params.lr``), as Megatron-DeepSpeed does.

The loop itself is ``megatron_shaping.training`` (shared with tools/experiments/run_grid.py).
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if "OMP_NUM_THREADS" not in os.environ:
    # Split the cores between the processes of this node, before torch starts its thread
    # pools: on CPU, oversubscribed ranks waiting in gloo collectives slow each other down
    # several-fold (torch.set_num_threads after import does not cover every pool).
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
    _local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, _local)))

# megatron-core warns once per module that the GPU fast paths are absent; on CPU that is expected
# and the repeated lines would bury the training log.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from megatron_shaping import training  # noqa: E402
from megatron_shaping.shutdown import exit_process  # noqa: E402


def main(argv=None) -> dict:
    return training.pretrain(training.parse_args(argv, description=__doc__, prog="pretrain.py"))


if __name__ == "__main__":
    main()
    exit_process()      # not through finalization: megatron_shaping/shutdown.py
