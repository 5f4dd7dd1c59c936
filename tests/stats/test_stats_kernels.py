"""The fused map kernels (megatron_shaping/stats/kernels.py, _maps.c) against independent references.

* clamp and shrink p = 2 are the same fp32 operations as the maps' multi-tensor torch ops:
  equal bit for bit (shrink: where torch's addcmul is an FMA, its AVX2 / AVX-512 kernels);
* the power map is an approximation of its own: within 1 ulp of coef * |g|^alpha computed in
  float64 (random bit patterns: subnormal, tiny, huge, 0, both signs), misrounded only within
  0.04 ulp of a halfway point, within 2 ulp of torch's pow path, 0 -> 0; an exponent outside
  (0, 1] is not run (torch's pow);
* 16-bit storage: read, computed in fp32, rounded once = the kernel on the widened copy, rounded
  once (and, for clamp and shrink, the torch ops on the widened copy);
* an element's result does not depend on where a tensor is cut (shards) nor on the instruction
  set variant the CPU picks;
* the driver (SliceSet) runs the kernel on CPU slices, and the torch ops when disabled
  (MEGATRON_SHAPING_KERNELS=0) or when the build fails (one warning);
* controls: a map rounded twice in bf16, and a power with the exponent off by 1e-3 (the 1-ulp
  bound) or by 2e-10 (the halfway bound), fail the comparisons that the kernel passes.
"""
import logging
import math

import pytest
import torch

from megatron_shaping.shapers import make_layout
from megatron_shaping.shapers.entrywise_shrink import ShrinkMap
from megatron_shaping.shapers.spamp import PowerMap
from megatron_shaping.shapers.value_clip import ClampMap
from megatron_shaping.stats import kernels
from megatron_shaping.stats.slices import GradSlice, SliceSet
from tests.kernel_checks import per_isa

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: the torch-op path is the only one")

POW_ULP = 1          # stated bound against the float64 value
POW_TORCH_ULP = 2    # against torch's pow path (its own pow is within 1 ulp)
LOSS_SCALES = [1.0, 3.0, 1024.0]


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """fp32 bit patterns as integers ordered like the values (adjacent floats differ by 1)."""
    i = x.contiguous().view(torch.int32).long()
    return torch.where(i < 0, -(i & 0x7FFFFFFF), i)


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (_ordered(a.float()) - _ordered(b.float())).abs()


def _all_floats(n: int = 1 << 20, seed: int = 0) -> torch.Tensor:
    """Random fp32 bit patterns (every exponent: subnormals, tiny, huge), finite, plus specials."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-2 ** 31, 2 ** 31 - 1, (n,), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = x[torch.isfinite(x)]
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.1754944e-38, 3.4028235e38, -3.4028235e38, 1.0, -1.0])
    return torch.cat([x, special, torch.randn(n // 4, generator=gen) * 1e-3])


def _grads(n: int = 200_000, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen) * 1e-2
    g[::7] *= 1e3
    return g


def _torch_path(foreach, x: torch.Tensor, kw: dict, ls: float) -> torch.Tensor:
    """The driver's torch ops on a copy: widen, divide by ls, the map, multiply, round once."""
    w = x.to(torch.float32, copy=True)
    if ls != 1.0:
        w = w / ls
    foreach([w], **{k: [v] for k, v in kw.items()})
    if ls != 1.0:
        w = w * ls
    return w.to(x.dtype)


def _kernel(x: torch.Tensor, name: str, params, ls: float = 1.0) -> torch.Tensor:
    y = x.clone()
    assert kernels.run(name, [y], [[p] for p in params], ls)
    return y


# ---------------------------------------------------------------- same operations: bit for bit

@pytest.mark.parametrize("ls", LOSS_SCALES)
@pytest.mark.parametrize("clip", [1e-3, 1.0 / 3.0, 5.0])
def test_clamp_equals_torch_ops(clip, ls):
    g = _grads() * ls
    assert torch.equal(_kernel(g, "clamp", [clip], ls), _torch_path(ClampMap.apply_foreach_, g, {"clip": clip}, ls))


