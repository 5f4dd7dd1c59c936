"""The ZeRO-1/2 adapter's gradient pieces (``Zero12Adapter.pieces``) on a stand-in optimizer.

DeepSpeed (0.19.8) hands the rank's partition as a new list ``averaged_gradients[i]`` every
step: parameter pieces at their insertion offsets, zero pads between and after them (some
marked ``_zero_padding``). The adapter keeps each group's layout (which parameters, where) and
the positions of their pieces in the list, and must find the pieces again when the list is laid
out differently. Reference: the pieces written out by hand (offsets, values, parameter
values). Controls: at a kept position, a marked pad of the piece's size, a piece of another
size, or a piece of the right size at another offset, is not taken; a piece missing from the
list is refused by name.
"""
from types import SimpleNamespace

import pytest
import torch

import deepspeed.comm as ds_comm
from megatron_shaping.integrations.deepspeed.adapters import UnsupportedPath, Zero12Adapter

SIZES = [6, 10, 4]          # three parameters; the partition holds 2 of p0, all of p1, 3 of p2


@pytest.fixture(autouse=True)
def rank0(monkeypatch):
    monkeypatch.setattr(ds_comm, "get_rank", lambda group=None: 0)


def _opt():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in SIZES]
    ids = {id(p): k for k, p in enumerate(params)}
    # partition 0 of group 0: p0[4:6] at 0, pad of 3 at 2, p1 at 5, p2[0:3] at 15 (size 18)
    return SimpleNamespace(
        params_in_partition=[params], cpu_offload=False, real_dp_process_group=[None],
        single_partition_of_fp32_groups=[torch.arange(18, dtype=torch.float32)],
        get_param_id=lambda p: ids[id(p)], partition_size=[18],
        grad_start_offset=[{0: {0: 4, 1: 0, 2: 0}}],
        grad_partition_insertion_offset=[{0: {0: 0, 1: 5, 2: 15}}],
        averaged_gradients={})


def _list(pad_first=False):
    """The gradient list of one step: values tell the pieces apart (p0: 1, p1: 2, p2: 3)."""
    pad = torch.zeros(3)
    pad._zero_padding = True
    p0, p1, p2 = torch.full((2,), 1.0), torch.full((10,), 2.0), torch.full((3,), 3.0)
    out = [p0, pad, p1, p2]
    if pad_first:           # another layout: the pad in two pieces (unmarked, as DeepSpeed's tail pad)
        a, b = torch.zeros(1), torch.zeros(2)
        out = [p0, a, b, p1, p2]
    return out


def _pieces(adapter, grads):
    adapter.opt.averaged_gradients[0] = grads
    return [(pc.offset, pc.grad.tolist(), None if pc.values is None else pc.values.tolist())
            for pc in adapter.pieces(with_param=True)]


EXPECTED = [(4, [1.0, 1.0], [0.0, 1.0]), (0, [2.0] * 10, [float(v) for v in range(5, 15)]),
            (0, [3.0] * 3, [15.0, 16.0, 17.0])]


def test_pieces_kept_and_found_again_when_the_list_changes():
    ad = Zero12Adapter(SimpleNamespace(optimizer=_opt()))
    assert _pieces(ad, _list()) == EXPECTED
    plan = ad._plans[0]
    assert plan[3] == [0, 2, 3, 4]                       # positions kept (and the list length)
    assert _pieces(ad, _list()) == EXPECTED               # a new list of the same layout
    assert ad._plans[0] is plan and plan[3] == [0, 2, 3, 4]
    assert _pieces(ad, _list(pad_first=True)) == EXPECTED  # another layout: matched again
    assert plan[3] == [0, 3, 4, 5]


def test_a_kept_position_holding_another_piece_is_not_taken():
    ad = Zero12Adapter(SimpleNamespace(optimizer=_opt()))
    _pieces(ad, _list())
    # control: same length, but p1's kept position now holds a marked pad of p1's size
    grads = _list()
    decoy = torch.zeros(10)
    decoy._zero_padding = True
    swapped = [grads[0], grads[1], decoy, grads[3]]
    assert not Zero12Adapter._index_holds(swapped, ad._plans[0][2], ad._plans[0][3])
    with pytest.raises(UnsupportedPath, match="no gradient piece of 10 elements at offset 5"):
        _pieces(ad, swapped)            # p1 is not in that list at all: refused, not guessed
    # a piece of another size at a kept position is not taken either
    short = [grads[0], grads[1], torch.zeros(9), grads[3]]
    assert not Zero12Adapter._index_holds(short, ad._plans[0][2], [0, 2, 3, 4])
    # nor pieces of the right sizes at the kept positions but at other offsets (a longer pad)
    pad = torch.zeros(4)
    pad._zero_padding = True
    shifted = [grads[0], pad, torch.full((10,), 2.0), grads[3]]
    assert not Zero12Adapter._index_holds(shifted, ad._plans[0][2], [0, 2, 3, 4])
    with pytest.raises(UnsupportedPath, match="no gradient piece of 10 elements at offset 5"):
        _pieces(ad, shifted)
