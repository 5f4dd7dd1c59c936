"""Slice statistics against dense references: partial rows, replicas, loss scale, derived stats."""
import itertools

import pytest
import torch

from megatron_shaping.core import ShapingSession
from megatron_shaping.shapers import Plan, Stats, chain, derive_stats, make_layout
from megatron_shaping.shapers.agc import AGC
from megatron_shaping.shapers.base import STAT_DTYPE, SUMABS, SUMSQ, UNIT_PARAM_SUMSQ, UNIT_SUMSQ
from megatron_shaping.shapers.norm_clip import NormClip
from megatron_shaping.shapers.value_clip import ClampMap
from megatron_shaping.stats.layout import ParamInfo, build_grouping
from megatron_shaping.stats.slices import GradSlice, SliceSet, _row_sums, _scale_rows_, slices_from_params
from megatron_shaping.torch_api import GradientShaper

R, C = 4, 5
ALL = frozenset({SUMSQ, SUMABS, UNIT_SUMSQ, UNIT_PARAM_SUMSQ})


def dense():
    return torch.arange(1, R * C + 1, dtype=torch.float64).reshape(R, C)


@pytest.mark.parametrize("offset, n", [(o, n) for o in range(R * C) for n in range(1, R * C - o + 1)])
def test_row_sums_of_any_slice_equal_the_dense_rows(offset, n):
    flat = dense().flatten()
    got = _row_sums(flat[offset:offset + n], offset, C)
    first, last = offset // C, (offset + n - 1) // C
    ref = [sum(float(flat[j]) for j in range(offset, offset + n) if j // C == r) for r in range(first, last + 1)]
    assert got.tolist() == ref


@pytest.mark.parametrize("offset, n", [(o, n) for o in range(0, R * C, 3) for n in range(1, R * C - o + 1, 2)])
def test_row_scaling_of_any_slice_equals_dense_row_scaling(offset, n):
    factors = torch.tensor([2.0, 3.0, 5.0, 7.0], dtype=torch.float64)
    ref = (dense() * factors[:, None]).flatten()[offset:offset + n]
    g = dense().flatten()[offset:offset + n].clone()
    first, last = offset // C, (offset + n - 1) // C
    _scale_rows_(g, offset, C, factors[first:last + 1])
    assert torch.equal(g, ref)


def partitioned(bounds, grad, param, replica_of=None):
    """A [R, C] tensor cut into flat slices at ``bounds`` (as ZeRO partitions cut it), plus a replica."""
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out.append(GradSlice(grad=grad.view(-1)[a:b], group=0, param=param.view(-1)[a:b], offset=a, row_len=C,
                             unit_base=1))
    if replica_of is not None:
        out.append(GradSlice(grad=replica_of.view(-1), group=0, counted=False, param=param.view(-1), offset=0,
                             row_len=C, unit_base=1))
    return out


@pytest.mark.parametrize("bounds", [[0, 20], [0, 7, 20], [0, 3, 4, 13, 20], [0, 5, 10, 15, 20], [0, 1, 19, 20]])
def test_unit_statistics_and_unit_scaling_across_partitions(bounds):
    # layout: group 0 = this matrix (units 1..4) plus a vector (unit 0) that lives in group 1
    layout = make_layout(["m", "v"], [R * C, 3], units_per_group=[R, 1], unit_numel=[C] * R + [3])
    layout = layout._replace(unit_group=torch.tensor([1, 0, 0, 0, 0]))
    g, w = dense().float() / 10, dense().float().flip(0)
    replica = g.clone()
    vec = torch.tensor([1.0, -2.0, 2.0])
    slices = partitioned(bounds, g, w, replica) + [GradSlice(grad=vec, group=1, param=vec.clone(), unit_base=0)]
    ss = SliceSet(slices, layout)
    st = ss.compute(ALL)
    g64, w64 = g.double(), w.double()
    assert torch.allclose(st.unit_sumsq, torch.cat([torch.tensor([9.0], dtype=STAT_DTYPE), g64.square().sum(1)]))
    assert torch.allclose(st.unit_param_sumsq, torch.cat([torch.tensor([9.0], dtype=STAT_DTYPE), w64.square().sum(1)]))
    assert torch.allclose(st.sumsq, torch.stack([g64.square().sum(), torch.tensor(9.0, dtype=STAT_DTYPE)]))
    assert torch.allclose(st.sumabs, torch.stack([g64.abs().sum(), torch.tensor(5.0, dtype=STAT_DTYPE)]))
    # unit factors: unit 0 (vector) x 0.5, rows x (2, 3, 5, 7); group factors (10, 1)
    unit = torch.tensor([0.5, 2.0, 3.0, 5.0, 7.0], dtype=STAT_DTYPE)
    ref = g64 * 10 * unit[1:, None]
    ss.apply(torch.tensor([10.0, 1.0], dtype=STAT_DTYPE), unit, None)
    assert torch.allclose(g.double(), ref, rtol=1e-6)
    assert torch.allclose(replica.double(), ref, rtol=1e-6)         # replicas are shaped, not counted
    assert torch.allclose(vec, torch.tensor([0.5, -1.0, 1.0]))


def test_loss_scale_is_divided_out():
    torch.manual_seed(0)
    grads = [torch.randn(3, 4), torch.randn(4)]
    params = [torch.randn(3, 4), torch.randn(4)]
    grouping = build_grouping([ParamInfo("a", (3, 4)), ParamInfo("b", (4,))])

    def sliceset(scale):
        named = []
        for n, g, w in zip("ab", grads, params):
            p = torch.nn.Parameter(w.clone())
            p.grad = g.clone() * scale
            named.append((n, p))
        ss = SliceSet(slices_from_params(named, grouping.group, True, grouping.unit_base), grouping.layout)
        ss.loss_scale = scale
        return ss, named

    ref = sliceset(1.0)[0].compute(ALL)
    ss, named = sliceset(4096.0)
    got = ss.compute(ALL)
    for k in ALL:                     # the statistics asked for (mapped_sumsq: none asked)
        assert torch.allclose(getattr(got, k), getattr(ref, k), rtol=1e-12), k
    # the elementwise map sees true values: clamp at 0.5 of g, stored back times 4096
    ss.apply(torch.ones(2, dtype=STAT_DTYPE), None, ClampMap(clip=torch.tensor([0.5, 0.5], dtype=STAT_DTYPE)))
    for (_, p), g in zip(named, grads):
        assert torch.allclose(p.grad, g.clamp(-0.5, 0.5) * 4096)


def test_derive_stats_equals_recomputation():
    torch.manual_seed(1)
    layout = make_layout(["a", "b"], [6, 3], units_per_group=[2, 1], unit_numel=[3, 3, 3])
    g = [torch.randn(2, 3, dtype=STAT_DTYPE), torch.randn(3, dtype=STAT_DTYPE)]

    def stats(gs):
        return Stats(torch.stack([x.square().sum() for x in gs]), torch.stack([x.abs().sum() for x in gs]),
                     torch.cat([gs[0].square().sum(1), gs[1].square().sum().view(1)]), torch.ones(3, dtype=STAT_DTYPE))

    s = torch.tensor([0.5, -3.0], dtype=STAT_DTYPE)
    u = torch.tensor([2.0, 0.25, 4.0], dtype=STAT_DTYPE)
    d = derive_stats(stats(g), Plan(s), layout)
    exact = stats([g[0] * s[0], g[1] * s[1]])
    for k in ("sumsq", "sumabs", "unit_sumsq"):
        assert torch.allclose(getattr(d, k), getattr(exact, k)), k
    d = derive_stats(stats(g), Plan(s, unit_scale=u), layout)
    exact = stats([g[0] * s[0] * u[:2, None], g[1] * s[1] * u[2]])
    assert d.sumabs is None                              # not derivable through a unit scale
    assert torch.allclose(d.sumsq, exact.sumsq) and torch.allclose(d.unit_sumsq, exact.unit_sumsq)


@pytest.mark.parametrize("granularity", [None, "tensor"])
def test_chain_agc_norm_clip_equals_sequential_shaping(granularity):
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    copy = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    copy.load_state_dict(model.state_dict())
    both = GradientShaper(model.named_parameters(), chain(AGC(0.05), NormClip(0.05)), granularity=granularity)
    first = GradientShaper(copy.named_parameters(), AGC(0.05), granularity=granularity)
    second = GradientShaper(copy.named_parameters(), NormClip(0.05), granularity=granularity)
    for _ in range(3):
        for p, q in zip(model.parameters(), copy.parameters()):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        rec = both.apply_()
        first.apply_()
        second.apply_()
        for p, q in zip(model.parameters(), copy.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=0)
        # the chain derived its final statistics without a pass: they match a fresh computation
        fresh = sum(float(p.grad.double().square().sum()) for p in model.parameters())
        assert float(rec.stats_after.sumsq.sum()) == pytest.approx(fresh, rel=1e-6)


def test_chain_of_pure_scales_runs_one_statistics_pass():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    for p in model.parameters():
        p.grad = torch.randn(p.shape)
    infos = [ParamInfo(n, tuple(p.shape)) for n, p in model.named_parameters()]
    session = ShapingSession(chain(AGC(0.05), NormClip(0.05)), infos, granularity="tensor")
    g = session.grouping
    ss = SliceSet(slices_from_params(model.named_parameters(), g.group, True, g.unit_base), session.layout,
                  reduce=lambda t: None)
    assert session.step(ss) is not None
    assert ss.collectives == 1