_FMA_TORCH = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.mark.skipif(not _FMA_TORCH, reason="torch's addcmul is an FMA in its AVX2 / AVX-512 kernels only")
@pytest.mark.parametrize("ls", LOSS_SCALES)
@pytest.mark.parametrize("T,absmax", [(1e-3, math.inf), (0.0123456, math.inf), (7.0, 1.0), (1e-14, math.inf)])
def test_shrink_p2_equals_torch_ops(T, absmax, ls):
    g = _grads() * ls
    g[:5] = torch.tensor([3e30, -3e30, 1e-40, 0.0, -0.0])
    name, params = ShrinkMap.kernel_args(T=T, p=2.0, absmax=absmax)
    assert name == "shrink2"
    want = _torch_path(ShrinkMap.apply_foreach_, g, {"T": T, "p": 2.0, "absmax": absmax}, ls)
    assert torch.equal(_kernel(g, name, params, ls), want)


def test_shrink_general_p_has_no_kernel():
    assert ShrinkMap.kernel_args(T=1.0, p=3.0) is None
    assert ShrinkMap.kernel_args(T=1e20, p=2.0) is None


# ---------------------------------------------------------------- the power map: an approximation

def _pow64(x: torch.Tensor, alpha: float, coef: float) -> torch.Tensor:
    return (x.double().abs().pow(alpha) * coef).copysign(x.double()).float()


def _isa_ok() -> bool:
    return kernels.run("power", [torch.ones(1)], [[0.5], [1.0]])


pow_only = pytest.mark.skipif(not _isa_ok(), reason="the power kernel needs hardware FMA")


@pow_only
@pytest.mark.parametrize("alpha", [0.7, 0.85, 0.999, 0.5, 0.3137, 1.0])
@pytest.mark.parametrize("coef", [1.0, 3.7, 1e-3])
def test_power_within_one_ulp_of_float64(alpha, coef):
    x = _all_floats()
    got = _kernel(x, "power", [alpha, coef])
    want = _pow64(x, alpha, coef)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert int(ulps(got[finite], want[finite]).max()) <= POW_ULP
    zero = x == 0
    assert torch.equal(got[zero].view(torch.int32), x[zero].view(torch.int32))    # 0 -> 0, -0 -> -0


@pow_only
@pytest.mark.parametrize("alpha", [0.7, 0.77, 0.95])
def test_power_within_two_ulp_of_torch_pow(alpha):
    alpha = float(torch.tensor(alpha, dtype=torch.float32))     # the exponent torch's fp32 pow uses
    x = _all_floats(seed=3)
    want = _torch_path(PowerMap.apply_foreach_, x, {"alpha": alpha, "coef": 1.0}, 1.0)
    got = _kernel(x, "power", [alpha, 1.0])
    ok = torch.isfinite(want)
    assert int(ulps(got[ok], want[ok]).max()) <= POW_TORCH_ULP


@pow_only
def test_power_non_finite_inputs_do_not_crash():
    x = torch.tensor([math.inf, -math.inf, math.nan, 1.0])
    got = _kernel(x, "power", [0.7, 1.0])
    assert got[0] == math.inf and got[1] == -math.inf and math.isnan(got[2]) and got[3] == 1.0


@pow_only
def test_control_exponent_off_by_1e3_exceeds_the_bound():
    x = _all_floats(1 << 16)
    wrong = _kernel(x, "power", [0.7 * (1 + 1e-3), 1.0])
    want = _pow64(x, 0.7, 1.0)
    ok = torch.isfinite(want) & torch.isfinite(wrong)
    assert int(ulps(wrong[ok], want[ok]).max()) > 100 * POW_ULP


POW_HALFWAY = 0.04   # stated: the value before rounding is within 0.04 ulp of the exact one


def _halfway_distance(got: torch.Tensor, x: torch.Tensor, alpha: float, coef: float) -> torch.Tensor:
    """Where ``got`` is not the correctly rounded value: the exact value's distance (in ulp)
    from the halfway point between the two, from the float64 value (error ~1e-16 relative)."""
    w = x.double().abs().pow(alpha) * coef
    ref = w.float()
    bad = torch.isfinite(ref) & torch.isfinite(got) & (got.abs() != ref)
    g, r, w = got.abs()[bad].double(), ref[bad].double(), w[bad]
    return (w - (g + r) / 2).abs() / (g - r).abs()


