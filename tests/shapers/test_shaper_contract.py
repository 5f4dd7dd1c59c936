"""One contract, every shaper: what the drivers and checkpoints rely on (optax's habit)."""
import functools
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_shaping.shapers import REGISTRY, Stats, build_shaper, chain
from megatron_shaping.shapers.adagc import AdaGC
from megatron_shaping.shapers.agc import AGC
from megatron_shaping.shapers.base import ALL_STATS, STAT_DTYPE, UNIT_PARAM_SUMSQ, UNIT_SUMSQ
from megatron_shaping.shapers.entrywise_shrink import EntrywiseShrink
from megatron_shaping.shapers.gradient_stabilizer import GradientStabilizer
from megatron_shaping.shapers.norm_clip import NormClip
from megatron_shaping.shapers.spamp import SPAMP
from megatron_shaping.shapers.value_clip import ValueClip
from megatron_shaping.shapers.zclip import ZClip
from megatron_shaping.stats.layout import ParamInfo, build_grouping
from megatron_shaping.stats.slices import SliceSet, slices_from_params
from megatron_shaping.torch_api import GradientShaper
from shaper_testlib import states_equal

# Factories: shapers bind layout facts at init, so every session gets a fresh instance. Every
# registered method at its defaults, then the cases below (params that make a method act within
# the few steps of these tests, other modes, chains) replace or add to them.
FACTORIES = {name: functools.partial(build_shaper, name) for name in REGISTRY}
FACTORIES.update({
    "gradient_stabilizer": GradientStabilizer,
    "spamp": SPAMP,
    "spamp_raw_current": lambda: SPAMP(mode="raw", threshold_from="current"),
    "norm_clip": lambda: NormClip(0.5),
    "value_clip": lambda: ValueClip(0.05),
    "agc": AGC,
    "agc_per_tensor": lambda: AGC(unitwise=False),
    "zclip": lambda: ZClip(warmup_steps=2, max_grad_norm=None),
    "zclip_defaults": ZClip,
    "adagc": lambda: AdaGC(warmup_steps=2),
    "entrywise_shrink": lambda: EntrywiseShrink(threshold=2.0, beta=0.9),
    "chain_agc_norm_clip": lambda: chain(AGC(), NormClip(0.5)),
    "chain_spamp_zclip_value_clip": lambda: chain(SPAMP(), ZClip(warmup_steps=2), ValueClip(0.05)),
})
NAMES = list(FACTORIES)


def factory(name):
    """A case of FACTORIES, or a registered method at its defaults (also one registered after
    this module was imported: tests/shapers/test_toy_shaper.py runs these tests on its toy)."""
    return FACTORIES[name] if name in FACTORIES else functools.partial(build_shaper, name)


class Tiny(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.embed = torch.nn.Parameter(torch.randn(5, 4, dtype=dtype))
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4, dtype=dtype) for _ in range(2)])
        self.norm = torch.nn.Parameter(torch.ones(4, dtype=dtype))


def make(name, dtype=torch.float32, granularity=None):
    torch.manual_seed(0)
    model = Tiny(dtype)
    return model, GradientShaper(model.named_parameters(), factory(name)(), granularity=granularity)


def set_grads(model, step, scale=1.0, zero=False):
    gen = torch.Generator().manual_seed(1000 + step)
    spike = 1e4 if step == 3 else 1.0
    for p in model.parameters():
        g = torch.zeros(p.shape) if zero else torch.randn(p.shape, generator=gen) * 0.1 * spike * scale
        p.grad = g.to(p.dtype)


def leaves(state):
    return [t for s in state for t in s]     # a session's state: the tuple of member states


def test_every_registered_shaper_is_covered_by_its_own_class():
    for name in REGISTRY:
        assert FACTORIES[name]().name == name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("granularity", [None, "tensor"])
def test_state_shape_and_dtype_are_stable(name, granularity):
    model, gs = make(name, granularity=granularity)
    init = [(t.shape, t.dtype) for t in leaves(gs.state)]
    assert all(dt == STAT_DTYPE for _, dt in init)
    for step in range(7):
        set_grads(model, step)
        assert gs.apply_() is not None
        now = leaves(gs.state)
        assert [(t.shape, t.dtype) for t in now] == init
        assert all(bool(torch.isfinite(t).all()) for t in now)
        assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_zero_gradients_give_no_nan(name):
    model, gs = make(name)
    for step in range(5):
        set_grads(model, step, zero=step in (0, 1, 4))
        rec = gs.apply_()
        assert rec is not None and bool(torch.isfinite(rec.factor).all())
        assert all(bool(torch.isfinite(t).all()) for t in leaves(gs.state))
        for p in model.parameters():
            assert bool(torch.isfinite(p.grad).all())
            if step in (0, 1, 4):
                assert not bool(p.grad.any())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_the_step(name, bad):
    model, gs = make(name)
    for step in range(3):
        set_grads(model, step)
        gs.apply_()
    before = [t.clone() for t in leaves(gs.state)]
    set_grads(model, 3)
    model.layers[0].weight.grad[1, 2] = bad
    grads = [p.grad.clone() for p in model.parameters()]
    assert gs.apply_() is None
    assert gs.session.skipped == 1 and gs.session.steps == 3
    assert all(torch.equal(a, b) for a, b in zip(before, leaves(gs.state)))
    for g, p in zip(grads, model.parameters()):
        assert torch.equal(g.nan_to_num(), p.grad.nan_to_num())


