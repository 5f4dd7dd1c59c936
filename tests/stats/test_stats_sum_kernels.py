"""The CPU sum kernel of the statistics pass (stats/kernels.py ``sums``, _maps.c ``ms_sums``).

For every chunk of a run table it writes sum x^2 and/or sum |x| in float64, reading fp32, bf16
or fp16 storage directly. References are independent: ``math.fsum`` (correctly rounded) or
torch's float64 sums of the widened values. Properties: ~1e-16 relative error (the torch path's
fp32 partials are ~1e-7 off on the same data), 16-bit storage read exactly, the same bits from
every instruction-set clone and wherever a chunk lies (offset, alignment, alone or in a run),
no over- or underflow from 1e38 down to subnormals (no exact recomputation needed), inf/NaN
propagate, one kernel call per statistics pass, and the torch path when disabled or for
float64 data. Controls, built from the same source with ``-DMS_SUMS_CONTROL``: fp32 lane
accumulation fails the precision bound; lanes aligned to the address (the head peeled into one
lane) fail position independence.
"""
import math

import pytest
import torch

from megatron_shaping.shapers import make_layout
from megatron_shaping.shapers.base import SUMABS, SUMSQ, UNIT_PARAM_SUMSQ, UNIT_SUMSQ
from megatron_shaping.stats import kernels
from megatron_shaping.stats import slices as S
from megatron_shaping.stats.slices import CHUNK, GradSlice, SliceSet
from tests.kernel_checks import control_builds, per_isa

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: the torch path is the only one")

#: relative error bound of a kernel partial: 16 lanes of <= 128 terms each and a 4-level tree
#: add at most ~132 roundings of 2^-53 in the worst case; random data stays far below it
BOUND = 2e-15


def grid(n: int, length: int = CHUNK, t: int = 0):
    """Runs of chunks of ``length`` over n elements of tensor t (the _Partials grid)."""
    return [(t, a, k, ln) for a, k, ln in S._chunk_runs(0, n, length)]


def partials(x: torch.Tensor, length: int = CHUNK, sq=True, ab=False, lib=None):
    return kernels.sums([x], kernels.RunTable(grid(x.numel(), length), 1), sq, ab, lib=lib)


def chunks(x: torch.Tensor, length: int = CHUNK):
    v = x.double().tolist()
    return [v[a:a + length] for a in range(0, len(v), length)]


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


