"""AGC's statistics pass and application, fused, against the separate computations they replace.

``SliceSet.compute`` reduces the gradient's and the parameters' row partials together
(``_reduce_unit_pair``: one exact-pass check, one ``index_add_`` into the packed vector) and
``SliceSet._scale_units`` scales all fp32/fp64 row slices by one multi-tensor call. The
references here are the unfused forms, built from the same package's building blocks one call
each: ``_reduce_partials`` per statistic with the group sums from the unit sums, and
``_scale_rows_`` per slice. They must agree bit for bit (``torch.equal``), on slices cut across
rows, rows longer than a chunk (several partials per unit), zero, tiny and overflowing rows
(the exact recomputation), 16-bit gradients with fp32 or 16-bit parameters, float64 gradients
with fp32 parameters (partials of two dtypes), a loss scale and a replica; with the CPU sum
kernel (float64 partials, one call for both) and on the torch path (``MEGATRON_SHAPING_KERNELS=0``).
Controls: parameter partials added without the +U offset, the torch path's fp32 partials left
unchecked, or the kernel's sums of squares squared again (taken for norms), are caught.
"""
import pytest
import torch

from megatron_shaping.shapers import make_layout
from megatron_shaping.shapers.agc import agc_factor
from megatron_shaping.shapers.base import STAT_DTYPE, SUMSQ, UNIT_PARAM_SUMSQ, UNIT_SUMSQ
from megatron_shaping.stats import slices as S
from megatron_shaping.stats.slices import GradSlice, SliceSet, _reduce_partials, _scale_rows_

NEEDS = frozenset({SUMSQ, UNIT_SUMSQ, UNIT_PARAM_SUMSQ})
#: (rows, row length) of the three matrices; 5000 > CHUNK: several partials per row
SHAPES = [(37, 24), (6, 5000), (300, 8)]
BOUNDS = [0.0, 0.31, 0.77, 1.0]      # two ranks' worth of cuts through each matrix, off row boundaries


def build(gdt, pdt, seed=0, replica=True):
    gen = torch.Generator().manual_seed(seed)
    names = [f"m{i}" for i in range(len(SHAPES))] + ["bias"]
    rows = [r for r, _ in SHAPES] + [1]
    numel = [r * c for r, c in SHAPES] + [9]
    layout = make_layout(names, numel, units_per_group=rows,
                         unit_numel=[c for r, c in SHAPES for _ in range(r)] + [9])
    slices, base = [], 0
    for gi, (r, c) in enumerate(SHAPES):
        g = torch.randn(r * c, generator=gen, dtype=torch.float64) * 0.01
        g[:c] = 0.0                                    # a zero row: the exact (scaled) pass
        g[c + 3:c + 40] *= 1e-24                       # tiny entries
        g[2 * c + 1] = 3e22                            # squares overflow fp32: the float64 pass
        w = torch.randn(r * c, generator=gen, dtype=torch.float64)
        w[3 * c:4 * c] = 0.0                           # a zero parameter row (eps floor)
        g, w = g.to(gdt), w.to(pdt)
        cuts = [int(b * r * c) for b in BOUNDS]
        for a, b in zip(cuts[:-1], cuts[1:]):
            slices.append(GradSlice(g[a:b], gi, True, w[a:b], a, c, base))
        if replica and gi == 0:
            slices.append(GradSlice(g.clone(), gi, False, w, 0, c, base))
        base += r
    bias_g = (torch.randn(9, generator=gen, dtype=torch.float64) * 0.1).to(gdt)
    slices.append(GradSlice(bias_g, len(SHAPES), True, torch.randn(9, generator=gen).to(pdt), 0, 0, base))
    return layout, slices


def unfused_stats(ss: SliceSet, ls: float):
    """The statistics as one _reduce_partials call per statistic computes them (single process)."""
    meta, counted = ss.meta, ss._counted
    params = [s.param for s in ss._counted_slices]
    unit = _reduce_partials(counted, meta.unit_parts, 2)
    param = _reduce_partials(params, meta.param_parts(params), 2)
    sumsq = torch.zeros(ss.layout.num_groups, dtype=STAT_DTYPE).index_add_(0, ss.layout.unit_group, unit)
    return sumsq / (ls * ls), unit / (ls * ls), param


DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float32), (torch.float64, torch.float64), (torch.float64, torch.float32)]