@pow_only
@pytest.mark.parametrize("alpha,coef", [(0.7, 1.0), (0.77, 1.3), (0.3137, 1e-3), (0.999, 3.7), (0.05, 1.0)])
def test_power_misrounds_only_near_a_halfway_point(alpha, coef):
    """Sharper than the 1-ulp bound: a result differs from the correctly rounded one only where
    the exact value lies within POW_HALFWAY ulp of a halfway point (the polynomials' 2.1e-9
    relative error), which here is about 1.4 % of the inputs."""
    x = _all_floats(seed=5)
    got = _kernel(x, "power", [alpha, coef])
    d = _halfway_distance(got, x, alpha, coef)
    assert float(d.max()) < POW_HALFWAY
    assert d.numel() < 0.03 * x.numel()
    # control: the exponent off by 2e-10 (a relative error up to 2e-8, 0.35 ulp, where
    # |log2 x| ~ 150): still within 1 ulp, but misrounded far from a halfway point
    wrong = _kernel(x, "power", [alpha + 2e-10, coef])
    assert int(ulps(wrong, _pow64(x, alpha, coef))[torch.isfinite(wrong)].max()) <= POW_ULP
    assert float(_halfway_distance(wrong, x, alpha, coef).max()) > 2 * POW_HALFWAY


@pow_only
def test_power_exponent_outside_its_domain_is_not_run():
    """The kernel computes for 0 < alpha <= 1 (SPAMP's range; no clamp of alpha * log2|x|):
    another exponent leaves the tensor untouched and the caller takes torch's pow. Only the
    exponents of tensors it maps count (run_sums: on[k] = 1)."""
    for alpha in (1.5, 0.0, -0.5, math.nan, math.inf):
        x = _grads(1000)
        assert not kernels.run("power", [x], [[alpha], [1.0]])
        assert torch.equal(x, _grads(1000))
    xs = [_grads(3000), _grads(500, seed=2)]
    table = kernels.MapTable([(0, 0, 1, 3000), (1, 0, 1, 500)], [3000, 500])
    assert kernels.run_sums("power", xs, [[1.5, 0.7], [1.0, 1.0]], [0, 1], table) is not None   # tensor 0 not mapped
    assert torch.equal(xs[0], _grads(3000)) and not torch.equal(xs[1], _grads(500, seed=2))
    assert kernels.run_sums("power", xs, [[0.7, 1.5], [1.0, 1.0]], [0, 1], table) is None


def test_per_isa_runs_each_function_at_its_level():
    """The helper itself: fn runs with the level it is filed under (it once ran fn before
    setting the level: every result one variant off, the baseline never run)."""
    got = per_isa(kernels.isa)
    assert got == {level: level for level in got} and 0 in got


# ---------------------------------------------------------------- 16-bit storage, rounded once

MAPS = [("power", [0.77, 1.3], PowerMap.apply_foreach_, None),
        ("shrink2", [1e4, math.inf], ShrinkMap.apply_foreach_, {"T": 1e-2, "p": 2.0}),
        ("clamp", [1e-2], ClampMap.apply_foreach_, {"clip": 1e-2})]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ls", [1.0, 8.0])
@pytest.mark.parametrize("name,params,foreach,kw", MAPS, ids=[m[0] for m in MAPS])
def test_16bit_storage_equals_widen_op_round_once(name, params, foreach, kw, dtype, ls):
    if name == "power" and not _isa_ok():
        pytest.skip("the power kernel needs hardware FMA")
    x = (_grads() * 3 * ls).to(dtype)
    got = _kernel(x, name, params, ls)
    assert torch.equal(got, _kernel(x.float(), name, params, ls).to(dtype))
    if kw is not None and (name != "shrink2" or _FMA_TORCH):
        assert torch.equal(got, _torch_path(foreach, x, kw, ls))


