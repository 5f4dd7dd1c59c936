import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_shaping.shapers.entrywise_shrink import EntrywiseShrink, ShrinkMap
from shaper_testlib import Driver, shape_once


def test_hand_values_power_2():
    # g = (3, -4, 0, 1): sum|g| = 8, N = 4 -> s = 2, T = threshold * s = 2
    # f(g) = g / sqrt(1 + (g/2)^2): 3 / sqrt(3.25), -4 / sqrt(5), 0, 1 / sqrt(1.25)
    out = shape_once(EntrywiseShrink(threshold=1.0), {"w": torch.tensor([3.0, -4.0, 0.0, 1.0])})["w"]
    exp = [3 / math.sqrt(3.25), -4 / math.sqrt(5), 0.0, 1 / math.sqrt(1.25)]
    assert out.tolist() == pytest.approx(exp, rel=1e-6)


def test_hand_values_power_1():
    # T = 2, f(g) = g / (1 + |g|/2): 3 / 2.5 = 1.2, -4 / 3, 0, 1 / 1.5
    out = shape_once(EntrywiseShrink(threshold=1.0, power=1.0), {"w": torch.tensor([3.0, -4.0, 0.0, 1.0])})["w"]
    assert out.tolist() == pytest.approx([1.2, -4 / 3, 0.0, 1 / 1.5], rel=1e-6)


def test_hand_values_ema_of_the_scale():
    # beta = 0.5: step 1 s = 2 -> m = 1, s_hat = 1 / (1 - 0.5) = 2 (bias-corrected: T = 2 as without EMA)
    # step 2 g x 10: s = 20 -> m = 0.5 * 1 + 0.5 * 20 = 10.5, s_hat = 10.5 / (1 - 0.25) = 14 -> T = 14
    d = Driver(EntrywiseShrink(threshold=1.0, beta=0.5), {"w": (4,)})
    g = torch.tensor([3.0, -4.0, 0.0, 1.0])
    _, out1 = d.step({"w": g})
    assert out1["w"].tolist() == pytest.approx([3 / math.sqrt(3.25), -4 / math.sqrt(5), 0, 1 / math.sqrt(1.25)],
                                               rel=1e-6)
    _, out2 = d.step({"w": g * 10})
    assert out2["w"].tolist() == pytest.approx([30 / math.sqrt(1 + (30 / 14) ** 2), -40 / math.sqrt(1 + (40 / 14) ** 2),
                                                0.0, 10 / math.sqrt(1 + (10 / 14) ** 2)], rel=1e-6)
    assert d.gs.state[0].m.tolist() == pytest.approx([10.5]) and d.gs.state[0].count.tolist() == [2.0]


def test_map_survives_overflow_and_keeps_signs():
    g = torch.tensor([3e38, -3e38, 1e-45, -0.0, 0.0, float("inf")])
    out = ShrinkMap().apply(g, T=1e-3, p=2.0)
    assert out.tolist()[:2] == pytest.approx([1e-3, -1e-3], rel=1e-6)
    assert out[2] == pytest.approx(1e-45, rel=1e-2) and out[3] == 0 and out[4] == 0
    assert out[5] == pytest.approx(1e-3, rel=1e-6)


@settings(max_examples=50, deadline=None)
@given(vals=st.lists(st.floats(-1e30, 1e30, allow_nan=False), min_size=1, max_size=16),
       threshold=st.sampled_from([0.5, 3.0, 10.0]), power=st.sampled_from([1.0, 2.0, 4.0]))
def test_bounded_sign_preserving_and_order_preserving(vals, threshold, power):
    g = torch.tensor(vals)
    out = shape_once(EntrywiseShrink(threshold=threshold, power=power), {"w": g})["w"]
    # T = threshold * max(mean|g|, eps): the eps floor (1e-30) decides for tiny gradients
    s = g.double().abs().mean().clamp_min(EntrywiseShrink().eps)
    assert bool(torch.isfinite(out).all())
    assert bool((out.double().abs() <= threshold * s * (1 + 1e-5) + 1e-37).all())
    assert bool((out.abs() <= g.abs()).all())
    assert bool(((out == 0) | (torch.sign(out) == torch.sign(g))).all())
    order = torch.argsort(g, stable=True)
    assert bool((out[order][1:] >= out[order][:-1]).all())


@settings(max_examples=30, deadline=None)
@given(vals=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=16))
def test_infinite_threshold_changes_nothing(vals):
    g = torch.tensor(vals)
    assert torch.equal(shape_once(EntrywiseShrink(threshold=math.inf), {"w": g})["w"], g)


def test_gaussian_bulk_is_nearly_untouched_and_outliers_bounded():
    # the default threshold 10 x mean|g| = 10 x 0.80 sigma = 8 sigma: a Gaussian tensor loses about 2%
    # of its norm; outliers whose summed size is small against N sigma (here 1.4e3 vs 2e5) end near 8
    g = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    out = shape_once(EntrywiseShrink(), {"w": g})["w"]
    assert float(out.norm() / g.norm()) == pytest.approx(0.978, abs=0.003)
    g[:3] = torch.tensor([100.0, -300.0, 1000.0])
    out = shape_once(EntrywiseShrink(), {"w": g})["w"]
    assert 7.9 < float(out[:3].abs().max()) < 8.1


def test_a_huge_outlier_raises_its_own_threshold():
    # the limit of mean |g| as the scale: one entry M moves s by M / N. M = 1e6 in N = 2e5 entries
    # adds 5 to s = 0.8, so T = 10 x 5.8 = 58 instead of 8 (still bounded, far from the bulk).
    g = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    g[0] = 1e6
    out = shape_once(EntrywiseShrink(), {"w": g})["w"]
    s = float(g.double().abs().mean())
    assert s == pytest.approx(0.8 + 5, abs=0.01)
    assert float(out[0]) == pytest.approx(10 * s, rel=1e-4)


@pytest.mark.parametrize("kw, name", [({"threshold": 0}, "threshold"), ({"power": 0}, "power"),
                                      ({"power": math.inf}, "power"), ({"beta": 1}, "beta"), ({"eps": 0}, "eps")])
def test_rejects_bad_hparams(kw, name):
    with pytest.raises(ValueError, match=name):
        EntrywiseShrink(**kw)


def test_a_small_power_the_constructor_accepts_shapes():
    # power 0.1 (accepted: any positive finite power): the clamp bound 10^(36/p) is capped at 1e30
    # before it is computed (10.0 ** 360 raises OverflowError). T = 2, f(g) = g / (1 + |g/2|^0.1)^10
    out = shape_once(EntrywiseShrink(threshold=1.0, power=0.1), {"w": torch.tensor([3.0, -4.0, 0.0, 1.0])})["w"]
    exp = [g / (1 + abs(g / 2) ** 0.1) ** 10 for g in (3.0, -4.0, 0.0, 1.0)]
    assert out.tolist() == pytest.approx(exp, rel=1e-5)
