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


#: where DeepSpeed AutoTP layers describe a parameter's split (deepspeed.checkpoint.constants
#: DS_AUTOTP_UC_META); they set ``tensor_model_parallel`` but no ``partition_dim``
AUTOTP_META = "ds_autotp_universal_checkpoint_meta"


def partition_dim(param: torch.Tensor) -> int:
    """The dimension a TP shard is split along: megatron-core's ``partition_dim``, else the one
    DeepSpeed AutoTP records in its metadata (row-parallel ``LinearAllreduce``: 1). A shard that
    says neither is refused: taking 0 for a row-parallel weight made each rank's partial rows
    units of their own (AGC's row norms then differ from the single-GPU run)."""
    pd = getattr(param, "partition_dim", None)
    if pd is None:
        meta = getattr(param, AUTOTP_META, None)
        pd = meta.get("partition_dim") if isinstance(meta, dict) else None
    if pd is None:
        raise ValueError(f"a tensor-parallel parameter of local shape {tuple(local_shape(param))} does not say which "
                         f"dimension it is split along (no partition_dim attribute, no DeepSpeed AutoTP metadata "
                         f"with one); set param.partition_dim")
    return int(pd)


def full_shape(param: torch.Tensor, tp_world_size: int) -> Tuple[int, ...]:
    """Whole-model shape: the local shape with :func:`partition_dim` multiplied by the TP world
    size for a TP shard."""
    shape = list(local_shape(param))
    if tp_world_size > 1 and is_tp_sharded(param):
        shape[partition_dim(param)] *= tp_world_size
    return tuple(shape)


def is_tp_duplicate(param: torch.Tensor, tp_rank: int) -> bool:
    """True for a TP-replicated parameter on TP rank > 0 (its gradient equals rank 0's, so
    statistics must count it once); the complement of megatron's
    ``param_is_not_tensor_parallel_duplicate``."""
    return tp_rank > 0 and not is_tp_sharded(param)
