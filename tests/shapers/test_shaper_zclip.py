import copy
import math

import pytest
import torch

from megatron_shaping.shapers.zclip import ZClip
from shaper_testlib import Driver, layout_of, stats_of_norms

zclip_pkg = pytest.importorskip("zclip")


def run_norms(shaper, norms):
    """Scales the shaper gives a one-group gradient with these norms, and the final state."""
    state = shaper.init(layout_of(1))
    scales = []
    for n in norms:
        plan, state = shaper.update(stats_of_norms(n), state)
        scales.append(float(plan.scale[0]))
    return scales, state


BASE = dict(alpha=0.5, z_thresh=2.0, max_grad_norm=None, eps=1e-6, warmup_steps=3)


def test_hand_values_zscore_adaptive():
    # warmup norms 1, 2, 3 -> mean 2, var ((1-2)^2 + 0 + (3-2)^2) / 3 = 2/3, no clipping (max_grad_norm None)
    # step 4: n = 2 -> z = 0, no spike; mean = .5*2 + .5*2 = 2, var = .5*(2/3) + .5*0 = 1/3
    # step 5: n = 10, std = sqrt(1/3), z = 8 / (std + 1e-6) > 2 -> eta = z / 2,
    #   T = 2 + 2 * std / eta = 2 + 4 * std * (std + 1e-6) / 8;  scale = T / (10 + 1e-6)
    #   EMA with T: mean = 1 + T / 2, var = (1/3) / 2 + (T - mean)^2 / 2
    scales, state = run_norms(ZClip(**BASE), [1, 2, 3, 2, 10])
    std = math.sqrt(1 / 3)
    T = 2 + 4 * std * (std + 1e-6) / 8
    assert scales[:4] == [1.0, 1.0, 1.0, 1.0]
    assert scales[4] == pytest.approx(T / (10 + 1e-6), rel=1e-12)
    mean = 1 + T / 2
    assert float(state.mean[0]) == pytest.approx(mean, rel=1e-12)
    assert float(state.var[0]) == pytest.approx((1 / 3) / 2 + (T - mean) ** 2 / 2, rel=1e-12)
    assert float(state.count[0]) == 5


def test_hand_values_mean_option_percentile_and_skip():
    # clip_option "mean": T = mean = 2 at step 5
    scales, _ = run_norms(ZClip(**BASE, clip_option="mean"), [1, 2, 3, 2, 10])
    assert scales[4] == pytest.approx(2 / (10 + 1e-6), rel=1e-12)
    # percentile: T = mean + 2 std = 2 + 2 sqrt(1/3); 10 > T
    scales, state = run_norms(ZClip(**BASE, mode="percentile"), [1, 2, 3, 2, 10])
    assert scales[4] == pytest.approx((2 + 2 * math.sqrt(1 / 3)) / (10 + 1e-6), rel=1e-12)
    # skip_update_on_spike: the spike leaves mean 2 and var 1/3
    _, state = run_norms(ZClip(**BASE, skip_update_on_spike=True), [1, 2, 3, 2, 10])
    assert float(state.mean[0]) == 2.0 and float(state.var[0]) == pytest.approx(1 / 3, rel=1e-15)


def test_hand_values_max_grad_norm():
    # warmup: plain clip_grad_norm_ to 1.5: n = 3 -> 1.5 / (3 + 1e-6); n = 1 -> unchanged
    # after warmup (mean 2, var 2/3): n = 2 is no spike but the cap 1.5 < 2 -> 1.5 / (2 + 1e-6)
    scales, _ = run_norms(ZClip(**{**BASE, "max_grad_norm": 1.5}), [1, 2, 3, 2])
    assert scales == pytest.approx([1.0, 1.5 / 2.000001, 1.5 / 3.000001, 1.5 / 2.000001], rel=1e-12)


def test_warmup_buffer_is_fixed_size_and_cleared():
    sh = ZClip(**BASE)
    state = sh.init(layout_of(1, 1))
    assert state.buffer.shape == (2, 3)
    plan, state = sh.update(stats_of_norms(1.0, 4.0), state)
    assert state.buffer.tolist() == [[1.0, 0.0, 0.0], [4.0, 0.0, 0.0]]
    for _ in range(2):
        plan, state = sh.update(stats_of_norms(1.0, 4.0), state)
    assert state.buffer.abs().sum() == 0 and state.mean.tolist() == [1.0, 4.0] and state.var.tolist() == [0.0, 0.0]