@pytest.mark.parametrize("name,params", [("shrink2", [1e4, math.inf]), ("clamp", [1e-2])])
def test_control_rounding_twice_in_bf16_is_caught(name, params):
    # the loss scale divided out and rounded to bf16 before the map: a second rounding
    x = (_grads() * 3 * 3.0).to(torch.bfloat16)
    twice = _kernel((x.float() / 3.0).to(torch.bfloat16), name, params, 1.0)
    twice = (twice.float() * 3.0).to(torch.bfloat16)
    assert not torch.equal(twice, _kernel(x, name, params, 3.0))


# ---------------------------------------------------------------- shards and CPU variants

def test_result_does_not_depend_on_where_the_tensor_is_cut():
    x = _grads(100_003)
    for name, params, _, _ in MAPS:
        if name == "power" and not _isa_ok():
            continue
        whole = _kernel(x, name, params)
        pieces = x.clone()
        cuts = [0, 1, 7, 40_000, 40_013, 99_999, x.numel()]
        views = [pieces[a:b] for a, b in zip(cuts, cuts[1:])]
        assert kernels.run(name, views, [[p] * len(views) for p in params])
        assert torch.equal(pieces, whole), name


def test_instruction_set_variants_agree():
    x = _all_floats(1 << 16, seed=5)
    maps = [("power", [0.77, 1.3]), ("shrink2", [1e4, 1e-2]), ("clamp", [1e-2])]
    results = per_isa(lambda: [_kernel_or_none(x, name, params) for name, params in maps])
    if kernels.isa() > 0:
        assert len(results) >= 2, "the variants were not exercised"
    base = results[min(results)]
    for level, outs in results.items():
        for (name, _), a, b in zip(maps, outs, base):
            if a is not None and b is not None:
                assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (level, name)


def _kernel_or_none(x, name, params):
    y = x.clone()
    return y if kernels.run(name, [y], [[p] for p in params]) else None


# ---------------------------------------------------------------- the driver: kernel, fallback

def _slice_set_power(g: torch.Tensor):
    layout = make_layout(["t0"], [g.numel()])
    ss = SliceSet([GradSlice(grad=g, group=0)], layout)
    pm = PowerMap(alpha=torch.tensor([0.77], dtype=torch.float64), coef=torch.tensor([1.3], dtype=torch.float64))
    ss.apply(torch.ones(1, dtype=torch.float64), None, pm)
    return g


@pow_only
def test_driver_runs_the_kernel_and_falls_back_when_disabled(monkeypatch):
    x = _all_floats(1 << 16, seed=7)
    kern = _kernel(x, "power", [0.77, 1.3])
    torch_ops = _torch_path(PowerMap.apply_foreach_, x, {"alpha": 0.77, "coef": 1.3}, 1.0)
    assert not torch.equal(kern, torch_ops)          # the two paths can be told apart
    assert torch.equal(_slice_set_power(x.clone()), kern)
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", "0")
    y = x.clone()
    assert not kernels.run("clamp", [y], [[1e-3]]) and torch.equal(y, x)
    assert torch.equal(_slice_set_power(x.clone()), torch_ops)


def test_build_failure_warns_once_and_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_failed", False)
    monkeypatch.setenv("MEGATRON_SHAPING_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    x = _grads(1000) * 1e3
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        assert not kernels.available()
        y = x.clone()
        assert not kernels.run("clamp", [y], [[1e-3]]) and torch.equal(y, x)
        layout = make_layout(["t0"], [x.numel()])
        ss = SliceSet([GradSlice(grad=y, group=0)], layout)
        ss.apply(torch.ones(1, dtype=torch.float64), None, ClampMap(clip=torch.tensor([1e-3], dtype=torch.float64)))
    assert torch.equal(y, x.clamp(-1e-3, 1e-3))
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1


def test_non_cpu_or_fp64_tensors_take_the_torch_path():
    x = _grads(100).double()
    y = x.clone()
    assert not kernels.run("clamp", [y], [[1e-3]]) and torch.equal(y, x)
    assert not kernels.supports(torch.zeros(4)[::2])
