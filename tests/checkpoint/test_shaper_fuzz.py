"""Fuzz every shaper with hostile gradient sequences (one process, GradientShaper): zeros,
denormals, 1e30 spikes, tiny values, NaN and inf, whole or in single entries, mixed across
layers. The state stays finite, a finite gradient stays finite, a non-finite one is skipped
with the state untouched, and a normal step afterwards still works (training continues).
The DeepSpeed-level fuzz is in test_deepspeed_checkpoints.py."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_shaping import GradientShaper
from megatron_shaping.checkpoint import state_is_finite

from .plans import SHAPERS

KINDS = ["normal", "zero", "denormal", "tiny", "huge", "neg_huge", "one_nan", "one_inf", "all_nan", "all_inf"]
SPECS = dict(SHAPERS)
SPECS["chain"] = {"type": "chain", "shapers": [{"type": "zclip", "params": {"warmup_steps": 2}},
                                               {"type": "spamp", "params": {}},
                                               {"type": "norm_clip", "params": {"max_norm": 1.0},
                                                "granularity": "global"}]}
SPECS["block_gradient_stabilizer"] = {"type": "gradient_stabilizer", "params": {}, "granularity": "block"}


def make_grad(kind, shape, gen):
    g = torch.randn(shape, generator=gen)
    if kind == "zero":
        return torch.zeros(shape)
    if kind == "denormal":
        return g * 1e-40          # fp32 subnormal (or flushed to zero)
    if kind == "tiny":
        return g * 1e-30
    if kind in ("huge", "neg_huge"):
        return g * (1e30 if kind == "huge" else -1e30)
    if kind in ("one_nan", "one_inf"):
        g.view(-1)[0] = float("nan") if kind == "one_nan" else float("inf")
    if kind == "all_nan":
        return torch.full(shape, float("nan"))
    if kind == "all_inf":
        return torch.full(shape, float("-inf"))
    return g


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def snapshot(gs):
    sd = gs.state_dict()
    return [{k: v.clone() for k, v in m["fields"].items()} for m in sd["members"]]


@pytest.mark.parametrize("name", list(SPECS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seq=st.lists(st.lists(st.sampled_from(KINDS), min_size=4, max_size=4), min_size=1, max_size=10),
       seed=st.integers(0, 2 ** 16))
def test_state_stays_finite_and_training_continues(name, seq, seed):
    spec = SPECS[name]
    m = model()
    params = list(m.named_parameters())
    gs = GradientShaper(params, spec, granularity=spec.get("granularity"),
                        block_pattern=r"^(\d+)\." if spec.get("granularity") == "block" else None)
    gen = torch.Generator().manual_seed(seed)
    skipped = 0
    for kinds in seq + [["normal"] * 4]:          # always end with a normal step
        for (n, p), kind in zip(params, kinds):
            p.grad = make_grad(kind, p.shape, gen)
        finite_in = all(bool(torch.isfinite(p.grad).all()) for _, p in params)
        before = snapshot(gs)
        grads_before = [p.grad.clone() for _, p in params]
        rec = gs.apply_()
        assert state_is_finite(gs.state_dict()), f"{name}: state not finite after {kinds}"
        if finite_in:
            assert rec is not None, f"{name}: a finite gradient was skipped ({kinds})"
            for _, p in params:
                assert torch.isfinite(p.grad).all(), f"{name}: finite {kinds} became non-finite"
            assert torch.isfinite(rec.factor).all()
        else:
            skipped += 1
            assert rec is None, f"{name}: a non-finite gradient was not skipped ({kinds})"
            for a, b in zip(before, snapshot(gs)):
                for k in a:
                    assert torch.equal(a[k], b[k]), f"{name}: skipped step changed state field {k}"
            for g0, (_, p) in zip(grads_before, params):
                assert torch.equal(torch.nan_to_num(g0), torch.nan_to_num(p.grad))
    assert gs.session.skipped == skipped and gs.session.steps == len(seq) + 1 - skipped