def test_warmup_steps_zero_behaves_like_the_package():
    # the package buffers the first norm even with warmup_steps=0: mean = n_1 after one step
    _, state = run_norms(ZClip(**{**BASE, "warmup_steps": 0}), [3.0])
    assert float(state.mean[0]) == 3.0 and float(state.count[0]) == 1


#: step -> spike factor; one mild spike inside the default 25-step warmup
SPIKES = {12: 3.0, 31: 8.0, 32: 200.0, 40: 3.0, 45: 4.0, 50: 20.0, 58: 1000.0, 63: 2.5}


def make_sequence(steps=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = []
    for t in range(steps):
        k = 0.3 * (1 + 0.2 * math.sin(t / 5))
        k *= SPIKES.get(t, 1.0)
        seq.append({"0.weight": torch.randn(6, 5, generator=g) * k, "0.bias": torch.randn(6, generator=g) * k,
                    "1.weight": torch.randn(2, 6, generator=g) * k, "1.bias": torch.randn(2, generator=g) * k})
    return seq


CONFIGS = [
    dict(),                                                       # package defaults (cap 1.0)
    dict(max_grad_norm=None),
    dict(max_grad_norm=None, clip_option="mean"),
    dict(max_grad_norm=None, mode="percentile", z_thresh=1.5),
    dict(max_grad_norm=None, clip_factor=0.7, skip_update_on_spike=True),
    dict(max_grad_norm=2.0, warmup_steps=10, alpha=0.9),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_matches_the_zclip_package(cfg):
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Linear(6, 2))
    ref_model = copy.deepcopy(model)
    ref = zclip_pkg.ZClip(**cfg)
    ours = Driver(ZClip(**cfg), {n: p.shape for n, p in model.named_parameters()})
    clipped = 0
    for t, grads in enumerate(make_sequence()):
        for n, p in ref_model.named_parameters():
            p.grad = grads[n].clone()
        before = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
        ref.step(ref_model)
        ref_after = math.sqrt(sum(float(p.grad.double().square().sum()) for p in ref_model.parameters()))
        _, out = ours.step(grads)
        our_after = math.sqrt(sum(float(g.double().square().sum()) for g in out.values()))
        assert our_after / before == pytest.approx(ref_after / before, rel=1e-6, abs=1e-9), f"step {t}"
        for n, p in ref_model.named_parameters():
            assert torch.allclose(out[n], p.grad, rtol=1e-5, atol=1e-12), f"step {t} {n}"
        clipped += ref_after < before * (1 - 1e-9)
    if ref.initialized:
        st = ours.gs.state[0]
        assert float(st.mean[0]) == pytest.approx(ref.mean, rel=1e-6)
        assert float(st.var[0]) == pytest.approx(ref.var, rel=1e-5)
    assert clipped >= 3     # the sequence does exercise clipping


@pytest.mark.parametrize("kw, name", [({"mode": "z"}, "mode"), ({"clip_option": "max"}, "clip_option"),
                                      ({"alpha": 1.5}, "alpha"), ({"warmup_steps": 2.5}, "warmup_steps"),
                                      ({"max_grad_norm": 0}, "max_grad_norm"), ({"z_thresh": -1}, "z_thresh"),
                                      ({"skip_update_on_spike": "yes"}, "skip_update_on_spike"),
                                      ({"eps": 0}, "eps"), ({"clip_factor": 0}, "clip_factor")])
def test_rejects_bad_hparams(kw, name):
    with pytest.raises(ValueError, match=name):
        ZClip(**kw)


def test_defaults_are_the_packages():
    import inspect
    pkg = {k: v.default for k, v in inspect.signature(zclip_pkg.ZClip.__init__).parameters.items() if k != "self"}
    ours = ZClip()
    assert list(pkg) == list(ZClip.hparams)
    assert {k: getattr(ours, k) for k in ZClip.hparams} == pkg
