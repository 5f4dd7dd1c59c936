"""Tensor-parallel helpers shared by the model and by whoever lays out its gradients.

Megatron-core marks a TP-partitioned parameter with ``tensor_model_parallel=True``,
``partition_dim`` and ``partition_stride``; everything here reads those attributes only, so it
works for megatron-core layers other than ours, with one limit: :func:`gather_full_tensor`
concatenates contiguous shards (``partition_stride`` 1, as in every layer of this model) and
refuses strided ones. The attribute readers themselves live in
:mod:`megatron_shaping.stats.tp` (shared with the DeepSpeed integration); here they default the
TP rank and size to megatron's ``parallel_state``.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Optional, Tuple

import torch

from ..stats.tp import full_shape as _full_shape
from ..stats.tp import is_tp_duplicate as _is_tp_duplicate
from ..stats.tp import is_tp_sharded
from ..stats.tp import partition_dim as _partition_dim

__all__ = ["full_shape", "gather_full_tensor", "is_tp_duplicate", "is_tp_sharded", "mark_tp_replicated",
           "param_seed", "seeded_normal_init"]


def _tp_value(group, of_group: Callable, of_state: str, default: int) -> int:
    """``of_group(group)`` for an explicit group, else megatron parallel_state's value (``default``
    before model parallelism is initialised)."""
    from megatron.core import parallel_state
    if group is not None:
        return of_group(group)
    if not parallel_state.model_parallel_is_initialized():
        return default
    return getattr(parallel_state, of_state)()


def _tp_size(group=None) -> int:
    return _tp_value(group, torch.distributed.get_world_size, "get_tensor_model_parallel_world_size", 1)


def _tp_rank(group=None) -> int:
    return _tp_value(group, torch.distributed.get_rank, "get_tensor_model_parallel_rank", 0)


def full_shape(param: torch.Tensor, tp_world_size: Optional[int] = None) -> Tuple[int, ...]:
    """Whole-model shape of a possibly TP-sharded parameter: the local shape with
    ``partition_dim`` multiplied by the TP world size (default: megatron parallel_state's)."""
    return _full_shape(param, _tp_size() if tp_world_size is None else tp_world_size)


def is_tp_duplicate(param: torch.Tensor, tp_rank: Optional[int] = None) -> bool:
    """True for a TP-replicated parameter on TP rank > 0 (default rank: megatron
    parallel_state's); see :func:`megatron_shaping.stats.tp.is_tp_duplicate`."""
    return _is_tp_duplicate(param, _tp_rank() if tp_rank is None else tp_rank)


def mark_tp_replicated(param: torch.Tensor) -> torch.Tensor:
    """Give a replicated parameter megatron's default attributes explicitly
    (``tensor_model_parallel=False``), so readers never have to guess from absence."""
    from megatron.core.tensor_parallel import set_defaults_if_not_set_tensor_model_parallel_attributes
    set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    return param


def param_seed(base_seed: int, key: str) -> int:
    """A 63-bit seed from the run seed and a parameter's logical name. hashlib, not hash():
    Python's str hash is salted per process and would differ between ranks."""
    digest = hashlib.sha256(f"{base_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_normal_init(key: str, base_seed: int, std: float) -> Callable[[torch.Tensor], None]:
    """An init_method for megatron's ``_initialize_affine_weight_cpu``: it is called on the
    *full* (master) weight, which is then split, so every TP size sees the same full weight."""
    def init(tensor: torch.Tensor) -> None:
        gen = torch.Generator(device="cpu").manual_seed(param_seed(base_seed, key))
        with torch.no_grad():
            tensor.copy_(torch.empty(tensor.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))
    return init


def gather_full_tensor(t: torch.Tensor, param: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather the TP shards of ``t`` (a tensor laid out like ``param``: the param itself or
    its gradient) into the whole-model tensor; replicated tensors are returned as they are."""
    if not is_tp_sharded(param) or _tp_size(group) == 1:
        return t
    from megatron.core import parallel_state
    group = group or parallel_state.get_tensor_model_parallel_group()
    if int(getattr(param, "partition_stride", 1)) != 1:
        raise ValueError(f"gather_full_tensor: partition_stride {param.partition_stride} (strided shards) is not "
                         f"supported; only contiguous shards (stride 1) are concatenated")
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=_partition_dim(param))
