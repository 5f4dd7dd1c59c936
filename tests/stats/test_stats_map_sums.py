"""The statistics pass after an elementwise map, fused into the map (stats/slices._MapSums).

On the CPU the map takes the group partial norms of each block it writes while the block is
in cache, instead of a second pass reading the whole gradient again. The sums must equal, bit
for bit, what the second pass over the mapped gradient gives (same chunks, same fp32 or
float64 accumulation, same exact recomputation of chunks that over- or underflow fp32), for
fp32, bf16 and float64 slices, small tensors, slices longer than a map batch, a replica
(not counted), a group the map leaves alone, a map without a multi-tensor form and a loss
scale. A map with a kernel form (shrink p = 2, the clamp) on fp32 / 16-bit slices takes them in
the map's one kernel call instead (``kernels.run_sums``, tests/stats/test_stats_run_sums.py); a
map without one keeps the batched path with ``_MapSums``. Controls: partials accumulated in
float64 instead, or taken before the batch is mapped, are caught by the same comparison.
"""
import pytest
import torch

from megatron_shaping.shapers import make_layout
from megatron_shaping.shapers.base import SUMSQ
from megatron_shaping.shapers.entrywise_shrink import ShrinkMap
from megatron_shaping.shapers.value_clip import ClampMap
from megatron_shaping.stats import slices as S
from megatron_shaping.stats.slices import CHUNK, WIDEN_BLOCK, GradSlice, SliceSet

SIZES = [100, CHUNK, 3 * CHUNK + 17, WIDEN_BLOCK + 5 * CHUNK + 3, 40, 2 * WIDEN_BLOCK, 700]
GROUPS = [0, 0, 1, 2, 3, 4, 5]
L = 6


def _grads(dtype, seed=7):
    gen = torch.Generator().manual_seed(seed)
    gs = [(torch.randn(n, generator=gen, dtype=torch.float64) * 1e-3).to(dtype) for n in SIZES]
    gs[2][CHUNK + 5] = 1e30                                         # overflows fp32 squares
    gs[3][:CHUNK] = 0.0                                             # zero chunk: scaled exact pass
    gs[3][CHUNK:2 * CHUNK] = 1e-30                                  # squares underflow fp32
    gs[5][WIDEN_BLOCK + 3 * CHUNK:WIDEN_BLOCK + 4 * CHUNK] = 1e-25
    return gs


def _slice_set(grads, replica=True):
    layout = make_layout([f"t{i}" for i in range(L)], [sum(SIZES[:2])] + SIZES[2:-1])
    ss = [GradSlice(grad=g, group=k) for g, k in zip(grads, GROUPS)]
    ss[-1].counted = not replica               # a replica of group 5: mapped, not counted
    return SliceSet(ss, layout)


class _NoForeach(ClampMap):
    apply_foreach_ = None


def _maps():
    big = torch.full((L,), 1e-3, dtype=torch.float64)
    T = torch.tensor([2e-3, 1e-3, 5e-4, float("inf"), 3e-3, 1e-3], dtype=torch.float64)   # group 3 left alone
    return {"shrink": ShrinkMap(T=T, p=torch.full((L,), 2.0, dtype=torch.float64)),
            "shrink_p3": ShrinkMap(T=T, p=torch.full((L,), 3.0, dtype=torch.float64)),
            "clamp": ClampMap(clip=big), "clamp_plain": _NoForeach(clip=big)}


def _fused_and_second_pass(dtype, name, loss_scale):
    out = []
    for fused in (True, False):
        ss = _slice_set(_grads(dtype))
        ss.loss_scale = loss_scale
        ew = _maps()[name]
        scale = torch.ones(L, dtype=torch.float64)
        scale[1] = 0.5
        ss.apply(scale, None, ew)
        if not fused:
            assert ss._map_sums is not None     # the map took them (CPU)
            ss._map_sums = None                 # the second pass over the mapped gradient
        out.append(ss.compute(frozenset({SUMSQ})).sumsq)
    return out


