"""value_clip in one statistics pass: a map known before the statistics (``Shaper.premap``).

The clamp does not depend on the statistics, so the first pass also takes the group sums of
squares of the clamped gradient (``Stats.mapped_sumsq``, stats/slices ``_premap_partials``),
reduced in the same collective; the plan carries them (``Plan.after_sumsq``) and the chain
uses them instead of a second pass and a second all-reduce. They must be, bit for bit, what
the second pass over the mapped gradient gives. Here the one-pass step is compared with the
two-pass step (the same shaper without a premap) on shard-like slice sets (pieces of tensors
at odd offsets, a replica not counted, small and big tensors, chunks that take the exact
recomputation) in fp32, bf16 and fp16: the same gradient, the same ``stats_after``, one
collective instead of two. Controls (each must differ from the two-pass step): mapped sums of
the unclamped gradient, a bf16 bound not rounded to bf16, premap statistics handed to a
chain's second member.

Every test runs on both CPU paths (the ``kernel_path`` fixture): the sum kernel, where the
clamp's sums come from ``kernels.clamp_sums`` (the value the clamp map stores for each entry,
squared exactly in float64, in the chunks, lanes and tree of the pass after the map), and the
torch ops (``MEGATRON_SHAPING_KERNELS=0``: blocks clamped into a buffer, fp32 partials). On the
kernel path the bf16 rounding inside the kernel is what the bf16 cases check: without it the
clamped entries (1e-3 in fp32, 0.00099945 as stored) give other sums (seen failing once with
the kernel's bound not rounded to the storage dtype).
"""
import sys

import pytest
import torch

from megatron_shaping.core import ShapingSession
from megatron_shaping.shapers import chain
from megatron_shaping.shapers.base import SUMSQ, Chain, Stats
from megatron_shaping.shapers.norm_clip import NormClip
from megatron_shaping.shapers.value_clip import ClampMap, ValueClip
from megatron_shaping.stats import slices as S
from megatron_shaping.stats.layout import ParamInfo
from megatron_shaping.stats.slices import CHUNK, WIDEN_BLOCK, GradSlice, SliceSet, _reduce_partials

CLIP = 1e-3      # not a bf16 number: round_bf16(1e-3) = 0.00099945 < fp32(1e-3)
#: name, shape
PARAMS = [("emb", (97, 3001)), ("w", (5, 4099)), ("b", (7,)), ("n", (2049,)), ("h", (3, 100))]
#: (tensor, start, end, counted): pieces at odd offsets, one longer than a widening block, a
#: small piece at a partition edge, a replica of "n" (tensor 5: its own storage, not counted)
PIECES = [(0, 0, 3), (0, 3, 150001), (0, 150001, 97 * 3001), (1, 17, 5 * 4099), (1, 0, 17), (2, 0, 7),
          (3, 0, 2049), (5, 0, 2049, False), (4, 0, 300)]
GROUP = [0, 1, 2, 3, 4, 3]


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def kernel_path(request, monkeypatch):
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", "1" if request.param == "kernel" else "0")
    return request.param


class TwoPass(ValueClip):
    """value_clip as it ran before the premap: the clamp's sums from a second pass."""

    def premap(self, layout):
        return None


class _ClampByItsBatchCode(ClampMap):
    map_into = None


class ViaMapCode(ValueClip):
    """The premap without ``map_into``: copies mapped by the map's own batch code (the fused
    kernel or the torch ops, as on the gradient)."""

    def premap(self, layout):
        m = super().premap(layout)
        return _ClampByItsBatchCode(**m.params)


def _grads(dtype, seed, spike=True):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, (_, shape) in enumerate(PARAMS):
        g = torch.randn(shape, generator=gen, dtype=torch.float64).view(-1) * 1e-3 * (1 + i)
        out.append(g)
    emb = out[0]
    emb[5 * CHUNK:6 * CHUNK] = 0.0                          # zero chunk: the scaled exact pass
    emb[7 * CHUNK:8 * CHUNK] *= 1e-27                       # squares underflow fp32 (mapped too)
    if spike and dtype != torch.float16:
        emb[9 * CHUNK + 11] = 1e30                          # overflows fp32 squares (not mapped)
    out[1][3 * CHUNK + 1] = -5.0
    out.append(out[3].clone())                              # the replica's storage
    return [g.to(dtype) for g in out]


#: the gradients _run shapes (a test may swap in others)
_grads_of = _grads


def _slice_set(grads, layout, reduce):
    slices = []
    for pc in PIECES:
        t, a, b = pc[:3]
        slices.append(GradSlice(grad=grads[t][a:b], group=GROUP[t], counted=pc[3] if len(pc) > 3 else True,
                                offset=a))
    return SliceSet(slices, layout, reduce)


def _session(shaper):
    return ShapingSession(shaper, [ParamInfo(n, shape) for n, shape in PARAMS])


