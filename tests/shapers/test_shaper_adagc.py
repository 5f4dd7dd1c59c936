import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_shaping.shapers.adagc import AdaGC
from shaper_testlib import Driver, layout_of, stats_of_norms, torch_clipped

E = 1e-6  # eps


def test_hand_values_through_warmup_and_after():
    sh = AdaGC(lambda_rel=1.5, beta=0.5, warmup_steps=2, warmup_max_norm=1.0, eps=E)
    state = sh.init(layout_of(2, 2))
    # step 1 (warmup): n = (3, 4), N = 5 -> h = 1 / (5 + 1e-6) for both; gamma = h * n
    plan, state = sh.update(stats_of_norms(3.0, 4.0), state)
    h = 1 / (5 + E)
    assert plan.scale.tolist() == pytest.approx([h, h], rel=1e-12)
    assert state.gamma.tolist() == pytest.approx([3 * h, 4 * h], rel=1e-12)
    # step 2 (warmup): n = (0.3, 0.4), N = 0.5 -> h = min(1, 1 / 0.500001) = 1; gamma = min(gamma, n) = n
    plan, state = sh.update(stats_of_norms(0.3, 0.4), state)
    assert plan.scale.tolist() == [1.0, 1.0]
    assert state.gamma.tolist() == pytest.approx([0.3, 0.4], rel=1e-12)
    # step 3 (per tensor): n = (0.3, 2.0), thresholds c = 1.5 * gamma = (0.45, 0.6)
    #   n1 = 0.3 <= 0.45: h1 = 1, gamma1 = 0.5 * 0.3 + 0.5 * 0.3 = 0.3
    #   n2 = 2.0 >  0.6:  h2 = 0.6 / (2 + 1e-6), and the EMA takes the threshold (official code):
    #                     gamma2 = 0.5 * 0.4 + 0.5 * 0.6 = 0.5   (not 0.5 * 0.4 + 0.5 * h2 * 2)
    plan, state = sh.update(stats_of_norms(0.3, 2.0), state)
    h2 = 0.6 / (2 + E)
    assert plan.scale.tolist() == pytest.approx([1.0, h2], rel=1e-12)
    assert state.gamma.tolist() == pytest.approx([0.3, 0.5], rel=1e-12)
    assert state.count.tolist() == [3.0, 3.0]


@pytest.mark.parametrize("warmup_steps", [0, 100])
def test_steady_tiny_norm_is_never_scaled(warmup_steps):
    # Issue 10: with h = min(1, lambda * gamma / (n + eps)) on every step, a steady tensor with
    # n = 1e-6 < eps / (lambda - 1) was shrunk on every step (factor 0.52 after one step, 0.004
    # after 1000) and its gamma decayed to 0. The official rule only clips when n > lambda * gamma.
    sh = AdaGC(warmup_steps=warmup_steps)
    state = sh.init(layout_of(1, 1))
    for _ in range(1000):
        plan, state = sh.update(stats_of_norms(1e-6, 0.5), state)
        assert plan.scale.tolist() == [1.0, 1.0]
    assert state.gamma.tolist() == pytest.approx([1e-6, 0.5], rel=1e-12)
    assert state.count.tolist() == [1000.0, 1000.0]


def test_old_rule_would_fail_the_tiny_norm_case():
    # Power of the test above: the flawed rule (h on every step, EMA of h * n) decays the factor.
    lam, beta, n, gamma = 1.04, 0.99, 1e-6, 1e-6
    for _ in range(1000):
        h = min(1.0, lam * gamma / (n + E))
        gamma = beta * gamma + (1 - beta) * h * n
    assert h < 0.01 and gamma < 0.01 * n


