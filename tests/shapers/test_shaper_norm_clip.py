import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_shaping.shapers.norm_clip import NormClip
from shaper_testlib import Driver, layout_of, shape_once, stats_of_norms, torch_clipped, total_norm

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
vectors = st.lists(finite, min_size=1, max_size=12)


def test_hand_values_global():
    # g = (3, 4) -> ||g|| = 5 > 1: coef = 1 / (5 + 1e-6); g' = (3, 4) / 5.000001
    out = shape_once(NormClip(1.0), {"w": torch.tensor([3.0, 4.0])})
    assert torch.allclose(out["w"], torch.tensor([3 / 5.000001, 4 / 5.000001]), rtol=1e-7, atol=0)
    # ||g|| = 0.5 < 1: coef = 1 / 0.500001 > 1, unchanged
    out = shape_once(NormClip(1.0), {"w": torch.tensor([0.3, 0.4])})
    assert torch.equal(out["w"], torch.tensor([0.3, 0.4]))


def test_hand_values_per_tensor_uses_torch_epsilon():
    # tensor granularity: a = (3, 4), ||a|| = 5 -> a / 5.000001;
    # b = (0.6, 0.8), ||b|| = 1 exactly: coef = 1 / 1.000001 < 1, so torch semantics scale it too.
    out = shape_once(NormClip(1.0), {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.6, 0.8])},
                     granularity="tensor")
    assert torch.allclose(out["a"], torch.tensor([3.0, 4.0]) / 5.000001, rtol=1e-7)
    assert torch.allclose(out["b"], torch.tensor([0.6, 0.8]) / 1.000001, rtol=1e-7)


def test_update_plan_directly():
    sh = NormClip(2.0)
    state = sh.init(layout_of(2, 2, 2))
    plan, state = sh.update(stats_of_norms(4.0, 1.0, 0.0), state)
    # 2 / (4 + 1e-6); 2 / (1 + 1e-6) > 1 -> 1; zero norm -> 2 / 1e-6 > 1 -> 1 (no NaN)
    assert torch.allclose(plan.scale, torch.tensor([2 / 4.000001, 1.0, 1.0], dtype=torch.float64), rtol=1e-12)
    assert plan.is_pure_scale and plan.unit_scale is None
    assert state.count.tolist() == [1.0, 1.0, 1.0]


@settings(max_examples=60, deadline=None)
@given(a=vectors, b=vectors, max_norm=st.floats(1e-3, 1e3))
def test_matches_torch_clip_grad_norm(a, b, max_norm):
    grads = {"a": torch.tensor(a), "b": torch.tensor(b).reshape(-1, 1)}
    ref = torch_clipped(grads, max_norm)
    out = shape_once(NormClip(max_norm), grads)
    for r, g in zip(ref, out.values()):
        assert torch.allclose(g, r, rtol=1e-6, atol=1e-30)


def test_matches_torch_over_a_sequence_with_spikes():
    torch.manual_seed(0)
    d = Driver(NormClip(1.0), {"w": (5, 3), "b": (5,)})
    for t in range(30):
        k = 1e4 if t % 7 == 3 else 1.0
        grads = {"w": torch.randn(5, 3) * k, "b": torch.randn(5) * 0.1}
        ref = torch_clipped(grads, 1.0)
        _, out = d.step(grads)
        for r, g in zip(ref, out.values()):
            assert torch.allclose(g, r, rtol=1e-6, atol=0)


@settings(max_examples=60, deadline=None)
@given(a=vectors, max_norm=st.floats(1e-3, 1e3))
def test_keeps_direction_and_is_idempotent(a, max_norm):
    g = torch.tensor(a, dtype=torch.float64)
    once = shape_once(NormClip(max_norm), {"w": g}, dtype=torch.float64)["w"]
    twice = shape_once(NormClip(max_norm), {"w": once}, dtype=torch.float64)["w"]
    if g.norm() > 0:
        cos = torch.dot(once, g) / (once.norm() * g.norm())
        assert cos > 1 - 1e-12
    assert once.norm() <= max_norm * (1 + 1e-9) or torch.equal(once, g)
    # Exactly idempotent up to torch's 1e-6: the second coefficient is max_norm / (||g'|| + 1e-6)
    # with ||g'|| <= max_norm, i.e. at least 1 - 1e-6 / max_norm.
    assert torch.allclose(twice, once, rtol=1.01e-6 / max_norm, atol=0)


@settings(max_examples=40, deadline=None)
@given(a=vectors)
def test_infinite_max_norm_changes_nothing(a):
    g = torch.tensor(a)
    assert torch.equal(shape_once(NormClip(math.inf), {"w": g})["w"], g)


def test_result_norm_is_the_limit():
    # ||g||^2 = 10 * 3^2 + 16 * 2^2 = 154; after: 0.5 * sqrt(154) / (sqrt(154) + 1e-6)
    out = shape_once(NormClip(0.5), {"a": torch.full((10,), 3.0), "b": torch.full((4, 4), -2.0)})
    assert total_norm(out) == pytest.approx(0.5 * math.sqrt(154) / (math.sqrt(154) + 1e-6), rel=1e-6)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1", True, None])
def test_rejects_bad_max_norm(bad):
    with pytest.raises(ValueError, match="max_norm"):
        NormClip(bad)
