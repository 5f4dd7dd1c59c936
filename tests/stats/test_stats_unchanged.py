"""What a step leaves unchanged is not read again (issue 11, SPAMP's cost).

Two shortcuts, both on the CPU kernels:

* **Group factors of 1 are not applied** (``SliceSet._scale_on_device`` through ``kernels.rows``,
  each slice one row): a slice whose factor is exactly 1 in fp32 is not touched. Reference: the
  torch path (``MEGATRON_SHAPING_KERNELS=0``, ``_mul_rounded_once_``), bit for bit, for fp32 /
  bf16 / fp16 and factors 0, 1, 1 + 2^-30 (1 in fp32), tiny, huge. That the factor-1 slice is
  not even rewritten shows in a bf16 NaN payload the store would canonicalise; the control build
  (``-DMS_ROWS_CONTROL=3``) multiplies it and is caught.
* **Groups an elementwise map leaves unchanged are not read by the pass after it**
  (``ms_run_sums``' flag 2, ``SliceSet._map_kernel``'s ``kept``): their sums are those the pass
  before took (same chunks, same loop). Reference: a second statistics pass over the mapped
  gradient (a fresh ``SliceSet``), bit for bit. A NaN in an untouched tensor proves it is not read
  (its partials are 0, not NaN); the control build (``-DMS_RUNSUMS_CONTROL=2``) reads it and is
  caught. A variant that reuses the sums of a group whose factor was not 1 is caught by the same
  comparison, and so is one that keeps them across a change of the gradient.
"""
import pytest
import torch

from megatron_shaping.shapers import make_layout
from megatron_shaping.shapers.base import SUMSQ
from megatron_shaping.shapers.spamp import PowerMap
from megatron_shaping.stats import kernels
from megatron_shaping.stats import slices as S
from megatron_shaping.stats.slices import CHUNK, GradSlice, SliceSet
from tests.kernel_checks import control_builds, per_isa

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: the torch path is the only one")

INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
FACTORS = [0.3, 1.0, 1.0 + 2.0 ** -30, 0.0, 1e-30, 1e30, 1.0, 7.0]
SIZES = [3 * CHUNK + 5, 700, CHUNK, 33, 2 * CHUNK + 1, 4000, 1, 5 * CHUNK]


def _grads(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=gen, dtype=torch.float64) * 1e-3).to(dtype) for n in SIZES]


def _scaled(dtype, kernels_on: bool, monkeypatch, seed=0):
    grads = _grads(dtype, seed)
    layout = make_layout([f"t{i}" for i in range(len(SIZES))], SIZES)
    ss = SliceSet([GradSlice(grad=g, group=i) for i, g in enumerate(grads)], layout)
    with monkeypatch.context() as m:
        if not kernels_on:
            m.setenv("MEGATRON_SHAPING_KERNELS", "0")
        ss.apply(torch.tensor(FACTORS, dtype=torch.float64), None, None)
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_group_scale_kernel_equals_the_torch_path(monkeypatch, dtype):
    calls = {"rows": 0}
    real = kernels.rows

    def spy(*a, **k):
        calls["rows"] += 1
        return real(*a, **k)
    monkeypatch.setattr(kernels, "rows", spy)
    got = per_isa(lambda: _scaled(dtype, True, monkeypatch))
    assert calls["rows"] == len(got)           # the kernel ran (one call per variant)
    want = _scaled(dtype, False, monkeypatch)
    before = _grads(dtype)
    for level, gs in got.items():
        for g, w in zip(gs, want):
            assert torch.equal(g.view(INT[dtype]), w.view(INT[dtype])), level
    # the factors changed what they should: 0.3, 0, tiny, huge, 7 (not vacuous); 1 changed nothing
    changed = [not torch.equal(g, b) for g, b in zip(want, before)]
    assert changed == [f != 1.0 and float(torch.tensor(f, dtype=torch.float32)) != 1.0 for f in FACTORS]


def _nan_payload_slices(dtype=torch.bfloat16):
    """Two slices, factors 1 and 0.5, a NaN with a payload (0x7FC1) in each: a multiply stores
    the canonical NaN 0x7FC0, an untouched slice keeps 0x7FC1."""
    gs = _grads(dtype)[:2]
    for g in gs:
        g.view(torch.int16)[3] = 0x7FC1
    return gs


