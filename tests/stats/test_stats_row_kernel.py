"""AGC's row factors by the CPU kernel (kernels.rows, _maps.c ms_rows) against the torch path.

The torch path is the reference: ``_scale_rows_`` (16-bit: widened copy times the factors cast to
fp32, rounded once on the copy back; fp32: ``_row_pieces`` times the fp32 factors) and
``SliceSet._scale_units`` with ``MEGATRON_SHAPING_KERNELS=0``. They must agree bit for bit (the
stored bits, inf included; NaN where the torch path has NaN, see ``_same``) for fp32 / bf16 / fp16 slices starting and ending mid-row,
shorter than a row, exactly one row, factors 0, 1, tiny, huge (fp32 overflow), with inf / NaN in
the gradient; on every instruction-set variant; and through AGC end to end. Controls built from
the same source (``-DMS_ROWS_CONTROL``): the factor applied in float64 before the rounding (bf16
and fp32 differ), and the first whole row after a partial head given the head's factor.
"""

import pytest
import torch

from megatron_shaping.shapers import make_layout
from megatron_shaping.shapers.agc import AGC
from megatron_shaping.stats import kernels
from megatron_shaping.stats.slices import GradSlice, SliceSet, _scale_rows_
from megatron_shaping.torch_api import GradientShaper
from tests.kernel_checks import control_builds, per_isa

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: the torch-op path is the only one")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
ROW = 37
#: (offset, length) of slices of a matrix of rows of ROW elements: mid-row start and end, shorter
#: than a row (inside one, across a boundary), exactly one row, whole rows, a head and a tail
CUTS = [(0, 5 * ROW), (11, 4 * ROW), (ROW, ROW), (3, 20), (30, 15), (ROW - 1, 1), (0, 1), (5, 9 * ROW + 7),
        (2 * ROW + 36, 2), (7 * ROW, 3 * ROW - 1)]


def _grad(n: int, dtype, seed: int) -> torch.Tensor:
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3.0
    g[::17] = float("inf")
    g[5::19] = -float("inf")
    g[3::23] = float("nan")
    g[7::29] *= 1e-6
    return g.to(dtype)


def _factors(n_rows: int, seed: int) -> torch.Tensor:
    """float64 factors: random, 0, 1, tiny (fp32 subnormal and below), huge (fp32 overflow), not
    representable in fp32 (their rounding matters)."""
    f = torch.rand(n_rows, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.7
    special = [0.0, 1.0, 1e-30, 1e-41, 1e-50, 1e30, 1e300, 1.0 + 2.0 ** -30, 0.1, 1.0 / 3.0]
    for k, v in enumerate(special):
        f[(3 * k + 1) % n_rows] = v
    return f


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT[t.dtype])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same stored bits, except a NaN's: NaN where the other has NaN. (torch's bf16 tensor
    conversion stores every NaN as 0xFFFF, its scalar one and the kernels' bf16_store 0x7FC0:
    the package's kernels all store the latter; a NaN gradient is skipped by the step anyway.)"""
    na, nb = a.isnan(), b.isnan()
    return torch.equal(na, nb) and torch.equal(_bits(a)[~na], _bits(b)[~nb])


