"""16-bit gradients are scaled with the factor in fp32 and rounded once (issue 10, item 8).

Reference: the exact product g * f computed in float64 (a bf16/fp16 value times a float64 factor
is exact in float64 up to 2^-45 relative) and rounded once to the 16-bit dtype. The control shows
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
