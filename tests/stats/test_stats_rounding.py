"""16-bit gradients are scaled with the factor in fp32 and rounded once (issue 10, item 8).

Reference: the exact product g * f computed in float64 (a bf16/fp16 value times a float64 factor
is exact in float64 up to 2^-45 relative) and converted to the 16-bit dtype. torch converts
float64 to bf16/fp16 through fp32, so the reference is the product rounded to fp32, then to the
16-bit dtype: what one fp32 multiply and one rounding give, and the correctly rounded product
except where the fp32 rounding lands exactly on a 16-bit midpoint (a product within 2^-24
relative of one; 1.00390625 + 2^-40 goes to 1.0, not to 1.0078125). The control shows
the power: ``torch._foreach_mul_`` with Python scalars, which rounds the factor to the 16-bit dtype
before multiplying, misses that reference on a large fraction of elements.
"""
import pytest
import torch

from megatron_shaping.shapers import make_layout
from megatron_shaping.stats.slices import GradSlice, SliceSet

R, C = 16, 64
FACTORS = [0.3, 0.7071067811865476, 1.0 / 3.0, 0.123456789]


def _grads(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(R * C, generator=gen, dtype=torch.float64).to(dtype) for _ in FACTORS]


def _correctly_rounded(g, f):
    return (g.double() * f).to(g.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_scale_of_16bit_slices_is_correctly_rounded(dtype):
    grads = _grads(dtype)
    refs = [_correctly_rounded(g, f) for g, f in zip(grads, FACTORS)]
    layout = make_layout([f"t{i}" for i in range(len(FACTORS))], [R * C] * len(FACTORS))
    ss = SliceSet([GradSlice(grad=g, group=i) for i, g in enumerate(grads)], layout)
    ss.apply(torch.tensor(FACTORS, dtype=torch.float64), None, None)
    for g, r in zip(grads, refs):
        assert torch.equal(g, r), f"{int((g != r).sum())} of {g.numel()} elements not correctly rounded"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unit_scale_of_16bit_slices_is_correctly_rounded(dtype):
    # Row (unit) factors as AGC produces them, on a slice that starts mid-row.
    gen = torch.Generator().manual_seed(1)
    row_f = torch.rand(R, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    full = torch.randn(R * C, generator=gen, dtype=torch.float64).to(dtype)
    offset = C // 2 + 3
    g = full[offset:].clone()
    ref = _correctly_rounded(g, row_f.repeat_interleave(C)[offset:])
    layout = make_layout(["w"], [R * C], units_per_group=[R], unit_numel=[C] * R)
    ss = SliceSet([GradSlice(grad=g, group=0, offset=offset, row_len=C, unit_base=0)], layout)
    ss.apply(torch.ones(1, dtype=torch.float64), row_f, None)
    assert torch.equal(g, ref), f"{int((g != ref).sum())} of {g.numel()} elements not correctly rounded"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_control_foreach_mul_with_scalars_is_not_correctly_rounded(dtype):
    """The rule the tests above guard is far from vacuous: the fused scalar multiply misses it."""
    grads = _grads(dtype)
    refs = [_correctly_rounded(g, f) for g, f in zip(grads, FACTORS)]
    torch._foreach_mul_(grads, FACTORS)
    wrong = sum(int((g != r).sum()) for g, r in zip(grads, refs))
    total = sum(g.numel() for g in grads)
    if dtype == torch.bfloat16:
        assert wrong > 0.05 * total, wrong
    else:
        assert wrong > 0, wrong        # fp16 keeps 11 bits of the factor: fewer misses, still some


# ------------------------------------------------------------------ native 16-bit multiply (issue 11)
# Which path multiplies a 16-bit slice is decided per (device type, dtype, factor form) by a
# cached probe (slices._native_rounds_once). Both paths must give the correctly rounded product
# of the fp32 computation; the probe result is forced here so that each path runs on this CPU.

def _force(monkeypatch, native: bool, rows_native: bool = False):
    """Probe results forced: the 0-d factor multiply rounds once (``native``); the fp32
    broadcast multiply is used and rounds once (``rows_native``)."""
    from megatron_shaping.stats import slices as sl
    table = {}
    monkeypatch.setattr(sl, "_NATIVE_ONCE", table)
    for dt in (torch.bfloat16, torch.float16):
        for form in (torch.float64, torch.float32):
            table[("cpu", dt, form)] = native
        table[("cpu", dt, "rows")] = rows_native
    monkeypatch.setattr(sl, "_native_rows", lambda device: rows_native)
    calls = {"float": 0}
    real_float = torch.Tensor.float

    def counting_float(self):
        calls["float"] += 1
        return real_float(self)
    monkeypatch.setattr(torch.Tensor, "float", counting_float)
    return calls


@pytest.mark.parametrize("path", ["scalar", "broadcast", "widen"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_scale_paths_all_correctly_rounded(monkeypatch, dtype, path):
    grads = _grads(dtype, seed=3)
    refs = [_correctly_rounded(g, f) for g, f in zip(grads, FACTORS)]
    layout = make_layout([f"t{i}" for i in range(len(FACTORS))], [R * C] * len(FACTORS))
    ss = SliceSet([GradSlice(grad=g, group=i) for i, g in enumerate(grads)], layout)
    calls = _force(monkeypatch, path == "scalar", rows_native=path == "broadcast")
    # the torch paths (the CPU's row kernel is test_group_scale_of_16bit_slices_is_correctly_rounded's)
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", "0")
    ss.apply(torch.tensor(FACTORS, dtype=torch.float64), None, None)
    # the fallback widens every slice; the native paths widen none
    assert calls["float"] == (len(grads) if path == "widen" else 0)
    for g, r in zip(grads, refs):
        assert torch.equal(g, r), f"{int((g != r).sum())} of {g.numel()} elements not correctly rounded"


@pytest.mark.parametrize("rows_native", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unit_scale_paths_both_correctly_rounded(monkeypatch, dtype, rows_native):
    gen = torch.Generator().manual_seed(4)
    row_f = torch.rand(R, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    vec_f = torch.rand(1, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    full = torch.randn(R * C, generator=gen, dtype=torch.float64).to(dtype)
    offset = C // 2 + 3
    g = full[offset:-5].clone()            # starts and ends mid-row
    v = torch.randn(C, generator=gen, dtype=torch.float64).to(dtype)
    ref = _correctly_rounded(g, row_f.repeat_interleave(C)[offset:-5])
    ref_v = _correctly_rounded(v, float(vec_f))
    layout = make_layout(["w", "b"], [R * C, C], units_per_group=[R, 1], unit_numel=[C] * R + [C])
    ss = SliceSet([GradSlice(grad=g, group=0, offset=offset, row_len=C, unit_base=0),
                   GradSlice(grad=v, group=1, unit_base=R)], layout)
    calls = _force(monkeypatch, rows_native, rows_native=rows_native)
    # the torch paths (the CPU's row kernel is test_unit_scale_of_16bit_slices_is_correctly_rounded's)
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", "0")
    ss.apply(torch.ones(2, dtype=torch.float64), torch.cat([row_f, vec_f]), None)
    assert calls["float"] == (0 if rows_native else 2)
    assert torch.equal(g, ref), f"{int((g != ref).sum())} of {g.numel()} elements not correctly rounded"
    assert torch.equal(v, ref_v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_probe_data_discriminates_and_probe_is_cached(monkeypatch, dtype):
    """The probe can fail: on its data a factor rounded to the 16-bit dtype first (what a device
    may do with a 0-d factor) differs from the fp32 product rounded once."""
    from megatron_shaping.stats import slices as sl
    x, f = sl._probe_data(dtype, torch.device("cpu"))
    once = (x.float() * f).to(dtype)
    twice = x * torch.tensor(f).to(dtype)
    assert int((once != twice).sum()) >= 8, int((once != twice).sum())
    monkeypatch.setattr(sl, "_NATIVE_ONCE", {})
    assert sl._native_rounds_once(torch.device("cpu"), dtype, torch.float64)   # this CPU: one rounding
    assert sl._native_rounds_once(torch.device("cpu"), dtype, "rows")
    # a multiply that rounds twice is detected
    real = torch._foreach_mul_
    monkeypatch.setattr(sl, "_NATIVE_ONCE", {})
    monkeypatch.setattr(torch, "_foreach_mul_", lambda ts, fs: [t.mul_(y.to(t.dtype)) for t, y in zip(ts, fs)])
    assert not sl._native_rounds_once(torch.device("cpu"), dtype, torch.float64)
    assert not sl._native_rounds_once(torch.device("cpu"), dtype, "rows")
    monkeypatch.setattr(torch, "_foreach_mul_", real)
    assert not sl._native_rounds_once(torch.device("cpu"), dtype, torch.float64)   # cached


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_and_16bit_tensors_scaled_by_python_floats_in_one_call(dtype):
    """fp32 and 16-bit tensors with Python-float factors (a plan's group factors beside a map, as
    an external shaper may return): the native 16-bit path takes 0-d factors, the fp32 one the
    float; one multi-tensor call must take both (it raised TypeError), each product rounded
    once: fp32 as fp32 * float, 16-bit as the fp32 product rounded."""
    from megatron_shaping.stats.slices import _mul_rounded_once_
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(1000, generator=gen)
    b = torch.randn(1000, generator=gen).to(dtype)
    want_a, want_b = a * 0.3, (b.double() * 0.7).float().to(dtype)
    _mul_rounded_once_([a, b], [0.3, 0.7])
    assert torch.equal(a, want_a) and torch.equal(b, want_b)