def test_clipping_step_feeds_the_threshold_into_the_ema():
    # After warmup: gamma = 1, n = 10 > 1.04: h = 1.04 / (10 + eps), gamma <- 0.99 + 0.01 * 1.04.
    sh = AdaGC(warmup_steps=1, warmup_max_norm=100.0)
    state = sh.init(layout_of(1))
    _, state = sh.update(stats_of_norms(1.0), state)
    plan, state = sh.update(stats_of_norms(10.0), state)
    assert plan.scale.tolist() == pytest.approx([1.04 / (10 + E)], rel=1e-12)
    assert state.gamma.tolist() == pytest.approx([0.99 + 0.01 * 1.04], rel=1e-12)
    # exactly at the threshold: not clipped (strict >), and the EMA takes n itself
    plan, state2 = sh.update(stats_of_norms(1.04 * float(state.gamma[0])), state)
    assert plan.scale.tolist() == [1.0]


def test_first_step_without_warmup_uses_the_own_norm_as_gamma_even_below_one():
    # Official: state = n on the first AdaGC step, then the clip test against lambda * n. With
    # lambda_rel < 1 that clips at once: h = lambda * n / (n + eps), gamma = beta n + (1 - beta) lambda n.
    sh = AdaGC(lambda_rel=0.5, beta=0.9, warmup_steps=0)
    state = sh.init(layout_of(1))
    plan, state = sh.update(stats_of_norms(4.0), state)
    assert plan.scale.tolist() == pytest.approx([2.0 / (4 + E)], rel=1e-12)
    assert state.gamma.tolist() == pytest.approx([0.9 * 4 + 0.1 * 2.0], rel=1e-12)


def test_warmup_equals_torch_global_clipping():
    torch.manual_seed(0)
    d = Driver(AdaGC(warmup_steps=5, warmup_max_norm=0.5), {"a": (4, 3), "b": (3,)})
    for _ in range(5):
        grads = {"a": torch.randn(4, 3), "b": torch.randn(3) * 3}
        ref = torch_clipped(grads, 0.5)
        _, out = d.step(grads)
        for r, g in zip(ref, out.values()):
            assert torch.allclose(g, r, rtol=1e-6)


def test_no_warmup_starts_from_the_first_norm_and_zero_grads_do_not_trap():
    sh = AdaGC(lambda_rel=1.0, beta=0.5, warmup_steps=0)
    state = sh.init(layout_of(1))
    # first step: h = 1, gamma = 2
    plan, state = sh.update(stats_of_norms(2.0), state)
    assert plan.scale.tolist() == [1.0] and state.gamma.tolist() == [2.0]
    # a zero gradient: no NaN, gamma and count untouched
    plan, state2 = sh.update(stats_of_norms(0.0), state)
    assert plan.scale.tolist() == [1.0] and state2.gamma.tolist() == [2.0] and state2.count.tolist() == [1.0]
    # then n = 8: h = 2 / (8 + 1e-6)
    plan, _ = sh.update(stats_of_norms(8.0), state2)
    assert plan.scale.tolist() == pytest.approx([2 / (8 + 1e-6)], rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(norms=st.lists(st.floats(1e-3, 1e6), min_size=3, max_size=30))
def test_clipped_norm_bounded_by_lambda_gamma(norms):
    # after warmup, ||h g|| <= lambda_rel * gamma_{t-1}: a spike never passes through
    sh = AdaGC(warmup_steps=2)
    state = sh.init(layout_of(1))
    for t, n in enumerate(norms):
        prev = float(state.gamma[0])
        plan, state = sh.update(stats_of_norms(n), state)
        if t >= 2:
            assert n * float(plan.scale[0]) <= 1.04 * prev * (1 + 1e-12)
        assert 0 < float(plan.scale[0]) <= 1


@pytest.mark.parametrize("kw, name", [({"lambda_rel": 0}, "lambda_rel"), ({"beta": 1.0}, "beta"),
                                      ({"warmup_steps": -1}, "warmup_steps"),
                                      ({"warmup_max_norm": -1}, "warmup_max_norm"), ({"eps": 0}, "eps")])
def test_rejects_bad_hparams(kw, name):
    with pytest.raises(ValueError, match=name):
        AdaGC(**kw)
