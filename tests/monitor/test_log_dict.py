"""``engine.gradient_shaping.log_dict()``: the figures a trainer's own logger merges (HF
TrainerCallback, Megatron-DeepSpeed's training_log), checked against hand-computed norms.

The method reads only the session and a few counters of :class:`DeepSpeedShaping`, so it runs
here on a one-process :class:`GradientShaper` session; the real engine wiring (skips on every
rank, counters across a checkpoint) is covered by tests/integrations/test_spike_skip.py.
"""
import math
from types import SimpleNamespace

import pytest
import torch

from megatron_shaping import GradientShaper
from megatron_shaping.integrations.deepspeed.engine import DeepSpeedShaping

KEYS = {"shaping/grad_norm_before", "shaping/grad_norm_after", "shaping/shaped_fraction", "shaping/step_skipped",
        "shaping/skipped_steps", "shaping/nonfinite_skips", "shaping/spike_skips", "shaping/loss_scale"}


def stand_in():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    gs = GradientShaper([("a", a), ("b", b)], "norm_clip", {"max_norm": 1.0}, granularity="tensor")
    sh = SimpleNamespace(session=gs.session, last_skipped=False, last_norm_before=None, spike_skips=0,
                         last_loss_scale=1.0)
    return gs, (a, b), sh


def step(gs, params, sh, grads):
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    rec = gs.apply_()
    sh.last_skipped = rec is None
    return DeepSpeedShaping.log_dict(sh)


def test_plain_floats_hand_computed():
    gs, params, sh = stand_in()
    d = DeepSpeedShaping.log_dict(sh)
    assert set(d) == KEYS and all(type(v) is float for v in d.values())
    assert math.isnan(d["shaping/grad_norm_before"]) and d["shaping/skipped_steps"] == 0.0

    # a: norm 5 -> clipped to 1; b: norm 0.625 -> untouched (values exact in fp32)
    d = step(gs, params, sh, [[3.0, 4.0], [0.375, 0.5, 0.0]])
    assert set(d) == KEYS and all(type(v) is float for v in d.values())
    assert d["shaping/grad_norm_before"] == pytest.approx(math.sqrt(25 + 0.390625), rel=1e-12)
    assert d["shaping/grad_norm_after"] == pytest.approx(math.sqrt(1 + 0.390625), rel=1e-6)   # clip eps 1e-6
    assert d["shaping/shaped_fraction"] == 0.5
    assert d["shaping/step_skipped"] == 0.0 and d["shaping/skipped_steps"] == 0.0
    # power: the after-norm is not the before-norm
    assert d["shaping/grad_norm_before"] - d["shaping/grad_norm_after"] > 3.0


def test_skipped_step_counts_and_nan_per_step_values():
    gs, params, sh = stand_in()
    step(gs, params, sh, [[3.0, 4.0], [0.375, 0.5, 0.0]])
    d = step(gs, params, sh, [[float("nan"), 1.0], [0.0, 0.0, 1.0]])
    assert d["shaping/step_skipped"] == 1.0
    assert d["shaping/skipped_steps"] == 1.0 and d["shaping/nonfinite_skips"] == 1.0 and d["shaping/spike_skips"] == 0.0
    assert math.isnan(d["shaping/grad_norm_after"]) and math.isnan(d["shaping/shaped_fraction"])
    sh.spike_skips, sh.last_norm_before = 1, torch.tensor(7.0, dtype=torch.float64)
    gs.session.skipped += 1                     # what a spike skip does to the counters
    d = DeepSpeedShaping.log_dict(sh)
    assert d["shaping/grad_norm_before"] == 7.0
    assert (d["shaping/skipped_steps"], d["shaping/nonfinite_skips"], d["shaping/spike_skips"]) == (2.0, 1.0, 1.0)
    d = step(gs, params, sh, [[0.0, 0.1], [0.0, 0.0, 0.0]])
    assert d["shaping/step_skipped"] == 0.0 and d["shaping/grad_norm_after"] == pytest.approx(0.1)
    assert d["shaping/skipped_steps"] == 2.0 and d["shaping/shaped_fraction"] == 0.0
