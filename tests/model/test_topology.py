"""DeepSpeed's (pipe, data, model) topology and megatron-core's rank order give the same groups.
Pure rank arithmetic, no processes; init_parallel re-checks the live groups at run time."""
import itertools

import pytest

from megatron_shaping.model.parallel import deepspeed_groups, megatron_groups, topology


@pytest.mark.parametrize("tp,pp,dp", [c for c in itertools.product([1, 2, 4], [1, 2, 4], [1, 2, 3])])
def test_group_layouts_match(tp, pp, dp):
    topo = topology(tp, pp, tp * pp * dp)
    assert deepspeed_groups(topo) == megatron_groups(tp, pp, dp)


def test_tensor_rank_fastest():
    topo = topology(2, 2, 8)
    groups = deepspeed_groups(topo)
    assert [0, 1] in groups["model"]
    assert [0, 2] in groups["data"]
    assert [0, 4] in groups["pipe"]


def test_bad_world_size():
    with pytest.raises(ValueError, match="not divisible"):
        topology(2, 2, 6)
