"""value_clip's clamp runs on 16-bit storage without an fp32 copy (``Elementwise.exact_in_storage``)
and gives exactly the reference: the clamp of the true value computed in float64, rounded once
to the storage dtype.

Why it is exact: rounding r is monotone and leaves stored values unchanged, so
r(clamp(g, -c, c)) = clamp(g, r(-c), r(c)) for every stored g. The data put entries on and
around the bounds (the bound itself, its 16-bit neighbours, values halfway between them) for
bounds that are, and are not, representable. Controls show the power: a clamp at the bound
rounded toward zero (a truncating conversion) misses the reference, and the fp32-copy path is
really bypassed (the map's batches are the stored tensors, or its one kernel call reads them).
Both CPU paths: the map kernel and the torch ops (``MEGATRON_SHAPING_KERNELS=0``).
"""
import math

import pytest
import torch

from megatron_shaping.shapers import make_layout
from megatron_shaping.shapers.value_clip import ClampMap
from megatron_shaping.stats import kernels
from megatron_shaping.stats import slices as slices_mod
from megatron_shaping.stats.slices import GradSlice, SliceSet

BOUNDS = [1e-4, 0.1, 1.0 / 3.0, 0.5, 2.0 ** -7 * 1.00390625, 3.0]


def _around(c: float, dtype) -> torch.Tensor:
    """Stored values on and around +-c: its 16-bit roundings and their neighbours, plus noise."""
    r = torch.tensor(c, dtype=torch.float64).to(dtype)
    up = torch.nextafter(r, torch.tensor(math.inf, dtype=dtype))
    down = torch.nextafter(r, torch.tensor(-math.inf, dtype=dtype))
    near = torch.stack([r, up, down, torch.nextafter(up, torch.tensor(math.inf, dtype=dtype))])
    gen = torch.Generator().manual_seed(int(c * 1e6) % 1000)
    noise = (torch.randn(4096, generator=gen, dtype=torch.float64) * c * 1.5).to(dtype)
    return torch.cat([near, -near, noise])


@pytest.fixture(params=["kernel", "torch"])
def map_batches(request, monkeypatch):
    """For each batch the map runs: whether it ran on the stored values (no fp32 copy). On the
    kernel path (the map's one kernel call, ``kernels.run_sums``, which reads and writes the
    storage itself) one True per call; on the torch path (``MEGATRON_SHAPING_KERNELS=0``) the
    batched multi-tensor ops' flag."""
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", "1" if request.param == "kernel" else "0")
    seen = []
    real = slices_mod._map_batch
    real_kernel = kernels.run_sums

    def spy(foreach, batch, batch_kw, ls, sums, in_storage=False):
        seen.append(in_storage)
        return real(foreach, batch, batch_kw, ls, sums, in_storage)

    def spy_kernel(*a, **k):
        got = real_kernel(*a, **k)
        seen.append(got is not None)
        return got

    monkeypatch.setattr(slices_mod, "_map_batch", spy)
    monkeypatch.setattr(kernels, "run_sums", spy_kernel)
    return request.param, seen


def _reference(g: torch.Tensor, c: float) -> torch.Tensor:
    return g.double().clamp(-c, c).to(g.dtype)


def _run(grads, bounds):
    layout = make_layout([f"t{i}" for i in range(len(grads))], [g.numel() for g in grads])
    ss = SliceSet([GradSlice(grad=g, group=i) for i, g in enumerate(grads)], layout)
    clip = torch.tensor(bounds, dtype=torch.float64)
    ss.apply(torch.ones(len(grads), dtype=torch.float64), None, ClampMap(clip=clip))
    return grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_clamp_on_storage_equals_clamp_of_true_values_rounded_once(dtype, map_batches):
    _, seen = map_batches
    grads = [_around(c, dtype) for c in BOUNDS]
    refs = [_reference(g, c) for g, c in zip(grads, BOUNDS)]
    _run(grads, BOUNDS)
    assert seen and all(seen), "the 16-bit clamp went through an fp32 copy"
    for g, r, c in zip(grads, refs, BOUNDS):
        assert torch.equal(g, r), f"bound {c}: {int((g != r).sum())} of {g.numel()} entries differ"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_control_a_bound_rounded_toward_zero_misses_the_reference(dtype):
    # The data has the power to see a wrongly rounded bound: clamping at the bound rounded
    # toward zero (the next stored value below c where c is not representable) differs.
    rounded_up = 0
    for c in BOUNDS:
        g = _around(c, dtype)
        r = torch.tensor(c, dtype=torch.float64).to(dtype)
        if float(r) <= c:
            continue                      # truncation and rounding agree on this bound
        rounded_up += 1
        trunc = torch.nextafter(r, torch.tensor(-math.inf, dtype=dtype))
        wrong = g.clamp(-float(trunc), float(trunc))
        assert not torch.equal(wrong, _reference(g, c)), f"bound {c}: the data cannot tell the roundings apart"
    assert rounded_up >= 1


def test_loss_scaled_fp16_keeps_the_fp32_copy(map_batches):
    # With a loss scale the map runs on g / S: not a clamp of the stored values, so no shortcut
    # (the kernel divides by S in fp32 in every case: its one call is the fp32 computation).
    path, seen = map_batches
    g = _around(0.5, torch.float16) * 8
    ref = (g.double() / 8).clamp(-0.5, 0.5).mul(8).to(torch.float16)
    layout = make_layout(["t0"], [g.numel()])
    ss = SliceSet([GradSlice(grad=g, group=0)], layout)
    ss.loss_scale = 8.0
    ss.apply(torch.ones(1, dtype=torch.float64), None, ClampMap(clip=torch.tensor([0.5], dtype=torch.float64)))
    assert seen and (all(seen) if path == "kernel" else not any(seen))
    assert torch.equal(g, ref)