def _slices(dtype, seed=0):
    """(gradients, offsets, row factor index of each) for CUTS, factors of 40 rows."""
    grads = [_grad(n, dtype, seed + k) for k, (_, n) in enumerate(CUTS)]
    return grads, [a for a, _ in CUTS], [a // ROW for a, _ in CUTS]


def _torch_reference(grads, offsets, firsts, f):
    out = [g.clone() for g in grads]
    for g, a, first in zip(out, offsets, firsts):
        n_rows = (a + g.numel() - 1) // ROW - a // ROW + 1
        _scale_rows_(g, a, ROW, f[first:first + n_rows])
    return out


def _kernel(grads, offsets, firsts, f, lib=None):
    out = [g.clone() for g in grads]
    table = kernels.RowTable([g.dtype for g in out], [g.numel() for g in out], offsets, [ROW] * len(out), firsts)
    assert kernels.rows(out, table, f, lib=lib)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_equals_the_torch_path_bit_for_bit(dtype):
    f = _factors(40, 1)
    grads, offsets, firsts = _slices(dtype)
    want = _torch_reference(grads, offsets, firsts, f)
    got = _kernel(grads, offsets, firsts, f)
    for g, w, x in zip(grads, want, got):
        assert _same(x, w), (g.numel(),)
    # the test is not vacuous: the factors changed the gradients, NaN and inf among them
    assert not all(_same(g, x) for g, x in zip(grads, got))
    assert any(x.isnan().any() for x in got) and any(x.isinf().any() for x in got)


@pytest.mark.parametrize("dtype", DTYPES)
def test_instruction_set_variants_agree(dtype):
    f = _factors(40, 2)
    grads, offsets, firsts = _slices(dtype, seed=7)
    results = per_isa(lambda: _kernel(grads, offsets, firsts, f))
    if kernels.isa() > 0:
        assert len(results) >= 2, "the variants were not exercised"
    base = results[min(results)]
    for level, outs in results.items():
        for a, b in zip(outs, base):
            assert torch.equal(_bits(a), _bits(b)), level


def _slice_set(dtype, seed=0):
    """Two matrices (rows of ROW and of 5000: longer than a chunk) cut off row boundaries, a
    non-counted replica, a bias (one unit: not a row slice), an fp64 row slice (torch path)."""
    shapes = [(12, ROW), (3, 5000)]
    gen = torch.Generator().manual_seed(seed)
    layout = make_layout(["a", "b", "bias", "d"], [12 * ROW, 15000, 9, 4 * ROW],
                         units_per_group=[12, 3, 1, 4], unit_numel=[ROW] * 12 + [5000] * 3 + [9] + [ROW] * 4)
    slices, base = [], 0
    for gi, (r, c) in enumerate(shapes):
        g = (torch.randn(r * c, generator=gen, dtype=torch.float64) * 0.1).to(dtype)
        cuts = [0, c // 3, c + 1, (r * c) // 2 + 5, r * c]
        for a, b in zip(cuts[:-1], cuts[1:]):
            slices.append(GradSlice(g[a:b], gi, True, None, a, c, base))
        if gi == 0:
            slices.append(GradSlice(g[ROW + 4:3 * ROW].clone(), gi, False, None, ROW + 4, c, base))
        base += r
    slices.append(GradSlice(torch.randn(9, generator=gen).to(dtype), 2, True, None, 0, 0, base))
    slices.append(GradSlice(torch.randn(4 * ROW, generator=gen, dtype=torch.float64), 3, True, None, 0, ROW,
                            base + 1))
    return layout, slices


@pytest.mark.parametrize("dtype", DTYPES)
def test_slice_set_kernel_equals_kernels_off(dtype, monkeypatch):
    layout, slices = _slice_set(dtype)
    U = layout.unit_group.numel()
    f = _factors(U, 3)
    ref = [GradSlice(s.grad.clone(), s.group, s.counted, s.param, s.offset, s.row_len, s.unit_base) for s in slices]
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", "0")
    SliceSet(ref, layout)._scale_units(f)
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", "1")
    ss = SliceSet(slices, layout)
    calls = []
    rows = kernels.rows
    monkeypatch.setattr(kernels, "rows", lambda *a, **k: calls.append(len(a[0])) or rows(*a, **k))
    ss._scale_units(f)
    assert calls == [len(ss.meta.row_units) - 1]         # one call for every 16/32-bit row slice
    for s, r in zip(slices, ref):
        if s.grad.dtype == torch.float64:
            assert torch.equal(s.grad, r.grad)
        else:
            assert _same(s.grad, r.grad)
    assert not _same(slices[0].grad, _slice_set(dtype)[1][0].grad)
    SliceSet(slices, layout, meta=ss.meta)._scale_units(f)   # the table reused
    assert len(calls) == 2 and len(ss.meta.row_tables) == 1


def _agc_run(dtype):
    gen = torch.Generator().manual_seed(11)
    shapes = {"w1": (64, 300), "w2": (7, 5), "b": (64,)}
    params = {n: torch.nn.Parameter((torch.randn(s, generator=gen) * 0.05).to(dtype)) for n, s in shapes.items()}
    for p in params.values():
        p.grad = (torch.randn(p.shape, generator=gen) * 0.2).to(dtype)
    GradientShaper(params.items(), AGC(0.01, 1e-3)).apply_()
    return {n: p.grad for n, p in params.items()}


@pytest.mark.parametrize("dtype", DTYPES)
def test_agc_end_to_end_identical_on_both_paths(dtype, monkeypatch):
    """The row kernel against the torch path, the statistics (their kernel) the same on both."""
    calls = []
    rows = kernels.rows
    monkeypatch.setattr(kernels, "rows", lambda *a, **k: calls.append(1) or rows(*a, **k))
    on = _agc_run(dtype)
    assert calls, "the kernel did not run"
    monkeypatch.setattr(kernels, "rows", lambda *a, **k: calls.append(0) or False)   # the torch path
    off = _agc_run(dtype)
    assert calls == [1, 0]
    for n in on:
        assert _same(on[n], off[n]), n
    gen = torch.Generator().manual_seed(11)
    torch.randn(64, 300, generator=gen), torch.randn(7, 5, generator=gen), torch.randn(64, generator=gen)
    raw = (torch.randn(64, 300, generator=gen) * 0.2).to(dtype)
    assert not _same(on["w1"], raw)                  # AGC clipped rows (not vacuous)


# ------------------------------------------------------------------------------------ controls
@pytest.fixture(scope="module")
def control(tmp_path_factory):
    """The source built with MS_ROWS_CONTROL=n, loaded beside the real library."""
    return control_builds(tmp_path_factory, "MS_ROWS_CONTROL")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_control_factor_in_float64_differs(control, dtype):
    f = _factors(600, 4)
    grads, offsets, firsts = _slices(dtype, seed=3)
    grads = [_grad(20000, dtype, 9)] + grads          # 541 rows
    offsets, firsts = [0] + offsets, [0] + firsts
    want = _torch_reference(grads, offsets, firsts, f)
    assert all(_same(a, b) for a, b in zip(_kernel(grads, offsets, firsts, f), want))
    got = _kernel(grads, offsets, firsts, f, lib=control(1))
    assert not all(_same(a, b) for a, b in zip(got, want))


def test_control_row_off_by_one_after_a_head_differs(control):
    f = _factors(40, 5)
    g = [_grad(4 * ROW, torch.bfloat16, 2)]
    want = _torch_reference(g, [11], [0], f)
    assert _same(_kernel(g, [11], [0], f)[0], want[0])
    assert not _same(_kernel(g, [11], [0], f, lib=control(2))[0], want[0])
    # no head: the control is the kernel (the fault is the head's row count only)
    want = _torch_reference(g, [0], [0], f)
    assert _same(_kernel(g, [0], [0], f, lib=control(2))[0], want[0])
