import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_shaping.shapers.value_clip import ValueClip
from shaper_testlib import Driver, layout_of, shape_once, stats_of_norms

vectors = st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=12)


def test_hand_values():
    # clamp to [-1, 1]: -3 -> -1, 0.5 stays, 2 -> 1
    out = shape_once(ValueClip(1.0), {"w": torch.tensor([-3.0, 0.5, 2.0])})
    assert torch.equal(out["w"], torch.tensor([-1.0, 0.5, 1.0]))


def test_clamps_true_values_under_loss_scale():
    # grads carry a loss scale of 1024: true values (-3, 0.5, 2) -> (-1, 0.5, 1) -> stored x 1024
    d = Driver(ValueClip(1.0), {"w": (3,)})
    _, out = d.step({"w": torch.tensor([-3.0, 0.5, 2.0]) * 1024}, loss_scale=1024.0)
    assert torch.equal(out["w"], torch.tensor([-1024.0, 512.0, 1024.0]))


def test_bf16_grads_keep_dtype_and_are_clamped():
    out = shape_once(ValueClip(0.5), {"w": torch.tensor([-2.0, 0.25, 4.0])}, dtype=torch.bfloat16)
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], torch.tensor([-0.5, 0.25, 0.5], dtype=torch.bfloat16))


def test_plan_skips_the_map_when_nothing_exceeds():
    sh = ValueClip(1.0)
    st0 = sh.init(layout_of(3, 3))
    # ||g||_2 <= 1 bounds every entry by 1: the plan is a pure scale of ones
    plan, _ = sh.update(stats_of_norms(0.9, 1.0), st0)
    plan = plan.resolve()           # the shortcut is decided on the device (skip_map)
    assert plan.is_pure_scale and torch.equal(plan.scale, torch.ones(2, dtype=torch.float64))
    plan, _ = sh.update(stats_of_norms(0.9, 1.5), st0)
    plan = plan.resolve()
    assert plan.elementwise is not None and {k: v.tolist() for k, v in plan.elementwise.params.items()} == {"clip": [1.0, 1.0]}


@settings(max_examples=50, deadline=None)
@given(a=vectors, c=st.floats(1e-3, 1e3))
def test_bounds_entries_keeps_signs_and_is_idempotent(a, c):
    g = torch.tensor(a)
    once = shape_once(ValueClip(c), {"w": g})["w"]
    twice = shape_once(ValueClip(c), {"w": once})["w"]
    c32 = torch.tensor(c, dtype=torch.float32)
    assert bool((once.abs() <= c32).all())
    assert torch.equal(torch.sign(once), torch.sign(g))
    assert torch.equal(twice, once)


@settings(max_examples=30, deadline=None)
@given(a=vectors)
def test_infinite_clip_changes_nothing(a):
    g = torch.tensor(a)
    assert torch.equal(shape_once(ValueClip(math.inf), {"w": g})["w"], g)


@pytest.mark.parametrize("bad", [0.0, -2, float("nan"), "x"])
def test_rejects_bad_clip_value(bad):
    with pytest.raises(ValueError, match="clip_value"):
        ValueClip(bad)


def test_a_clip_value_past_the_float64_square_range():
    # clip_value 1e200 (accepted: any positive value): its square overflows float64 (Python's **
    # raises there); nothing exceeds it, so the gradient is left as it is, and a 1e30 entry
    # (fp32) too
    g = torch.tensor([3.0, -4.0, 1e30, 1.0])
    out = shape_once(ValueClip(clip_value=1e200), {"w": g.clone()})["w"]
    assert torch.equal(out, g)