def _stats_for(model, grouping, needs):
    ss = SliceSet(slices_from_params(model.named_parameters(), grouping.group, with_param=True,
                                     unit_base=grouping.unit_base), grouping.layout)
    return ss.compute(frozenset(needs) | {"sumsq"})


@pytest.mark.parametrize("name", NAMES)
def test_update_leaves_a_non_finite_group_untouched(name):
    model, _ = make(name)
    grouping = build_grouping([ParamInfo(n, tuple(p.shape)) for n, p in model.named_parameters()], "tensor")
    layout = grouping.layout
    shaper = factory(name)()
    members = chain(shaper).shapers
    bad = grouping.group("layers.0.weight")
    unit_bad = layout.unit_group == bad
    for member in members:
        state = member.init(layout)
        for step in range(4):                      # some history, past the warmups above
            set_grads(model, step)
            _, state = member.update(_stats_for(model, grouping, ALL_STATS), state)
        set_grads(model, 4)
        clean = _stats_for(model, grouping, ALL_STATS)
        fields = {}
        for k in ALL_STATS:
            t = getattr(clean, k).clone()
            t[unit_bad if k in (UNIT_SUMSQ, UNIT_PARAM_SUMSQ) else bad] = float("nan")
            fields[k] = t
        if UNIT_PARAM_SUMSQ in fields:
            fields[UNIT_PARAM_SUMSQ] = clean.unit_param_sumsq   # the weights themselves are fine
        plan, new = member.update(Stats(**fields), state)
        for old_f, new_f in zip(state, new):
            if old_f.dim() >= 1 and old_f.shape[0] == layout.num_groups:
                assert torch.equal(old_f[bad], new_f[bad]), member
        assert bool(torch.isfinite(plan.scale).all())
        if plan.unit_scale is not None:
            assert bool(torch.isfinite(plan.unit_scale).all())
        good_counts = getattr(new, "count", None)
        if good_counts is not None and good_counts.shape[0] == layout.num_groups:
            others = torch.arange(layout.num_groups) != bad
            assert bool((good_counts[others] > state.count[others]).any()), "healthy groups still learn"


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trips(name):
    model_a, a = make(name)
    model_b, b = make(name)
    for step in range(4):
        set_grads(model_a, step)
        a.apply_()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    assert states_equal(a.state, b.state)
    assert b.session.steps == a.session.steps
    for step in range(4, 8):                      # identical futures
        set_grads(model_a, step)
        set_grads(model_b, step)
        a.apply_()
        b.apply_()
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            assert torch.equal(pa.grad, pb.grad)
    assert states_equal(a.state, b.state)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype, loss_scale", [(torch.bfloat16, 1.0), (torch.float16, 1024.0), (torch.float64, 1.0)])
def test_grads_keep_their_dtype(name, dtype, loss_scale):
    model, gs = make(name, dtype=dtype)
    for step in (0, 1, 2, 4, 5):      # step 3's spike x 1024 would overflow fp16 (a skip, tested above)
        set_grads(model, step, scale=loss_scale)
        assert gs.apply_(loss_scale) is not None
        for p in model.parameters():
            assert p.grad.dtype == dtype and bool(torch.isfinite(p.grad).all())


NORM_BASED = ["gradient_stabilizer", "norm_clip", "agc_per_tensor", "zclip", "zclip_defaults", "adagc"]


@pytest.mark.parametrize("name", NORM_BASED)
@settings(max_examples=15, deadline=None)
@given(scales=st.lists(st.sampled_from([0.0, 1e-3, 0.1, 1.0, 30.0, 1e6]), min_size=1, max_size=8))
def test_norm_based_shapers_keep_each_groups_direction(name, scales):
    model, gs = make(name, dtype=torch.float64)
    for step, k in enumerate(scales):
        set_grads(model, step, scale=k)
        before = [p.grad.clone() for p in model.parameters()]
        gs.apply_()
        for g0, p in zip(before, model.parameters()):
            n0 = float(g0.norm())
            if n0 == 0:
                assert not bool(p.grad.any())
                continue
            n1 = float(p.grad.norm())
            if n1 == 0:
                continue    # a factor of 0 is a non-negative scale (zclip after an all-zero warmup)
            cos = float(torch.dot(g0.flatten(), p.grad.flatten())) / (n0 * n1)
            assert cos == pytest.approx(1.0, abs=1e-12)