def _scale_two(gs, lib=None):
    live = list(range(len(gs)))
    table = kernels.RowTable([g.dtype for g in gs], [g.numel() for g in gs], [0] * len(gs),
                             [g.numel() for g in gs], live)
    assert kernels.rows(gs, table, torch.tensor([1.0, 0.5], dtype=torch.float64), lib=lib)


@pytest.fixture(scope="module")
def rows_control(tmp_path_factory):
    return control_builds(tmp_path_factory, "MS_ROWS_CONTROL")


def test_factor_one_slice_is_not_rewritten_and_control_is_caught(rows_control):
    gs = _nan_payload_slices()
    _scale_two(gs)
    assert int(gs[0].view(torch.int16)[3]) == 0x7FC1          # factor 1: not touched
    assert int(gs[1].view(torch.int16)[3]) == 0x7FC0          # factor 0.5: multiplied, stored
    gs = _nan_payload_slices()
    _scale_two(gs, lib=rows_control(3))                       # the control multiplies by 1 too
    assert int(gs[0].view(torch.int16)[3]) == 0x7FC0


# --------------------------------------------------------------- unchanged groups, not read again

RUN_SIZES = [5 * CHUNK + 17, 300, 2 * CHUNK, 3 * CHUNK]
ALPHA = [0.7, 0.9, 0.5, 0.8]
COEF = [1.3, 0.8, 2.0, 0.6]


def _run_tensors(seed=3):
    gen = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(n, generator=gen, dtype=torch.float64) * 1e-3).to(torch.float32) for n in RUN_SIZES]
    xs[2][CHUNK + 5] = float("nan")           # in the untouched tensor: read, its partials are NaN
    return xs


def _run_table():
    runs = [(0, 0, 5, CHUNK), (0, 5 * CHUNK, 1, 17), (2, 0, 2, CHUNK), (3, 0, 3, CHUNK)]
    return runs, kernels.MapTable(runs, RUN_SIZES)


@pytest.fixture(scope="module")
def runsums_control(tmp_path_factory):
    return control_builds(tmp_path_factory, "MS_RUNSUMS_CONTROL")


def _untouched_case(lib=None):
    xs = _run_tensors()
    sq = kernels.run_sums("power", xs, [ALPHA, COEF], [1, 1, 2, 0], _run_table()[1], lib=lib)
    return xs, sq


def test_untouched_tensor_is_neither_mapped_nor_read(runsums_control):
    if kernels.isa() == 0:
        pytest.skip("the power map needs hardware FMA")
    # reference: the map on tensors 0, 1 (the kernel alone), then the sum kernel over the runs
    ref = _run_tensors()
    assert kernels.run("power", ref[:2], [ALPHA[:2], COEF[:2]])
    runs, _ = _run_table()
    ref_sq = kernels.sums(ref, kernels.RunTable(runs, len(ref)))[0]
    for level, (xs, sq) in per_isa(_untouched_case).items():
        if level == 0:             # the baseline variant does not run the power map: nothing touched
            assert sq is None
            assert all(torch.equal(x.view(torch.int32), r.view(torch.int32)) for x, r in zip(xs, _run_tensors()))
            continue
        assert all(torch.equal(x, r) for x, r in zip(xs[:2] + xs[3:], ref[:2] + ref[3:])), level
        assert torch.equal(xs[2].view(torch.int32), _run_tensors()[2].view(torch.int32))   # not mapped
        # tensor 2's chunks (partials 6, 7) are 0: not read (a read gives the NaN); the rest as the reference
        assert torch.equal(sq[6:8], torch.zeros(2, dtype=torch.float64)), level
        keep = torch.ones_like(sq, dtype=torch.bool)
        keep[6:8] = False
        assert torch.equal(sq[keep], ref_sq[keep]), level
    assert bool(ref_sq[7].isnan())
    _, sq = _untouched_case(lib=runsums_control(2))               # the control reads it
    assert bool(sq[7].isnan())


