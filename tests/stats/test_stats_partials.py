"""The CPU statistics pass: per-chunk partial sums added in float64, exact where fp32 cannot be.

Every test runs on both CPU paths (the ``kernel_path`` fixture): the sum kernel (float64 sums
of exact squares per chunk, stats/kernels.py) and the torch ops (``MEGATRON_SHAPING_KERNELS=0``:
fp32 partials, recomputed exactly where they may have over- or underflowed).

References are float64 sums of the stored values (exact to ~1e-16). Each property is shown to
have power: the plain single-pass fp32 reduction a broken variant would use misses the same
references (accuracy on a 1M-element slice, inf on spikes, 0 on tiny gradients), and the
float64 copy the old code made exceeds the memory bound.
"""
import pytest
import torch

from megatron_shaping.shapers import make_layout
from megatron_shaping.shapers.base import SUMABS, SUMSQ, UNIT_PARAM_SUMSQ, UNIT_SUMSQ
from megatron_shaping.stats.slices import ABS_BLOCK, CHUNK, WIDEN_BLOCK, GradSlice, SliceCache, SliceSet

ALL = frozenset({SUMSQ, SUMABS, UNIT_SUMSQ, UNIT_PARAM_SUMSQ})


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def kernel_path(request, monkeypatch):
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", "1" if request.param == "kernel" else "0")
    return request.param
TOL = 5e-6


def rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


def one_matrix(R, C, dtype, offset=0, cut=0, scale=1e-3, seed=0):
    """A slice [offset, R*C - cut) of an R x C matrix; returns (SliceSet, float64 dense grad, weights)."""
    gen = torch.Generator().manual_seed(seed)
    g = (torch.randn(R * C, generator=gen, dtype=torch.float64) * scale).to(dtype)
    w = torch.randn(R * C, generator=gen, dtype=torch.float64).to(dtype)
    end = R * C - cut
    layout = make_layout(["w"], [R * C], units_per_group=[R], unit_numel=[C] * R)
    ss = SliceSet([GradSlice(grad=g[offset:end], group=0, param=w[offset:end], offset=offset, row_len=C)], layout)
    gd = torch.zeros(R * C, dtype=torch.float64)
    wd = torch.zeros(R * C, dtype=torch.float64)
    gd[offset:end] = g[offset:end].double()
    wd[offset:end] = w[offset:end].double()
    return ss, gd, wd


