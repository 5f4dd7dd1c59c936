"""Which parameters are tensor-parallel shards, and their whole-model shapes.

Reads parameter attributes only, so the model (``megatron_shaping.model``) and the DeepSpeed
integration share it without either importing the other, DeepSpeed or megatron-core:
megatron-core marks a TP-partitioned parameter with ``tensor_model_parallel=True`` and
``partition_dim``; DeepSpeed (``is_model_parallel_parameter``) also accepts ``model_parallel``;
ZeRO-3 keeps a partitioned parameter's shape in ``ds_shape``.
"""
from __future__ import annotations

from typing import Tuple

import torch


def is_tp_sharded(param: torch.Tensor) -> bool:
    """True when ``param`` is one TP rank's shard (``tensor_model_parallel`` or ``model_parallel``)."""
    return bool(getattr(param, "tensor_model_parallel", False) or getattr(param, "model_parallel", False))


def local_shape(param: torch.Tensor) -> Tuple[int, ...]:
    """This rank's shape of ``param`` (ZeRO-3's ``ds_shape`` when partitioned)."""
    ds_shape = getattr(param, "ds_shape", None)      # (torch.Size([]) of a scalar is falsy: test None)
    return tuple(param.shape if ds_shape is None else ds_shape)


def full_shape(param: torch.Tensor, tp_world_size: int) -> Tuple[int, ...]:
    """Whole-model shape: the local shape with ``partition_dim`` multiplied by the TP world size
    for a TP shard."""
    shape = list(local_shape(param))
    if tp_world_size > 1 and is_tp_sharded(param):
        shape[int(getattr(param, "partition_dim", 0))] *= tp_world_size
    return tuple(shape)


def is_tp_duplicate(param: torch.Tensor, tp_rank: int) -> bool:
    """True for a TP-replicated parameter on TP rank > 0 (its gradient equals rank 0's, so
    statistics must count it once); the complement of megatron's
    ``param_is_not_tensor_parallel_duplicate``."""
    return tp_rank > 0 and not is_tp_sharded(param)
