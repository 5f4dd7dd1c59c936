"""One rank layout for DeepSpeed and megatron-core.

DeepSpeed's ``PipeModelDataParallelTopology`` orders ranks with axes (pipe, data, model):
the tensor-parallel ("model") coordinate varies fastest, then data, then pipe. Megatron-core's
``initialize_model_parallel(order="tp-cp-ep-dp-pp")`` (its default, with cp = ep = 1) lists the
fastest-varying dimension first and so gives the same layout. :func:`init_parallel` builds
both and *checks* that every TP, DP and PP group has the same members, because a mismatch
would silently all-reduce gradients across the wrong ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.distributed as dist

#: megatron-core order matching DeepSpeed's (pipe, data, model) topology.
MEGATRON_ORDER = "tp-cp-ep-dp-pp"
#: DeepSpeed topology axis -> megatron RankGenerator token.
AXIS_TO_TOKEN = {"model": "tp", "data": "dp", "pipe": "pp"}


def topology(tp: int, pp: int, world_size: int):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by tensor-model-parallel size "
                         f"{tp} x pipeline-model-parallel size {pp}")
    return PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=world_size // (tp * pp))


def deepspeed_groups(topo) -> Dict[str, List[List[int]]]:
    return {axis: sorted(sorted(g) for g in topo.get_axis_comm_lists(axis)) for axis in AXIS_TO_TOKEN}


def megatron_groups(tp: int, pp: int, dp: int) -> Dict[str, List[List[int]]]:
    from megatron.core.parallel_state import RankGenerator
    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order=MEGATRON_ORDER)
    return {axis: sorted(sorted(g) for g in gen.get_ranks(tok)) for axis, tok in AXIS_TO_TOKEN.items()}


#: DeepSpeed's ``mpu`` method -> the megatron-core ``parallel_state`` function it answers with.
#: DeepSpeed calls the TP group "slice" parallel in its pipeline grid, and PP "pipe" parallel.
MPU_FORWARDS = {
    **{f"get_{dim}_{what}": f"get_{dim}_{what}"
       for dim in ("tensor_model_parallel", "data_parallel", "pipeline_model_parallel")
       for what in ("rank", "world_size", "group")},
    "get_tensor_model_parallel_src_rank": "get_tensor_model_parallel_src_rank",
    **{f"get_slice_parallel_{what}": f"get_tensor_model_parallel_{what}" for what in ("rank", "world_size", "group")},
    **{f"get_pipe_parallel_{what}": f"get_pipeline_model_parallel_{what}" for what in ("rank", "world_size", "group")},
}


class MPU:
    """The ``mpu`` object DeepSpeed takes: megatron-core's groups under the names DeepSpeed
    calls (:data:`MPU_FORWARDS`). "Model parallel" here is the TP x PP group, as in megatron."""

    def __init__(self, topo):
        from megatron.core import parallel_state as ps
        self.ps = ps
        self.topology = topo

    def __getattr__(self, name):
        # Only reached for names the class does not define: the forwarded getters.
        if name in MPU_FORWARDS:
            return getattr(self.ps, MPU_FORWARDS[name])
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # model parallel = TP x PP
    def get_model_parallel_rank(self): return self.ps.get_model_parallel_group().rank()
    def get_model_parallel_world_size(self): return self.ps.get_model_parallel_group().size()
    def get_model_parallel_group(self): return self.ps.get_model_parallel_group()

    def get_data_parallel_group_ranks(self): return dist.get_process_group_ranks(self.get_data_parallel_group())


@dataclass
class ParallelContext:
    tp: int
    pp: int
    dp: int
    topology: object
    mpu: MPU

    @property
    def is_pipeline(self) -> bool:
        return self.pp > 1


def init_parallel(tp: int = 1, pp: int = 1) -> ParallelContext:
    """Build megatron-core's parallel_state and the matching DeepSpeed topology on an
    initialised default process group (``deepspeed.init_distributed``), and verify that they
    agree group by group. Idempotent for the same sizes."""
    from megatron.core import parallel_state as ps
    if not dist.is_initialized():
        raise RuntimeError("init_parallel needs torch.distributed initialised "
                           "(call deepspeed.init_distributed(dist_backend='gloo') first)")
    world = dist.get_world_size()
    topo = topology(tp, pp, world)
    dp = world // (tp * pp)
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != (tp, pp):
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        # No extra gloo groups: megatron uses them only for its distributed optimizer.
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     order=MEGATRON_ORDER, create_gloo_process_groups=False)
    check_layout(topo, tp, pp, dp)
    return ParallelContext(tp=tp, pp=pp, dp=dp, topology=topo, mpu=MPU(topo))


def check_layout(topo, tp: int, pp: int, dp: int) -> None:
    """Assert that this rank's megatron TP/DP/PP groups are exactly DeepSpeed's."""
    from megatron.core import parallel_state as ps
    rank = dist.get_rank()
    coord = topo.get_coord(rank)
    actual = {
        "model": ps.get_tensor_model_parallel_group(),
        "data": ps.get_data_parallel_group(),
        "pipe": ps.get_pipeline_model_parallel_group(),
    }
    for axis, group in actual.items():
        mine = sorted(dist.get_process_group_ranks(group))
        expected = sorted(topo.filter_match(**{a: getattr(coord, a) for a in ("pipe", "data", "model") if a != axis}))
        if mine != expected:
            raise RuntimeError(f"rank {rank}: megatron {AXIS_TO_TOKEN[axis]} group {mine} differs from "
                               f"DeepSpeed topology '{axis}' group {expected} (tp={tp}, pp={pp}, dp={dp})")
