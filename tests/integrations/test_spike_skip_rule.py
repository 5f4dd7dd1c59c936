"""The spike rule (megatron_shaping/spike_skip.py) against hand-computed numbers, one process.

OLMo-core's SkipStepOptimizer is the reference for the defaults and the test:
``x - mean(window) > z * std(window)`` (unbiased std), active once ``max(20, window // 2)``
values including the current one exist; every value enters the window, skipped or not.
"""
import math
import statistics
from types import SimpleNamespace

import pytest
import torch

from megatron_shaping.spike_skip import (GRAD_NORM_SPIKE, LOSS_NONFINITE, LOSS_SPIKE, MAX_GRAD_NORM, NO_LOSS,
                                         NONFINITE, SpikeSkip, default_min_history, reasons)
from megatron_shaping.integrations.deepspeed.config import get_gradient_shaping_config


def rule(**kw):
    cfg = dict(grad_norm_z=6.0, loss_z=None, window=128, min_history=None, max_grad_norm=None)
    cfg.update(kw)
    return SpikeSkip(SimpleNamespace(**cfg))


def t(x):
    return torch.tensor(float(x), dtype=torch.float64)


def feed(r, norms, losses=None):
    codes = []
    for i, n in enumerate(norms):
        loss = None if losses is None or losses[i] is None else t(losses[i])
        code = int(r.decide(t(n), loss)) | (0 if math.isfinite(n) else NONFINITE)
        r.commit(code)
        codes.append(code)
    return codes


def test_defaults_are_olmo_cores():
    c = get_gradient_shaping_config({"gradient_shaping": {"type": "spamp", "skip": {}}}).skip
    assert (c.grad_norm_z, c.loss_z, c.window, c.min_history, c.max_grad_norm) == (6.0, None, 128, None, None)
    r = SpikeSkip(c)
    # OLMo-core: no skip while len(_losses) < max(20, 128 // 2) = 64, the list holding the current value
    assert r.min_history == 63 == default_min_history(128)
    assert default_min_history(30) == 19 and default_min_history(8) == 8


def test_threshold_hand_computed_and_one_sided():
    hist = [1.0, 1.2, 0.8, 1.1, 0.9]
    mean, std = statistics.mean(hist), statistics.stdev(hist)       # unbiased, as torch.std_mean
    thr = mean + 3.0 * std
    r = rule(grad_norm_z=3.0, window=8, min_history=5)
    assert feed(r, hist) == [0] * 5
    probe = rule(grad_norm_z=3.0, window=8, min_history=5)
    feed(probe, hist)
    assert int(probe.decide(t(thr * 1.001))) == GRAD_NORM_SPIKE
    assert float(probe.last["grad_norm_threshold"]) == pytest.approx(thr, rel=1e-12)
    assert int(probe.decide(t(thr * 0.999))) == 0
    assert int(probe.decide(t(mean - 100 * std))) == 0          # a drop is no spike (one-sided)


def test_min_history_and_window_contents():
    r = rule(grad_norm_z=3.0, window=4, min_history=3)
    # 50 comes with only 2 earlier values: not judged; it enters the window, so 40 right after
    # is judged against [1, 1.2, 50] (threshold 17.4 + 3 x 28.2 = 102): no spike either
    assert feed(r, [1.0, 1.2, 50.0, 40.0]) == [0, 0, 0, 0]
    w = [1.0, 1.2, 50.0]
    assert 40.0 < statistics.mean(w) + 3 * statistics.stdev(w)
    # four more values push 50 and 40 out: [0.9, 1.1, 1.0, 1.0]; now 40 is a spike
    assert feed(r, [0.9, 1.1, 1.0, 1.0]) == [0] * 4
    assert r.grad_norms.values().tolist() == [0.9, 1.1, 1.0, 1.0]
    assert feed(r, [40.0]) == [GRAD_NORM_SPIKE] and r.skips == 1
    assert r.grad_norms.values().tolist() == [1.1, 1.0, 1.0, 40.0]     # the skipped value is in