@pytest.mark.parametrize("kernels", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", ["shrink", "shrink_p3", "clamp", "clamp_plain"])
@pytest.mark.parametrize("loss_scale", [1.0, 1024.0])
def test_fused_sums_equal_second_pass_bit_for_bit(dtype, name, loss_scale, kernels, monkeypatch):
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", kernels)
    # the path taken: the kernel for fp32/16-bit when enabled and built, the torch ops otherwise
    kern = _slice_set(_grads(dtype))
    kern.apply(torch.ones(L, dtype=torch.float64), None, _maps()[name])
    on_kernel = kernels == "1" and dtype != torch.float64 and S.kernels.available()
    if on_kernel and name in ("shrink", "clamp"):
        assert isinstance(kern._map_sums, S._Taken)     # the map's one kernel call took them
    else:
        assert kern._map_sums.kern == on_kernel
    fused, second = _fused_and_second_pass(dtype, name, loss_scale)
    assert torch.equal(fused, second), (fused - second)
    # and the sums are those of the mapped values (float64 reference, replica not counted)
    ss = _slice_set(_grads(dtype))
    ss.loss_scale = loss_scale
    scale = torch.ones(L, dtype=torch.float64)
    scale[1] = 0.5
    ss.apply(scale, None, _maps()[name])
    ref = torch.zeros(L, dtype=torch.float64)
    for s in ss.slices:
        if s.counted:
            ref[s.group] += s.grad.double().square().sum() / loss_scale ** 2
    assert float(((fused - ref).abs() / ref.clamp_min(1e-300)).max()) < 5e-6 and fused[5] == 0


@pytest.mark.parametrize("kernels, name", [("0", "shrink"), ("1", "shrink_p3")])
def test_fused_sums_used_once_and_only_for_sumsq(kernels, name, monkeypatch):
    # the batched path's _MapSums: the torch ops, or (a map without a kernel form) the sum kernel
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", kernels)
    ss = _slice_set(_grads(torch.float32))
    ew = _maps()[name]
    ss.apply(torch.ones(L, dtype=torch.float64), None, ew)
    sums = ss._map_sums
    assert isinstance(sums, S._MapSums)
    sums.take()
    # every counted slice above CHUNK the map wrote has its partials, whole (group 3 was left alone)
    runs = dict(sums.parts.big)
    for t, i in enumerate(ss.meta.counted):
        have = sums.got.get(t)
        if GROUPS[i] == 3:
            assert have is None
        elif t in sums.small:
            assert have is None                 # one multi-tensor call for all in result()
        else:
            assert have and sum(v.numel() for v in have) == sum(k for _, k, _ in runs[t])
    ss.compute(frozenset({SUMSQ}))
    assert ss._map_sums is None                 # consumed: a later pass reads the gradient


def test_kernel_sums_used_once():
    if not S.kernels.available():
        pytest.skip("no C compiler: the torch path is the only one")
    ss = _slice_set(_grads(torch.float32))
    ss.apply(torch.ones(L, dtype=torch.float64), None, _maps()["shrink"])
    assert isinstance(ss._map_sums, S._Taken)
    first = ss.compute(frozenset({SUMSQ})).sumsq
    assert ss._map_sums is None                 # consumed
    ss.slices[2].grad.mul_(2.0)                 # a later pass reads the gradient as it is then
    assert not torch.equal(ss.compute(frozenset({SUMSQ})).sumsq, first)


def _broken_float64(self):
    """Control: partials of the mapped blocks accumulated in float64 (not the second pass's fp32)."""
    for t, a, x in self._todo:
        have = self.got.setdefault(t, [])
        q, r = divmod(x.numel(), CHUNK)
        if q:
            have.append(torch.linalg.vector_norm(x[:q * CHUNK].view(q, CHUNK), 2, dim=1,
                                                 dtype=torch.float64).to(torch.float32))
        if r:
            have.append(torch.linalg.vector_norm(x[q * CHUNK:].view(1, r), 2, dim=1,
                                                 dtype=torch.float64).to(torch.float32))
    self._todo = []


def _broken_stale(self, i, start, piece):
    """Control: partials taken when the block is added, before the batch is mapped."""
    t = self.pos.get(i)
    if t is not None and t not in self.small:
        self._todo.append((t, start, piece))
        self._todo, todo = [], self._todo
        self._todo = [todo[-1]]
        S._MapSums.take(self)


def _broken_fp32_norms(self):
    """Control (kernel path): the blocks' partials taken by the torch path's fp32 norms, squared
    in float64, while the second pass takes the kernel's float64 sums of squares."""
    for t, a, x in self._todo:
        q, r = divmod(x.numel(), CHUNK)
        v = [torch.linalg.vector_norm(x[:q * CHUNK].view(q, CHUNK), 2, dim=1)] if q else []
        v += [torch.linalg.vector_norm(x[q * CHUNK:].view(1, r), 2, dim=1)] if r else []
        self.got.setdefault(t, []).append(torch.cat(v).double().square())
    self._todo = []


@pytest.mark.parametrize("broken, kernels", [("float64", "0"), ("stale", "0"), ("fp32_norms", "1"), ("stale", "1")])
def test_controls_broken_fusion_is_caught(broken, kernels, monkeypatch):
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", kernels)
    if kernels == "1" and not S.kernels.available():
        pytest.skip("no C compiler: the torch path is the only one")
    if broken == "float64":
        monkeypatch.setattr(S._MapSums, "take", _broken_float64)
    elif broken == "fp32_norms":
        monkeypatch.setattr(S._MapSums, "take", _broken_fp32_norms)
    else:
        monkeypatch.setattr(S._MapSums, "add", _broken_stale)
    # kernel path: a map without a kernel form (the batched path, whose blocks the sum kernel reads)
    fused, second = _fused_and_second_pass(torch.float32, "shrink" if kernels == "0" else "shrink_p3", 1.0)
    assert not torch.equal(fused, second)


def test_rank_with_replicas_only():
    """A rank whose slices are all replicas (ZeRO-0 on data-parallel rank > 0) counts nothing:
    zero sums, and no error (an error on one rank would leave the others in the all-reduce)."""
    ss = _slice_set(_grads(torch.float32))
    for s in ss.slices:
        s.counted = False
    ss = SliceSet(ss.slices, ss.layout)
    ss.apply(torch.ones(L, dtype=torch.float64), None, _maps()["shrink"])
    assert torch.equal(ss.compute(frozenset({SUMSQ})).sumsq, torch.zeros(L, dtype=torch.float64))
