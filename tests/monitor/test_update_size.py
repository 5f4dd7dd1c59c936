"""Update-size statistics (parameter norm and update/parameter norm ratio per group) against a
hand computation, one process; the sharded runs (ZeRO 1/2/3, pipeline) are compared with the
unsharded reference in test_monitor_deepspeed.py.

Two shards of one parameter are summed, a replica (``counted=False``) is left out, as the
gradient statistics do; with ``log_interval: 0`` no tracker exists at all.
"""
import math
from types import SimpleNamespace

import pytest
import torch

from megatron_shaping.integrations.deepspeed.config import get_gradient_shaping_config
from megatron_shaping.integrations.deepspeed.monitor import UpdateSizeTracker, install_update_size


def piece(values, group, counted=True):
    return SimpleNamespace(param=torch.tensor(values, dtype=torch.float32), group=group, counted=counted)


def test_hand_computed_norms_and_ratios_over_shards():
    # group 0: one parameter in two shards [3, 4] | [0]; group 1: [1, 0] and a replica of it
    a0, a1, b, b_rep = piece([3.0, 4.0], 0), piece([0.0], 0), piece([1.0, 0.0], 1), piece([1.0, 0.0], 1, False)
    tr = UpdateSizeTracker(2, interval=2, device="cpu", reduce=None)
    assert [tr.due(s) for s in range(4)] == [False, True, False, True]
    tr.before([a0, a1, b, b_rep])
    # the optimizer updates the live tensors in place
    a0.param.copy_(torch.tensor([3.0, 4.0]) + torch.tensor([0.3, 0.0]))
    a1.param.add_(0.4)                        # the update of group 0 is (0.3, 0, 0.4): norm 0.5
    b.param.mul_(2.0)                         # group 1: 1 -> 2, update norm 1
    b_rep.param.mul_(100.0)                   # a replica: not counted
    us = tr.after()
    assert us.param_norm.tolist() == pytest.approx([math.sqrt(3.3 ** 2 + 16 + 0.16), 2.0], rel=1e-6)
    assert us.update_norm.tolist() == pytest.approx([0.5, 1.0], rel=1e-6)
    assert us.update_ratio.tolist() == pytest.approx([0.5 / 5.0, 1.0], rel=1e-6)
    got, before2 = tr.take()
    assert before2.tolist() == pytest.approx([25.0, 1.0])
    assert tr.take() is None and tr.after() is None          # once per logged step


def test_the_reduction_sees_one_vector_with_all_three_sums():
    seen = []
    tr = UpdateSizeTracker(1, interval=1, device="cpu", reduce=lambda v: (seen.append(v.clone()), v.mul_(2)))
    p = piece([2.0], 0)
    tr.before([p])
    p.param.add_(1.0)
    us = tr.after()
    assert len(seen) == 1 and seen[0].tolist() == [9.0, 1.0, 4.0]    # after^2, delta^2, before^2
    # the "other rank" contributed the same sums: norms over both
    assert us.param_norm.item() == pytest.approx(math.sqrt(18.0)) and us.update_ratio.item() == pytest.approx(0.5)


class _Shaping:
    def __init__(self, section, monitors=True):
        self.config = get_gradient_shaping_config({"gradient_shaping": {"type": "spamp", **section}})
        self.engine = SimpleNamespace(monitor=SimpleNamespace(enabled=monitors))
        self.session = SimpleNamespace(layout=SimpleNamespace(num_groups=3, device="cpu"))
        self.world = 1


@pytest.mark.parametrize("section,monitors,on", [
    ({}, True, False),                                        # log_interval 0: nothing at all
    ({"log_interval": 5}, True, True),
    ({"log_interval": 5, "log_update_size": False}, True, False),
    ({"log_interval": 5}, False, False),                      # no DeepSpeed monitor: nothing written
])
def test_installed_only_when_logged(section, monitors, on):
    assert (install_update_size(_Shaping(section, monitors)) is not None) == on