@pytest.mark.parametrize("kernels", ["1", "0"])
@pytest.mark.parametrize("gdt, pdt", DTYPES)
@pytest.mark.parametrize("ls", [1.0, 256.0])
def test_fused_unit_statistics_equal_the_separate_reductions(gdt, pdt, ls, kernels, monkeypatch):
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", kernels)
    layout, slices = build(gdt, pdt)
    ss = SliceSet(slices, layout)
    ss.loss_scale = ls
    st = ss.compute(NEEDS)
    ref = unfused_stats(ss, ls)
    for got, want in zip((st.sumsq, st.unit_sumsq, st.unit_param_sumsq), ref):
        assert got.dtype == want.dtype and torch.equal(got, want)
    # the overflowing row stayed finite and only the zero rows are 0 (fp16 itself stores 3e22 as
    # inf and the tiny entries as 0)
    if gdt != torch.float16:
        assert torch.isfinite(st.unit_sumsq).all()
        assert int((st.unit_sumsq == 0).sum()) == len(SHAPES)


def test_controls_are_caught(monkeypatch):
    layout, slices = build(torch.float32, torch.float32)
    ref = unfused_stats(SliceSet(slices, layout), 1.0)
    # parameter partials into the gradient's units (no +U offset)
    ss = SliceSet(slices, layout)
    ss.meta.param_parts([s.param for s in ss._counted_slices])
    ss.meta.unit_pair_index = torch.cat([ss.meta.unit_parts.index, ss.meta.param_unit_parts.index])
    st = ss.compute(NEEDS)
    assert not torch.equal(st.unit_sumsq, ref[1])
    # the kernel's float64 sums of squares taken for norms and squared again
    sums = S.kernels.sums
    if S._kernel_ok([s.grad for s in slices]):
        monkeypatch.setattr(S.kernels, "sums", lambda *a, **k: tuple(v if v is None else v.square()
                                                                       for v in sums(*a, **k)))
        st = SliceSet(slices, layout).compute(NEEDS)
        assert not torch.equal(st.unit_sumsq, ref[1])
        monkeypatch.setattr(S.kernels, "sums", sums)
    # torch path: fp32 partials taken as they are (no exact recomputation of zero/tiny/overflowing chunks)
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", "0")
    ref = unfused_stats(SliceSet(slices, layout), 1.0)
    monkeypatch.setattr(S, "_exact_where_needed", lambda vals, *a, **k: vals.to(STAT_DTYPE))
    st = SliceSet(slices, layout).compute(NEEDS)
    assert not torch.equal(st.unit_sumsq, ref[1])


@pytest.mark.parametrize("gdt", [torch.float32, torch.bfloat16, torch.float64])
def test_merged_row_scaling_equals_per_slice_scaling(gdt):
    layout, slices = build(gdt, torch.float32)
    U = layout.unit_group.numel()
    unit_scale = torch.rand(U, dtype=STAT_DTYPE, generator=torch.Generator().manual_seed(3)) * 1.5
    ref = [s.grad.clone() for s in slices]
    ss = SliceSet(slices, layout)
    for i in ss.meta.row_units:
        first, row_len, n = ss.meta.unit_geometry[i]
        _scale_rows_(ref[i], slices[i].offset, row_len, unit_scale[first:first + n])
    for i in ss.meta.whole_units:
        ref[i] = (ref[i].to(torch.float32) * unit_scale[ss.meta.unit_geometry[i][0]].float()).to(gdt) \
            if gdt != torch.float64 else ref[i] * unit_scale[ss.meta.unit_geometry[i][0]]
    ss._scale_units(unit_scale)
    for s, want in zip(slices, ref):
        assert torch.equal(s.grad, want)
    # control: the factors of another unit are caught
    other = [s.grad.clone() for s in slices]
    SliceSet([GradSlice(g, s.group, s.counted, s.param, s.offset, s.row_len, s.unit_base) for g, s in
              zip(other, slices)], layout)._scale_units(unit_scale.roll(1))
    assert not all(torch.equal(a, b) for a, b in zip(other, ref))


def test_agc_factor_equals_the_rule_on_edge_values():
    """agc_factor against the rule written out (trigger, quotient, 1 where not clipping or G not finite)."""
    vals = [0.0, 1e-320, 1e-8, 1e-3, 0.01, 1.0, 7.0, 1e300, float("inf"), float("nan")]
    g = torch.tensor([a for a in vals for _ in vals], dtype=STAT_DTYPE)
    w = torch.tensor([b for _ in vals for b in vals], dtype=STAT_DTYPE)
    for clipping, eps in [(0.01, 1e-3), (float("inf"), 1e-3), (0.5, 1e300)]:
        got = agc_factor(g, w, clipping, eps)
        for gi, wi, f in zip(g.tolist(), w.tolist(), got.tolist()):
            max_norm = clipping * max(wi, eps) if wi == wi else float("nan")
            clip = gi > max_norm and gi != float("inf")
            assert f == (max_norm / gi if clip else 1.0), (gi, wi, clipping, eps, f)