def test_partials_equal_float64_sums_far_below_fp32_error(monkeypatch):
    """1e6 random fp32 values on the chunk grid: every partial within ~1e-16 of the correctly
    rounded sum; the torch path's fp32 partials (and its group sum) are orders of magnitude off."""
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)) * 1e-3
    sq, ab = partials(x, sq=True, ab=True)
    ref_sq = [math.fsum(v * v for v in c) for c in chunks(x)]
    ref_ab = [math.fsum(abs(v) for v in c) for c in chunks(x)]
    assert len(ref_sq) == sq.numel() == 489
    err = rel(sq, ref_sq)
    assert err <= BOUND and rel(ab, ref_ab) <= BOUND, (err, rel(ab, ref_ab))
    fp32 = torch.cat([torch.linalg.vector_norm(x[:488 * CHUNK].view(488, CHUNK), dim=1),
                      torch.linalg.vector_norm(x[488 * CHUNK:]).view(1)]).double().square()
    assert rel(fp32, ref_sq) > 1000 * BOUND, rel(fp32, ref_sq)
    # the group sum through the statistics pass, kernel vs torch path, against fsum of all squares
    total = math.fsum(v * v for c in chunks(x) for v in c)
    layout = make_layout(["w"], [x.numel()])
    kern = SliceSet([GradSlice(grad=x, group=0)], layout).compute(frozenset({SUMSQ})).sumsq
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", "0")
    torch_path = SliceSet([GradSlice(grad=x, group=0)], layout).compute(frozenset({SUMSQ})).sumsq
    assert rel(kern, total) <= BOUND and rel(torch_path, total) > 100 * rel(kern, total)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_storage_is_read_exactly(dtype):
    x = (torch.randn(50_000, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    sq, ab = partials(x, sq=True, ab=True)
    assert rel(sq, [math.fsum(v * v for v in c) for c in chunks(x)]) <= BOUND
    assert rel(ab, [math.fsum(abs(v) for v in c) for c in chunks(x)]) <= BOUND
    # control: a widening off by one ulp in about half the elements (lowest stored bit cleared)
    wrong = (x.view(torch.int16) & ~1).view(dtype)
    assert rel(partials(wrong)[0], [math.fsum(v * v for v in c) for c in chunks(x)]) > 1e-5


LENGTHS = [1, 7, 15, 16, 17, 33, 1000, CHUNK, 4099]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_isa_clones_give_the_same_bits(dtype):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(40_000, generator=gen) * torch.logspace(-3, 3, 40_000)).to(dtype)
    runs, a = [], 3
    for ln in LENGTHS:
        runs.append((0, a, 2, ln))
        a += 2 * ln + 5
    table = kernels.RunTable(runs, 1)
    got = per_isa(lambda: kernels.sums([x], table, True, True))
    first = got[min(got)]
    for sq, ab in got.values():
        assert torch.equal(sq, first[0]) and torch.equal(ab, first[1])
    if len(got) == 1:
        pytest.skip("one instruction set on this CPU: nothing to compare")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_clamp_sums_are_the_sums_of_the_clamped_tensor(dtype):
    """``clamp_sums`` (value_clip's premap sums, read before the clamp): its plain sums are
    ``sums``' and its clamped sums are ``sums`` of the tensor the clamp map kernel leaves, bit
    for bit, on every instruction-set clone, with a bound per run (inf: the values themselves).
    The clamped entries are many and the bound (1e-3) is no 16-bit number, so sums of values
    clamped but not rounded to the storage dtype would differ."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(30_000, generator=gen) * 2e-3).to(dtype)
    runs = [(0, 0, 3, CHUNK), (0, 3 * CHUNK + 7, 2, 1000), (0, 20_000, 1, 9_999)]
    bounds = [1e-3, math.inf, 1e-3]
    table = kernels.RunTable(runs, 1)
    clamped = x.clone()
    for (_, a, k, ln), b in zip(runs, bounds):
        if b != math.inf:
            assert kernels.run("clamp", [clamped[a:a + k * ln]], [[b]])
    for sq, cl, plain, of_clamped in per_isa(lambda: kernels.clamp_sums([x], table, bounds) + (
            kernels.sums([x], table)[0], kernels.sums([clamped], table)[0])).values():
        assert torch.equal(sq, plain) and torch.equal(cl, of_clamped) and not torch.equal(cl, sq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [CHUNK, 1000, 37])
def test_a_chunk_gives_the_same_bits_wherever_it_lies(dtype, length):
    """The same values at element offsets 0..17 of a larger tensor (every alignment), alone or
    as the k-th chunk of a run: one result."""
    gen = torch.Generator().manual_seed(3)
    c = (torch.randn(length, generator=gen) * torch.logspace(-4, 4, length)).to(dtype)
    seen = set()
    for off in range(18):
        big = torch.randn(off + 3 * length + 5, generator=gen).to(dtype)
        big[off + length:off + 2 * length] = c        # the middle chunk of a run of three
        one = kernels.sums([big], kernels.RunTable([(0, off + length, 1, length)], 1), True, True)
        run = kernels.sums([big], kernels.RunTable([(0, off, 3, length)], 1), True, True)
        assert float(run[0][1]) == float(one[0][0]) and float(run[1][1]) == float(one[1][0])
        seen.add((float(one[0][0]), float(one[1][0])))
    assert len(seen) == 1, seen


@pytest.mark.parametrize("dtype, big, tiny", [(torch.float32, 3.4e38, 1.4e-45), (torch.bfloat16, 3.3e38, 1e-40),
                                              (torch.float16, 65504.0, 6e-8)])
def test_no_overflow_or_underflow_and_no_exact_pass(dtype, big, tiny, monkeypatch):
    x = torch.full((3 * CHUNK,), big, dtype=dtype)
    x[CHUNK:] = tiny
    x[2 * CHUNK:2 * CHUNK + 5] = 0
    assert x[CHUNK] != 0 and torch.isfinite(x).all()       # tiny is a (subnormal) value of the dtype
    sq, ab = partials(x, sq=True, ab=True)
    assert rel(sq, [math.fsum(v * v for v in c) for c in chunks(x)]) <= BOUND
    assert rel(ab, [math.fsum(abs(v) for v in c) for c in chunks(x)]) <= BOUND
    assert torch.isfinite(sq).all() and bool((sq > 0).all())
    # control: fp32 squares overflow / underflow on the same chunks
    f = x.float().view(3, CHUNK)
    if dtype != torch.float16:
        assert torch.isinf(torch.linalg.vector_norm(f, dim=1)[0] ** 2) or torch.linalg.vector_norm(f[0]).isinf()
    # the statistics pass needs no exact recomputation on this data (the torch path would)
    monkeypatch.setattr(S, "_exact_partials", lambda *a, **k: pytest.fail("exact pass on the kernel path"))
    layout = make_layout(["w"], [x.numel()])
    st = SliceSet([GradSlice(grad=x, group=0)], layout).compute(frozenset({SUMSQ, SUMABS}))
    assert rel(st.sumsq, math.fsum(v * v for c in chunks(x) for v in c)) <= BOUND


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_inf_and_nan_propagate(dtype, bad):
    x = torch.randn(3 * CHUNK).to(dtype)
    x[CHUNK + 17] = bad
    sq, ab = partials(x, sq=True, ab=True)
    for v in (sq, ab):
        assert torch.isfinite(v[0]) and torch.isfinite(v[2])
        assert (math.isnan(float(v[1])) if bad != bad else float(v[1]) == math.inf), v


def _counting(monkeypatch):
    calls = []
    real = kernels.sums

    def counted(*a, **k):
        calls.append(a[1].count)
        return real(*a, **k)
    monkeypatch.setattr(kernels, "sums", counted)
    return calls


def test_one_kernel_call_per_statistics_pass(monkeypatch):
    """SUMSQ, SUMSQ + SUMABS (entrywise_shrink) and AGC's gradient and parameter rows: one call
    each over every partial; the tables are built once per geometry and kept."""
    gen = torch.Generator().manual_seed(4)
    R, C = 40, 3000
    g, w = torch.randn(R * C, generator=gen) * 1e-3, torch.randn(R * C, generator=gen).to(torch.bfloat16)
    layout = make_layout(["w", "b"], [R * C, 9], units_per_group=[R, 1], unit_numel=[C] * R + [9])
    slices = [GradSlice(g[:50_000], 0, True, w[:50_000], 0, C), GradSlice(g[50_000:], 0, True, w[50_000:], 50_000, C),
              GradSlice(torch.randn(9, generator=gen), 1, True, torch.randn(9, generator=gen), 0, 0, R)]
    ss = SliceSet(slices, layout)
    calls = _counting(monkeypatch)
    ss.compute(frozenset({SUMSQ}))
    ss.compute(frozenset({SUMSQ, SUMABS}))
    agc = frozenset({SUMSQ, UNIT_SUMSQ, UNIT_PARAM_SUMSQ})
    st = ss.compute(agc)
    assert calls == [len(ss.meta.group_parts.where), len(ss.meta.group_parts.where),
                     len(ss.meta.unit_parts.where) + len(ss.meta.param_unit_parts.where)]
    table = ss.meta.group_parts.table()
    pair = ss.meta.unit_parts.pair_table(ss.meta.param_unit_parts, len(ss._counted))
    SliceSet(slices, layout, meta=ss.meta).compute(agc)
    assert ss.meta.group_parts.table() is table
    assert ss.meta.unit_parts.pair_table(ss.meta.param_unit_parts, len(ss._counted)) is pair
    # the pair equals float64 row sums of gradient and parameters
    assert rel(st.unit_sumsq[:R], g.double().view(R, C).square().sum(1)) <= BOUND
    assert rel(st.unit_param_sumsq[:R], w.double().view(R, C).square().sum(1)) <= BOUND


def test_torch_path_when_disabled_or_not_readable(monkeypatch):
    x = torch.randn(5 * CHUNK)
    table = kernels.RunTable(grid(x.numel()), 1)
    assert kernels.sums([x], table) is not None
    assert kernels.sums([x.double()], table) is None                      # float64: today's path
    assert kernels.sums([torch.randn(10 * CHUNK)[::2]], table) is None     # not contiguous
    assert kernels.sums([x[:-1]], table) is None                          # shorter than the table
    assert kernels.sums([x, x], table) is None                            # not the table's tensors
    calls = _counting(monkeypatch)
    layout = make_layout(["w"], [x.numel()])
    kern = SliceSet([GradSlice(grad=x, group=0)], layout).compute(frozenset({SUMSQ})).sumsq
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", "0")
    assert kernels.sums([x], table) is None
    off = SliceSet([GradSlice(grad=x, group=0)], layout).compute(frozenset({SUMSQ})).sumsq
    assert len(calls) == 2 and calls[1] is not None
    assert rel(off, kern) < 1e-6 and rel(kern, x.double().square().sum()) <= BOUND
    assert rel(off, x.double().square().sum()) > rel(kern, x.double().square().sum())


# ------------------------------------------------------------------------------------ controls
@pytest.fixture(scope="module")
def control(tmp_path_factory):
    """The source built with a broken variant (MS_SUMS_CONTROL=n), loaded beside the real one."""
    return control_builds(tmp_path_factory, "MS_SUMS_CONTROL")


def test_control_fp32_accumulation_fails_the_precision_bound(control):
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)) * 1e-3
    ref = [math.fsum(v * v for v in c) for c in chunks(x)]
    assert rel(partials(x)[0], ref) <= BOUND
    assert rel(partials(x, lib=control(1))[0], ref) > 1000 * BOUND


def test_control_lanes_by_address_depend_on_where_the_chunk_lies(control):
    """(A rotation of the lanes alone would not show: the fixed tree pairs lanes l, l + 8 / 4 /
    2 / 1 whatever the rotation and addition commutes; the peeled head does.)"""
    gen = torch.Generator().manual_seed(3)
    c = torch.randn(CHUNK, generator=gen)
    got = {}
    for lib, name in ((None, "kernel"), (control(2), "control")):
        seen = set()
        for off in range(17):
            big = torch.randn(off + CHUNK, generator=gen)
            big[off:] = c
            seen.add(float(kernels.sums([big], kernels.RunTable([(0, off, 1, CHUNK)], 1), lib=lib)[0]))
        got[name] = seen
    assert len(got["kernel"]) == 1 and len(got["control"]) > 1, got
