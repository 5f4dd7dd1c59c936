import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_shaping.shapers.spamp import SPAMP, default_schedule
from shaper_testlib import Driver, layout_of, stats_of_norms

BASE = dict(beta=0.5, alpha_min=0.5)


def two_steps(second, **kw):
    """Step 1 g = (3, 4) (n = 5, initialises tau = 5), step 2 ``second``; returns step 2's output."""
    d = Driver(SPAMP(**{**BASE, **kw}), {"w": (2,)}, dtype=torch.float64)
    _, out1 = d.step({"w": torch.tensor([3.0, 4.0], dtype=torch.float64)})
    assert torch.equal(out1["w"], torch.tensor([3.0, 4.0], dtype=torch.float64))  # r = 1: alpha 1, tau = n
    return d.step({"w": torch.tensor(second, dtype=torch.float64)})[1]["w"], d


def test_default_schedule_values():
    r = torch.tensor([0.5, 1.0, 2.0, 4.0, 1e12], dtype=torch.float64)
    # 1 - 0.3 * max(0, 1 - 1/r): 1, 1, 1 - 0.15, 1 - 0.225, -> 0.7
    assert default_schedule(r, 0.7).tolist() == pytest.approx([1.0, 1.0, 0.85, 0.775, 0.7], rel=1e-12)


def test_hand_values_rms_previous():
    # step 2: g = (6, 8), n = 10; tau_prev = 5 -> r = 2, alpha = 1 - 0.5 * (1 - 1/2) = 0.75
    # rms = sqrt(100 / 2) = sqrt(50); g_i -> sqrt(50)^0.25 |g_i|^0.75 = 50^0.125 * (6^0.75, 8^0.75)
    # then projection onto the tau = 5 ball (the shaped norm 9.96 > 5)
    out, d = two_steps([6.0, 8.0])
    a, b = 50 ** 0.125 * 6 ** 0.75, 50 ** 0.125 * 8 ** 0.75
    s = 5 / math.hypot(a, b)
    assert out.tolist() == pytest.approx([a * s, b * s], rel=1e-12)
    # tau is the EMA of the raw norm: 0.5 * 5 + 0.5 * 10
    assert d.gs.state[0].tau.tolist() == [7.5]


def test_hand_values_rms_current():
    # "current": tau = 7.5 first, r = 10 / 7.5 = 4/3, alpha = 1 - 0.5 * (1 - 3/4) = 0.875, project onto 7.5
    out, _ = two_steps([6.0, 8.0], threshold_from="current")
    al = 0.875
    a, b = 50 ** ((1 - al) / 2) * 6 ** al, 50 ** ((1 - al) / 2) * 8 ** al
    s = min(1.0, 7.5 / math.hypot(a, b))
    assert out.tolist() == pytest.approx([a * s, b * s], rel=1e-12)


def test_hand_values_raw():
    # raw: (6^0.75, 8^0.75) = (3.834, 4.757), norm 6.11 > 5 -> projected onto 5
    out, _ = two_steps([6.0, 8.0], mode="raw")
    a, b = 6 ** 0.75, 8 ** 0.75
    assert out.tolist() == pytest.approx([5 * a / math.hypot(a, b), 5 * b / math.hypot(a, b)], rel=1e-12)


def test_pure_scale_plans_when_alpha_is_one():
    sh = SPAMP(**BASE)
    state = sh.init(layout_of(2))
    _, state = sh.update(stats_of_norms(5.0), state)
    # n = 2.5 < tau: alpha 1, scale min(1, 5 / 2.5) = 1, no map and no second pass
    plan, _ = sh.update(stats_of_norms(2.5), state)
    plan = plan.resolve()           # the shortcut is decided on the device (skip_map)
    assert plan.is_pure_scale and plan.scale.tolist() == [1.0]
    # a schedule that never bends: the projection alone, as a pure scale 5 / 10
    flat = SPAMP(**BASE, schedule=lambda r, amin: torch.ones_like(r))
    st = flat.init(layout_of(2))
    _, st = flat.update(stats_of_norms(5.0), st)
    plan, _ = flat.update(stats_of_norms(10.0), st)
    plan = plan.resolve()
    assert plan.is_pure_scale and plan.scale.tolist() == pytest.approx([0.5], rel=1e-12)


def test_spike_bounded_by_previous_tau():
    out, _ = two_steps([6e20, 8e20])        # a 2e20 x spike: shaped norm <= tau_prev = 5
    assert float(out.norm()) == pytest.approx(5.0, rel=1e-9)
    out, _ = two_steps([6e20, 8e20], threshold_from="current")  # tau_t ~ 0.5 * 1e21: the spike leaks
    assert float(out.norm()) > 1e20


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from([1e-6, 1e-2, 1.0, 1e4]),
       spike=st.sampled_from([1.0, 3.0, 1e3]))
def test_rms_mode_is_scale_equivariant_and_never_grows_the_norm(seed, k, spike):
    gen = torch.Generator().manual_seed(seed)
    g1 = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    g2 = g1 * spike + torch.randn(4, 5, generator=gen, dtype=torch.float64)
    outs = []
    for c in (1.0, k):
        d = Driver(SPAMP(), {"w": (4, 5)}, dtype=torch.float64)
        d.step({"w": g1 * c})
        outs.append(d.step({"w": g2 * c})[1]["w"])
    assert torch.allclose(outs[1], outs[0] * k, rtol=1e-9, atol=0)
    assert float(outs[0].norm()) <= float(g2.norm()) * (1 + 1e-12)
    assert torch.equal(torch.sign(outs[0]), torch.sign(g2))


@pytest.mark.parametrize("kw, name", [({"beta": 1.0}, "beta"), ({"alpha_min": 0.0}, "alpha_min"),
                                      ({"alpha_min": 1.5}, "alpha_min"), ({"mode": "pow"}, "mode"),
                                      ({"threshold_from": "next"}, "threshold_from"), ({"eps": -1}, "eps"),
                                      ({"schedule": 3}, "schedule")])
def test_rejects_bad_hparams(kw, name):
    with pytest.raises(ValueError, match=name):
        SPAMP(**kw)