def _power_set():
    """Five groups: 0 and 3 mapped (alpha < 1); 1 identity with factor 1 (unchanged, a replica
    slice of it first: not counted); 2 identity with factor 0.5 (changed by the scale); 4
    identity with factor 1 (unchanged, sums read in 16-bit: bf16 storage)."""
    gen = torch.Generator().manual_seed(11)
    sizes = [3 * CHUNK + 5, 2 * CHUNK + 9, 4000, 700, 2 * CHUNK]
    grads = [(torch.randn(n, generator=gen, dtype=torch.float64) * 1e-3).to(torch.float32) for n in sizes]
    grads[4] = grads[4].to(torch.bfloat16)
    replica = grads[1].clone() * 3
    layout = make_layout([f"g{i}" for i in range(5)], sizes)
    ss = [GradSlice(grad=replica, group=1)] + [GradSlice(grad=g, group=i) for i, g in enumerate(grads)]
    ss[0].counted = False
    return ss, layout


def _power_map():
    return PowerMap(alpha=torch.tensor([0.7, 1.0, 1.0, 0.85, 1.0], dtype=torch.float64),
                    coef=torch.tensor([1.2, 1.0, 1.0, 0.9, 1.0], dtype=torch.float64))


SCALE = torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0], dtype=torch.float64)


def _after_map(first_pass: bool = True, change_between: bool = False):
    """(sums the pass after the map reports, those of a fresh pass over the result, run_sums flags)."""
    flags = []
    real = kernels.run_sums

    def spy(kernel, tensors, params, on, *a, **k):
        flags.append(list(on))
        return real(kernel, tensors, params, on, *a, **k)
    S.kernels.run_sums = spy
    try:
        slices, layout = _power_set()
        ss = SliceSet(slices, layout)
        if first_pass:
            ss.compute(frozenset({SUMSQ}))
        if change_between:
            ss.apply(torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0], dtype=torch.float64), None, None)
        ss.apply(SCALE, None, _power_map())
        got = ss.compute(frozenset({SUMSQ})).sumsq
    finally:
        S.kernels.run_sums = real
    fresh = SliceSet(slices, layout).compute(frozenset({SUMSQ})).sumsq
    return got, fresh, flags[0]


def test_unchanged_groups_take_the_sums_of_the_pass_before():
    if kernels.isa() == 0:
        pytest.skip("the power map needs hardware FMA")
    got, fresh, flags = _after_map()
    assert torch.equal(got, fresh), (got - fresh)
    # the replica and group 1's slice, group 4's: untouched; groups 0, 3 mapped; group 2 (scaled) read
    assert flags == [2, 1, 2, 0, 1, 2], flags
    # no pass before the map (nothing kept), or the gradient changed since: everything read
    for kw in ({"first_pass": False}, {"change_between": True}):
        got, fresh, flags = _after_map(**kw)
        assert torch.equal(got, fresh)
        assert 2 not in flags, (kw, flags)


def test_control_reuse_despite_a_factor_is_caught(monkeypatch):
    """Group 2 (identity map, factor 0.5) taken as unchanged: its sums 4x those of the result."""
    if kernels.isa() == 0:
        pytest.skip("the power map needs hardware FMA")
    real = SliceSet._map_kernel

    def broken(self, args_of, identity, params, ls, stats_after, kept=None):
        if kept is not None:
            kept = (kept[0], [1.0] * len(kept[1]))
        return real(self, args_of, identity, params, ls, stats_after, kept)
    monkeypatch.setattr(SliceSet, "_map_kernel", broken)
    got, fresh, _ = _after_map()
    assert float(got[2] / fresh[2]) == pytest.approx(4.0, rel=1e-6)


def test_control_kept_across_a_change_is_caught(monkeypatch):
    """Local sums not dropped when the gradient changes (a pure scale between): group 1 is
    doubled, its kept sums are a quarter of the result's."""
    if kernels.isa() == 0:
        pytest.skip("the power map needs hardware FMA")
    real = SliceSet.apply

    def keeping(self, *a, **k):
        local = self._local_sumsq
        real(self, *a, **k)
        if self._local_sumsq is None:
            self._local_sumsq = local
    monkeypatch.setattr(SliceSet, "apply", keeping)
    got, fresh, _ = _after_map(change_between=True)
    assert float(fresh[1] / got[1]) == pytest.approx(4.0, rel=1e-6)