def reference(gd, wd, R, C):
    return {SUMSQ: gd.square().sum().view(1), SUMABS: gd.abs().sum().view(1),
            UNIT_SUMSQ: gd.view(R, C).square().sum(1), UNIT_PARAM_SUMSQ: wd.view(R, C).square().sum(1)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("R,C,offset,cut", [(300, 512, 0, 0), (97, 4096, 1234, 77), (60, 4099, 5000, 3),
                                             (40, 11008, 11007, 11009), (3, 5, 2, 1)])
def test_statistics_equal_float64_sums(dtype, R, C, offset, cut):
    # row lengths: a divisor of CHUNK, a multiple (split rows), a prime (whole rows), 11008 = 43 * 256
    ss, gd, wd = one_matrix(R, C, dtype, offset, cut)
    st = ss.compute(ALL)
    for k, ref in reference(gd, wd, R, C).items():
        got = getattr(st, k)
        nz = ref > 0
        assert rel(got[nz], ref[nz]) <= TOL, (k, rel(got[nz], ref[nz]))
        assert torch.equal(got[~nz], ref[~nz]), k      # rows outside the slice: exactly 0


def test_control_one_fp32_pass_misses_the_tolerance():
    """Power of TOL: one fp32 reduction over a 1M-element slice (no partials) is off by more."""
    ss, gd, _ = one_matrix(1024, 1024, torch.float32, seed=3)
    x = ss.slices[0].grad
    single = float(torch.linalg.vector_norm(x)) ** 2
    assert rel(single, gd.square().sum()) > 2 * TOL
    assert rel(ss.compute(frozenset({SUMSQ})).sumsq, gd.square().sum()) <= TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", [1e30, 3e38, 1e-30, 1e-44])
def test_spikes_and_tiny_gradients_beyond_fp32_squares(dtype, value):
    """fp32 squares overflow above ~1.8e19 and underflow below ~1e-19: such chunks are
    recomputed exactly. The sums stay finite and exact up to the storage dtype's largest value
    and non-zero down to its smallest."""
    if dtype == torch.bfloat16 and value in (3e38, 1e-44):
        value = {3e38: 3.3e38, 1e-44: 1e-40}[value]
    R, C = 64, 3000
    ss, gd, wd = one_matrix(R, C, dtype, offset=100, cut=50, seed=1)
    g = ss.slices[0].grad
    with torch.no_grad():
        g[7] = value
        g[CHUNK * 5 + 3] = -value
        if value < 1:
            g[: 3 * C] = value                     # whole rows of tiny entries
        g[5 * C: 6 * C] = 0                        # a zero row (e.g. an embedding row no token hit)
    gd[100:R * C - 50] = g.double()
    st = ss.compute(ALL)
    ref = reference(gd, wd, R, C)
    for k in (SUMSQ, SUMABS, UNIT_SUMSQ):
        got, r = getattr(st, k), ref[k]
        assert torch.isfinite(got).all(), (k, got)
        nz = r > 0
        assert rel(got[nz], r[nz]) <= TOL, (k, rel(got[nz], r[nz]))
        assert torch.equal(got[~nz], r[~nz]), k
    # control: one fp32 pass overflows or underflows on the same slice
    if value > 1:
        assert float(torch.linalg.vector_norm(g.float())) ** 2 == float("inf")
    else:
        row1 = g[C - 100:2 * C - 100].float()          # matrix row 1: all tiny
        assert rel(float(torch.linalg.vector_norm(row1)) ** 2, ref[UNIT_SUMSQ][1]) > 0.5
        assert rel(st.unit_sumsq[1], ref[UNIT_SUMSQ][1]) <= TOL


@pytest.mark.parametrize("value", [1e150, -1e150, 1e-150])
def test_float64_gradients_keep_the_1e150_range(value):
    R, C = 8, 4000
    ss, gd, wd = one_matrix(R, C, torch.float64, seed=2)
    g = ss.slices[0].grad
    with torch.no_grad():
        if abs(value) > 1:
            g[12345] = value
        else:
            g.fill_(value)
    gd.copy_(g)
    st = ss.compute(ALL)
    ref = reference(gd, wd, R, C)
    assert torch.isfinite(st.sumsq).all() and float(st.sumsq) > 0
    for k in (SUMSQ, SUMABS, UNIT_SUMSQ):
        assert rel(getattr(st, k), ref[k]) <= 1e-12, k


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_gradients_stay_non_finite(bad, dtype):
    ss, gd, _ = one_matrix(16, 3000, dtype)
    with torch.no_grad():
        ss.slices[0].grad[4000] = bad
    st = ss.compute(ALL)
    for k in (SUMSQ, SUMABS):
        v = float(getattr(st, k))
        assert (v != v) if bad != bad else v == float("inf"), (k, v)
    assert not bool(torch.isfinite(st.unit_sumsq[1]))
    assert bool(torch.isfinite(st.unit_sumsq[0])) and bool(torch.isfinite(st.unit_sumsq[2:]).all())


def _peak_bytes(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    mem = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, b in mem:
        cur += b
        peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_slice_sized_buffer(dtype):
    """fp32: no buffer the size of the slice (the partials are 1/2048 of it, sums of |x| use a
    block of ABS_BLOCK elements); 16-bit: at most one fp32 block of WIDEN_BLOCK elements.
    Control: the float64 copy the old pass made."""
    n = 4 * WIDEN_BLOCK
    ss, _, _ = one_matrix(n // 1024, 1024, dtype)
    slice_bytes = n * ss.slices[0].grad.element_size()
    ss.compute(ALL)       # first call builds the parameter partial runs
    peak = _peak_bytes(lambda: ss.compute(ALL))
    bound = 4 * ABS_BLOCK + 0.05 * slice_bytes if dtype == torch.float32 else 4 * WIDEN_BLOCK + 0.05 * slice_bytes
    assert peak <= bound, (peak, slice_bytes)
    x = ss.slices[0].grad
    old = _peak_bytes(lambda: torch._foreach_norm([x], 2, dtype=torch.float64))
    assert old > 2 * bound, old


def test_slice_cache_builds_metadata_once_and_follows_changes():
    layout = make_layout(["a", "b"], [600, 40], units_per_group=[20, 1], unit_numel=[30] * 20 + [40])
    pa, pb = torch.nn.Parameter(torch.randn(20, 30)), torch.nn.Parameter(torch.randn(40))
    calls = []

    def describe(p, off):
        calls.append(off)
        return (0, True, 30, 0) if p is pa else (1, True, 0, 20)

    cache = SliceCache(layout, describe)
    grads = [torch.randn(600 - 45), torch.randn(40)]
    pieces = lambda gs, off=45: [(pa, gs[0], off, None), (pb, gs[1], 0, None)]
    first = cache.slice_set(pieces(grads)).compute(frozenset({SUMSQ, UNIT_SUMSQ}))
    again = cache.slice_set(pieces(grads)).compute(frozenset({SUMSQ, UNIT_SUMSQ}))
    assert cache.rebuilds == 1 and len(calls) == 2 and cache.storage_changes == 0
    assert torch.equal(first.sumsq, again.sumsq) and torch.equal(first.unit_sumsq, again.unit_sumsq)
    moved = [g.clone() for g in grads]        # new storage, same values: metadata kept
    cache.slice_set(pieces(moved))
    assert cache.rebuilds == 1 and cache.storage_changes == 1
    other = cache.slice_set(pieces([torch.randn(600 - 50), grads[1]], off=50))  # another partition
    assert cache.rebuilds == 2 and len(calls) == 4
    ref = SliceSet([GradSlice(other.slices[0].grad, 0, True, None, 50, 30, 0),
                    GradSlice(grads[1], 1, True, None, 0, 0, 20)], layout).compute(frozenset({SUMSQ, UNIT_SUMSQ}))
    assert torch.equal(other.compute(frozenset({SUMSQ, UNIT_SUMSQ})).unit_sumsq, ref.unit_sumsq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_joint_sumsq_sumabs_pass_equals_separate_passes(dtype):
    """SUMSQ and SUMABS together (entrywise_shrink's first pass) come from one pass over the
    data (slices._reduce_partials_sq_abs); they must equal, bit for bit, what the two separate
    passes give, and the float64 sums, across small tensors, long runs, a chunk whose squares
    overflow fp32 and chunks whose squares underflow it (the exact recomputations)."""
    gen = torch.Generator().manual_seed(7)
    sizes = [100, CHUNK, 3 * CHUNK + 17, ABS_BLOCK + 5 * CHUNK + 3, 40]
    grads = [(torch.randn(n, generator=gen, dtype=torch.float64) * 1e-3).to(dtype) for n in sizes]
    grads[2][CHUNK + 5] = 1e30                           # fp32 square overflows: exact pass
    grads[3][:CHUNK] = 0.0                               # a zero chunk: scaled exact pass
    grads[3][CHUNK:2 * CHUNK] = 1e-30                    # squares underflow fp32
    layout = make_layout([f"t{i}" for i in range(len(sizes) - 1)], [sum(sizes[:2])] + sizes[2:-1])
    groups = [0, 0, 1, 2, 3]
    ss = SliceSet([GradSlice(grad=g, group=k) for g, k in zip(grads, groups)], layout)
    joint = ss.compute(frozenset({SUMSQ, SUMABS}))
    sq = ss.compute(frozenset({SUMSQ})).sumsq
    ab = ss.compute(frozenset({SUMABS})).sumabs
    assert torch.equal(joint.sumsq, sq) and torch.equal(joint.sumabs, ab)
    ref_sq = torch.zeros(4, dtype=torch.float64)
    ref_ab = torch.zeros(4, dtype=torch.float64)
    for g, k in zip(grads, groups):
        ref_sq[k] += g.double().square().sum()
        ref_ab[k] += g.double().abs().sum()
    assert rel(joint.sumsq, ref_sq) < TOL and rel(joint.sumabs, ref_ab) < TOL


@pytest.mark.parametrize("n", [10, 3000])       # a small tensor (one multi-tensor call) and a big one
@pytest.mark.parametrize("value, want", [(1e20, 1e40), (1e-25, 3e-50)])
def test_fp32_beside_float64_keeps_the_exact_pass(n, value, want):
    """An fp32 gradient beside a float64 one (the sum kernel takes no float64 mix: the torch
    path on both fixtures): its fp32 partial overflows (1e20^2) or underflows (3 x 1e-50) and
    must still be recomputed exactly, although the float64 partials promote the concatenation."""
    from megatron_shaping import GradientShaper
    a = torch.nn.Parameter(torch.zeros(n))
    b = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    a.grad = torch.zeros(n)
    a.grad[:1 if value > 1 else 3] = value
    b.grad = torch.ones(5, dtype=torch.float64)
    rec = GradientShaper([("a", a), ("b", b)], "norm_clip", {"max_norm": 1e300}, granularity="tensor").apply_()
    assert rec is not None                              # not vetoed as non-finite
    a32 = float(torch.tensor(value, dtype=torch.float32))
    exact = a32 * a32 * (1 if value > 1 else 3)
    # (without the exact pass: the step vetoed, or a sum of 0)
    assert rel(rec.stats_before.sumsq[0], exact) <= TOL and rel(exact, want) < 1e-6
    assert rel(rec.stats_before.sumsq[1], 5.0) <= 1e-15
