import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_shaping.shapers.gradient_stabilizer import GradientStabilizer
from shaper_testlib import Driver, layout_of, stats_of_norms


def test_hand_values():
    sh = GradientStabilizer()           # beta1 0.6, beta2 0.999, eps 1e-12
    state = sh.init(layout_of(2))
    # step 1, n = 5: m = 0.4 * 5 = 2, v = 0.001 * 25 = 0.025; m_hat = 2 / 0.4 = 5, v_hat = 0.025 / 0.001 = 25
    # target = 5 / (5 + 1e-12), scale = target / 5 -> shaped norm 1
    plan, state = sh.update(stats_of_norms(5.0), state)
    assert float(plan.scale[0]) == pytest.approx(1 / 5, rel=1e-11)
    assert state.m.tolist() == pytest.approx([2.0]) and state.v.tolist() == pytest.approx([0.025])
    # step 2, n = 10: m = 0.6 * 2 + 0.4 * 10 = 5.2, v = 0.999 * 0.025 + 0.001 * 100 = 0.124975
    # m_hat = 5.2 / (1 - 0.36) = 8.125, v_hat = 0.124975 / (1 - 0.998001) = 62.5187...
    plan, state = sh.update(stats_of_norms(10.0), state)
    target = 8.125 / math.sqrt(0.124975 / 0.001999)
    assert float(plan.scale[0]) == pytest.approx(target / 10, rel=1e-9)
    assert state.count.tolist() == [2.0]


def test_zero_group_is_skipped():
    sh = GradientStabilizer()
    plan, state = sh.update(stats_of_norms(0.0, 3.0), sh.init(layout_of(1, 1)))
    assert plan.scale.tolist()[0] == 1.0 and state.count.tolist() == [0.0, 1.0]
    assert state.m.tolist()[0] == 0.0


def test_norm_bound_values():
    sh = GradientStabilizer()
    # B_1 = (a / sqrt(b)) * sqrt(b) / a = 1; B_inf = C_inf = 0.4 / sqrt(0.001 * (1 - 0.36 / 0.999))
    assert sh.norm_bound(1) == pytest.approx(1.0, rel=1e-12)
    c_inf = 0.4 / math.sqrt(0.001 * (1 - 0.36 / 0.999))
    assert c_inf == pytest.approx(15.82, abs=0.01)
    assert sh.norm_bound(100_000) == pytest.approx(c_inf, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(seq=st.lists(st.one_of(st.floats(1e-6, 10.0), st.sampled_from([1e3, 1e10, 1e20, 1e30])),
                    min_size=1, max_size=40),
       betas=st.sampled_from([(0.6, 0.999), (0.9, 0.999), (0.0, 0.99), (0.5, 0.9)]))
def test_shaped_norm_stays_under_the_bound_for_spikes_up_to_1e30(seq, betas):
    # fp32 gradients through GradientShaper: statistics are float64, so a 1e30 entry (1e60 squared)
    # stays finite and the bound holds up to fp32 rounding.
    sh = GradientStabilizer(*betas)
    d = Driver(sh, {"w": (3,)})
    direction = torch.tensor([0.6, 0.0, -0.8])
    for t, n in enumerate(seq, start=1):
        rec, out = d.step({"w": direction * n})
        shaped = float(out["w"].double().norm())
        assert rec is not None and math.isfinite(shaped)
        assert shaped <= sh.norm_bound(t) * (1 + 1e-5)
        cos = float(torch.dot(out["w"].double(), direction.double())) / shaped
        assert cos == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kw", [{"beta1": 1.0}, {"beta2": -0.1}, {"eps": 0.0}])
def test_rejects_bad_hparams(kw):
    with pytest.raises(ValueError):
        GradientStabilizer(**kw)