def test_spike_enters_window_so_a_level_shift_stops_skipping():
    r = rule(grad_norm_z=3.0, window=6, min_history=4)
    codes = feed(r, [1.0, 1.1, 0.9, 1.0, 1.05] + [10.0] * 8)
    skipped = [i for i, c in enumerate(codes) if c]
    assert skipped and skipped[0] == 5 and len(skipped) < 8     # not skipped for ever
    assert r.skips == len(skipped)
    # the second 10 is judged against [1.1, 0.9, 1.0, 1.05, 10, ...]: hand computation
    w = [1.0, 1.1, 0.9, 1.0, 1.05, 10.0][-6:]
    assert (10.0 - statistics.mean(w) > 3 * statistics.stdev(w)) == bool(codes[6])


def test_max_grad_norm_from_the_first_step_and_nonfinite():
    r = rule(grad_norm_z=None, max_grad_norm=5.0, window=8)
    assert r.grad_norms is None
    codes = feed(r, [1.0, 6.0, 4.9, float("inf"), float("nan")])
    assert codes == [0, MAX_GRAD_NORM, 0, NONFINITE, NONFINITE]
    assert reasons(codes[1]) == ("max_grad_norm",) and reasons(codes[3]) == ("nonfinite",)
    assert r.skips == 1


def test_nonfinite_values_never_enter_the_window():
    r = rule(grad_norm_z=3.0, window=8, min_history=2)
    feed(r, [1.0, float("inf"), 1.2, float("nan"), 1.1])
    assert r.grad_norms.values().tolist() == [1.0, 1.2, 1.1] and r.skips == 0


def test_loss_rule_with_nan_and_missing_loss():
    r = rule(grad_norm_z=None, loss_z=3.0, window=8, min_history=3)
    codes = feed(r, [1.0] * 6, [2.0, 2.1, 1.9, None, 50.0, float("nan")])
    assert codes[:3] == [0, 0, 0]
    assert codes[3] == NO_LOSS                                  # information only, not a skip
    assert codes[4] == LOSS_SPIKE
    assert codes[5] == LOSS_SPIKE | LOSS_NONFINITE             # NaN loss skips, as OLMo-core
    assert r.losses.values().tolist() == [2.0, 2.1, 1.9, 50.0]   # no None, no NaN
    assert r.skips == 2
    # has_loss on the device (the DeepSpeed path): False gives NO_LOSS and no loss bits
    code = int(r.decide(t(1.0), t(1e9), has_loss=torch.tensor(False)))
    assert code == NO_LOSS


def test_state_round_trip_resize_and_errors():
    r = rule(grad_norm_z=3.0, loss_z=3.0, window=4, min_history=2)
    feed(r, [1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 1.0, 1.0, 9.0])
    sd = r.state_dict()
    assert sd["grad_norms"].tolist() == [2.0, 3.0, 4.0, 5.0]
    same = rule(grad_norm_z=3.0, loss_z=3.0, window=4, min_history=2)
    same.load_state_dict(sd)
    assert torch.equal(same.grad_norms.buf, r.grad_norms.buf) and same.skips == r.skips
    assert int(same.decide(t(30.0))) == int(r.decide(t(30.0)))
    small = rule(grad_norm_z=3.0, window=2, min_history=2)
    small.load_state_dict(sd)                                  # keeps the last 2; no loss window here
    assert small.grad_norms.values().tolist() == [4.0, 5.0]
    fresh = rule(grad_norm_z=3.0, window=4, min_history=2)
    fresh.load_state_dict(None)                                # an older checkpoint: empty
    assert len(fresh.grad_norms) == 0
    with pytest.raises(ValueError, match="ckpt.pt.*version"):
        fresh.load_state_dict({"version": 99}, "ckpt.pt")
    with pytest.raises(ValueError, match="grad_norms"):
        fresh.load_state_dict({**sd, "grad_norms": [1.0]}, "ckpt.pt")