def _run(shaper, dtype, steps=2, loss_scale=1.0, spike=True):
    """(gradients after the last step, its record, collectives per step)."""
    session = _session(shaper)
    counts = []
    for step in range(steps):
        grads = [g * loss_scale for g in _grads_of(dtype, step, spike)]
        ss = _slice_set(grads, session.layout, reduce=lambda v: None)
        ss.loss_scale = loss_scale
        rec = session.step(ss)
        assert rec is not None
        counts.append(ss.collectives)
    return grads, rec, counts


def _same(one, two):
    (g1, r1, _), (g2, r2, _) = one, two
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    # the gradient's own sums, taken block by block beside the mapped ones: the same
    assert torch.equal(r1.stats_before.sumsq, r2.stats_before.sumsq)
    return torch.equal(r1.stats_after.sumsq, r2.stats_after.sumsq) and torch.equal(r1.factor, r2.factor)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shaper", [ValueClip, ViaMapCode])
def test_one_pass_equals_two_passes_bit_for_bit(dtype, shaper):
    one, two = _run(shaper(CLIP), dtype), _run(TwoPass(CLIP), dtype)
    assert _same(one, two), (one[1].stats_after.sumsq - two[1].stats_after.sumsq)
    assert one[2] == [1, 1] and two[2] == [2, 2]
    # the clamp ran (entries beyond the bound rounded to the storage dtype are clipped)
    bound = float(torch.tensor(CLIP, dtype=torch.float32).to(dtype))
    assert max(float(g.abs().max()) for g in one[0]) == bound
    # and the sums are those of the clamped values (float64 reference, the replica not counted)
    ref = torch.zeros(len(PARAMS), dtype=torch.float64)
    for t, g in enumerate(one[0][:-1]):             # the replica not counted
        ref[t] = g.double().square().sum()
    got = one[1].stats_after.sumsq
    # fp32 partials of chunks full of equal clamped values: ~3e-6 (the two-pass path's own error)
    assert float(((got - ref).abs() / ref).max()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_loss_scale_falls_back_to_the_second_pass(dtype):
    """A loss scale (fp16): no premap statistics, the second pass as before (same results)."""
    one, two = _run(ValueClip(CLIP), dtype, loss_scale=1024.0), _run(TwoPass(CLIP), dtype, loss_scale=1024.0)
    assert _same(one, two)
    assert one[2] == two[2] == [2, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("order", ["value_first", "norm_first"])
def test_chains_with_norm_clip(dtype, order):
    """value_clip -> norm_clip: the clamp's sums from the first pass, norm_clip's factor derived
    from them (one collective). norm_clip -> value_clip: the premap is the first member's
    (none), so value_clip sees the scaled gradient through a second pass as before."""
    def make(vc):
        if order == "value_first":
            return chain(vc, NormClip(0.05))
        return chain(NormClip(0.5), vc, granularities=["tensor", None])
    one, two = _run(make(ValueClip(CLIP)), dtype), _run(make(TwoPass(CLIP)), dtype)
    assert _same(one, two)
    assert one[2] == ([1, 1] if order == "value_first" else [2, 2]) and two[2] == [2, 2]
    assert float(one[1].factor.min()) < 1.0 and float(one[1].factor.max()) <= 1.0


def test_chain_whose_rest_needs_more_than_sums_of_squares():
    """value_clip -> agc: agc needs unit statistics of the clamped gradient, a pass after the
    map anyway, so no premap sums are taken (same results, two collectives)."""
    from megatron_shaping.shapers.agc import AGC
    assert _session(chain(ValueClip(CLIP), AGC())).premap is None
    assert _session(chain(ValueClip(CLIP), NormClip(0.05))).premap is not None


def test_skip_map_and_identity():
    """Nothing above the clip: the map is skipped, premap sums unused, the gradient untouched;
    clip_value = inf has no premap."""
    grads0 = _grads(torch.float32, 0, spike=False)
    g, rec, counts = _run(ValueClip(1e3), torch.float32, steps=1, spike=False)
    assert counts == [1] and all(torch.equal(a, b) for a, b in zip(g, grads0))
    assert torch.equal(rec.stats_after.sumsq, rec.stats_before.sumsq)
    session = _session(ValueClip(float("inf")))
    assert session.premap is None and session.shaper.shapers[0].premap(session.layout) is None


def test_veto_leaves_gradient_and_state():
    session = _session(ValueClip(CLIP))
    session.step(_slice_set(_grads(torch.float32, 0), session.layout, None))
    state = session.state
    grads = _grads(torch.float32, 1)
    grads[1][5] = float("inf")
    kept = [g.clone() for g in grads]
    assert session.step(_slice_set(grads, session.layout, None)) is None
    assert session.state is state and all(torch.equal(a, b) for a, b in zip(grads, kept))


def test_device_path_matches_the_second_pass():
    """Accelerators (forced here on the CPU): float64 _foreach_norm of mapped copies in blocks,
    equal to the second pass's float64 norms up to float64 rounding (accumulated over 1e5
    entries: < 1e-11)."""
    def run(shaper):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(SliceSet, "_on_cpu", lambda self: False)
            return _run(shaper, torch.float32)
    one, two = run(ValueClip(CLIP)), run(TwoPass(CLIP))
    assert all(torch.equal(a, b) for a, b in zip(one[0], two[0]))
    a, b = one[1].stats_after.sumsq, two[1].stats_after.sumsq
    assert float(((a - b).abs() / b).max()) < 1e-11 and one[2] == [1, 1] and two[2] == [2, 2]


def _clamped_sums(bound_of):
    """Control implementation of the mapped sums: the clamp on fp32 copies with the bound
    ``bound_of(clip, dtype)``, reduced by the same partials (same chunks)."""
    def premap_sums(self, premap, plain):
        clip = premap.params["clip"]
        xs = [x.float().clamp(-bound_of(clip[self._group_of[i]], x.dtype), bound_of(clip[self._group_of[i]], x.dtype))
              for x, i in zip(self._counted, self.meta.counted)]
        return None, _reduce_partials(xs, self.meta.group_parts, 2)
    return premap_sums


def _rounded(c, dtype):
    return float(torch.tensor(c, dtype=torch.float32).to(dtype))


def test_reference_with_the_bound_rounded_to_bf16_agrees():
    """The identity the 16-bit path rests on: round(clamp(g)) = clamp(g, round(lo), round(hi))."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SliceSet, "_premap_sums", _clamped_sums(_rounded))
        ref = _run(ValueClip(CLIP), torch.bfloat16)
    assert _same(ref, _run(ValueClip(CLIP), torch.bfloat16))


def _unclamped(self, src, dst, kw):
    """Control: the map not run on the copies (sums of the unclamped gradient)."""
    return dst.copy_(src)


def _second_member_sees_premap(i, stats, first):
    """Control: the chain hands the first pass's premap statistics to every member."""
    return stats._replace(mapped_sumsq=first.mapped_sumsq)


@pytest.mark.parametrize("broken", ["unclamped", "bf16_bound_unrounded", "second_member"])
def test_controls_differ_from_the_two_pass_step(broken, monkeypatch, kernel_path):
    dtype = torch.bfloat16 if broken == "bf16_bound_unrounded" else torch.float32
    make = (lambda vc: chain(NormClip(0.5), vc, granularities=["tensor", None])) if broken == "second_member" else (lambda vc: vc)
    two = _run(make(TwoPass(CLIP)), dtype)
    if broken == "unclamped" and kernel_path == "kernel":
        clamp_sums = S.kernels.clamp_sums
        monkeypatch.setattr(S.kernels, "clamp_sums",
                            lambda xs, table, bounds, sq=True: clamp_sums(xs, table, [float("inf")] * len(bounds), sq))
    elif broken == "unclamped":
        monkeypatch.setattr(S._PremapRun, "copy", _unclamped)
    elif broken == "bf16_bound_unrounded":
        monkeypatch.setattr(SliceSet, "_premap_sums", _clamped_sums(lambda c, dt: _rounded(c, torch.float32)))
    else:
        monkeypatch.setattr(Chain, "premap", lambda self, layout: self.shapers[-1].premap(layout))
        monkeypatch.setattr(Chain, "_seen_by", staticmethod(_second_member_sees_premap))
    one = _run(make(ValueClip(CLIP)), dtype)
    assert not _same(one, two)
    assert one[2] == [1, 1]          # the broken variant did take the one-pass route


def _huge(dtype, seed, spike=True):
    """Entries of 1e30 clamped to 1e25: the clamped chunk's fp32 squares still overflow, so its
    mapped partial takes the exact recomputation, which must read the clamped values."""
    out = _grads(dtype, seed, spike)
    out[0][11 * CHUNK + 3] = 1e30
    out[0][11 * CHUNK + 9] = -1e24
    out[2][3] = 1e30                                        # a small tensor too
    return out


@pytest.mark.parametrize("broken", [False, True])
def test_exact_recomputation_reads_the_mapped_values(broken, monkeypatch, kernel_path):
    """On the torch path the exact pass of the mapped partials must read the clamped rows (the
    control reading the unclamped ones differs); the sum kernel squares exactly in float64 and
    has no exact pass, so there the same control changes nothing and the sums stay exact."""
    monkeypatch.setattr(sys.modules[__name__], "_grads_of", _huge)
    two = _run(TwoPass(1e25), torch.float32)
    if broken:   # control: the exact pass of the mapped partials reads the unmapped gradient
        monkeypatch.setattr(S._MappedRows, "index_select", lambda self, d, i: self.x.index_select(d, i))
    one = _run(ValueClip(1e25), torch.float32)
    assert _same(one, two) != (broken and kernel_path == "torch") and one[2] == [1, 1] and two[2] == [2, 2]
    assert torch.isfinite(one[1].stats_after.sumsq).all() and float(one[1].stats_after.sumsq[0]) > 1e50
