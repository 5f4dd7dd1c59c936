"""The map and the statistics pass after it in one kernel call (stats/kernels.py ``run_sums``,
_maps.c ``ms_run_sums``; ``SliceSet._map_kernel``).

The reference is the two calls it replaces: the map kernel (``kernels.run``) and then the sum
kernel (``kernels.sums``) over the mapped tensors. ``run_sums`` must store the same values and
write the same partials, bit for bit, for every map (power, shrink2, clamp), storage dtype,
loss scale, instruction-set variant, tensors the map leaves alone (``on`` false) and tensors in
no run (mapped whole). Its table must tile each tensor it names (else a clear error). In the
statistics pass (``SliceSet``) the whole map is one kernel call and no sum kernel runs after it,
each slice mapped with its group's parameters (the torch ops, kernels off, store the same values).
Controls: a build that sums each chunk before mapping it (``-DMS_RUNSUMS_CONTROL=1``), and a
table whose runs name the counted positions instead of the slices, are caught by the same
comparisons.
"""
import pytest
import torch

from megatron_shaping.shapers import make_layout
from megatron_shaping.shapers.base import SUMSQ
from megatron_shaping.shapers.entrywise_shrink import ShrinkMap
from megatron_shaping.stats import kernels
from megatron_shaping.stats import slices as S
from megatron_shaping.stats.slices import CHUNK, GradSlice, SliceSet
from tests.kernel_checks import control_builds, per_isa

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: the torch path is the only one")

SIZES = [5 * CHUNK + 17, 300, 2 * CHUNK, 999, 3 * CHUNK]
PARAMS = {"power": [[0.7, 0.9, 0.5, 0.8, 1.0], [1.3, 0.8, 2.0, 1.0, 0.6]],
          "shrink2": [[1e6, 4e6, 2.5e5, 1e6, 1e5], [float("inf"), 2e-3, float("inf"), 1e-3, float("inf")]],
          "clamp": [[1e-3, 5e-4, 2e-3, 1e-3, 3e-3]]}
ON = [True, True, False, True, True]          # tensor 2 left alone (read, not mapped)


def _tensors(dtype, ls=1.0, seed=3):
    """Gradients of ~1e-3 as stored: times the loss scale ``ls``."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=gen, dtype=torch.float64) * 1e-3 * ls).to(dtype) for n in SIZES]


def _table():
    """Runs over tensors 0, 2, 4 (tensor 2 in two runs; the last chunk of tensor 0 short);
    tensors 1 and 3 in no run (mapped whole); the runs not in tensor order."""
    runs = [(2, 0, 1, CHUNK), (0, 0, 5, CHUNK), (0, 5 * CHUNK, 1, 17), (4, 0, 3, CHUNK), (2, CHUNK, 1, CHUNK)]
    return runs, kernels.MapTable(runs, SIZES)


def _reference(name, dtype, ls):
    xs = _tensors(dtype, ls)
    on = [x for x, f in zip(xs, ON) if f]
    assert kernels.run(name, on, [[c[i] for i in range(len(xs)) if ON[i]] for c in PARAMS[name]], ls)
    runs, _ = _table()
    return xs, kernels.sums(xs, kernels.RunTable(runs, len(xs)))[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["power", "shrink2", "clamp"])
@pytest.mark.parametrize("ls", [1.0, 1024.0])
def test_one_call_equals_map_then_sums_on_every_isa(name, dtype, ls):
    if name == "power" and kernels.isa() == 0:
        pytest.skip("the power map needs hardware FMA")
    ref_x, ref_sq = _reference(name, dtype, ls)

    def one():
        xs = _tensors(dtype, ls)
        return xs, kernels.run_sums(name, xs, PARAMS[name], ON, _table()[1], ls)
    got = per_isa(one)
    for level, (xs, sq) in got.items():
        if sq is None:
            assert name == "power" and level == 0     # not run without FMA: nothing touched
            assert all(torch.equal(x, y) for x, y in zip(xs, _tensors(dtype, ls)))
            continue
        assert all(torch.equal(x, r) for x, r in zip(xs, ref_x)), level
        assert torch.equal(sq, ref_sq), (level, (sq - ref_sq).abs().max())
    # the data has the power: the map changes the sums far beyond any rounding
    plain = kernels.sums(_tensors(dtype, ls), kernels.RunTable(_table()[0], len(SIZES)))[0]
    assert float(((plain - ref_sq).abs() / plain).max()) > 1e-3


def test_table_must_tile_its_tensors():
    with pytest.raises(ValueError, match="tensor 0 do not tile it"):
        kernels.MapTable([(0, 0, 1, CHUNK), (0, CHUNK + 1, 1, 10)], [CHUNK + 11])      # a gap
    with pytest.raises(ValueError, match="tensor 0 do not tile it"):
        kernels.MapTable([(0, 0, 2, CHUNK), (0, CHUNK, 1, CHUNK)], [3 * CHUNK])        # an overlap
    with pytest.raises(ValueError, match="cover 2048 of its 3000"):
        kernels.MapTable([(0, 0, 1, CHUNK)], [3000])                                  # a short tail
    # tensors not of the table's lengths: nothing touched, the caller takes the other path
    xs = _tensors(torch.float32)
    before = [x.clone() for x in xs]
    assert kernels.run_sums("clamp", xs[:-1] + [xs[-1][:-1]], PARAMS["clamp"], ON, _table()[1]) is None
    assert all(torch.equal(x, y) for x, y in zip(xs, before))


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    return control_builds(tmp_path_factory, "MS_RUNSUMS_CONTROL")


def test_control_sums_before_the_map_is_caught(control):
    _, ref_sq = _reference("shrink2", torch.float32, 1.0)
    xs = _tensors(torch.float32)
    sq = kernels.run_sums("shrink2", xs, PARAMS["shrink2"], ON, _table()[1], lib=control(1))
    assert all(torch.equal(x, r) for x, r in zip(xs, _reference("shrink2", torch.float32, 1.0)[0]))
    assert not torch.equal(sq, ref_sq)


def _replica_first(dtype=torch.float32):
    """A replica (mapped, not counted) before the counted slices: counted position != slice index
    (all of one length, so a table of the wrong slices still tiles them)."""
    gen = torch.Generator().manual_seed(5)
    sizes = [3 * CHUNK + 5] * 4
    grads = [(torch.randn(n, generator=gen, dtype=torch.float64) * 1e-3).to(dtype) for n in sizes]
    grads[0] *= 50                                  # the replica: far larger values
    layout = make_layout(["a", "b", "c"], [sizes[1], sizes[2], sizes[3]])
    ss = [GradSlice(grad=grads[0], group=0), GradSlice(grad=grads[1], group=0),
          GradSlice(grad=grads[2], group=1), GradSlice(grad=grads[3], group=2)]
    ss[0].counted = False
    return SliceSet(ss, layout)


def _shrink():
    return ShrinkMap(T=torch.tensor([2e-3, 1e-3, 5e-4], dtype=torch.float64),
                     p=torch.full((3,), 2.0, dtype=torch.float64))


def _taken_and_second_pass():
    a = _replica_first()
    a.apply(torch.ones(3, dtype=torch.float64), None, _shrink())
    assert isinstance(a._map_sums, S._Taken)
    taken = a.compute(frozenset({SUMSQ})).sumsq
    b = _replica_first()
    b.apply(torch.ones(3, dtype=torch.float64), None, _shrink())
    b._map_sums = None                               # the second pass over the mapped gradient
    assert all(torch.equal(x.grad, y.grad) for x, y in zip(a.slices, b.slices))
    return taken, b.compute(frozenset({SUMSQ})).sumsq


def test_statistics_after_the_map_in_one_kernel_call(monkeypatch):
    calls = {"run_sums": 0, "run": 0, "sums": 0}
    for name in calls:
        real = getattr(kernels, name)

        def spy(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(kernels, name, spy)
    a = _replica_first()
    a.apply(torch.ones(3, dtype=torch.float64), None, _shrink())
    a.compute(frozenset({SUMSQ}))
    assert calls == {"run_sums": 1, "run": 0, "sums": 0}, calls
    monkeypatch.undo()
    taken, second = _taken_and_second_pass()
    assert torch.equal(taken, second)
    # each slice mapped with its own group's parameters: the torch ops (kernels off) store the
    # same values (shrink p = 2 is the same fp32 operations where torch's addcmul is an FMA) and
    # take the same sums up to their fp32 partials; the groups' T differ by 2-4x
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", "0")
    t = _replica_first()
    t.apply(torch.ones(3, dtype=torch.float64), None, _shrink())
    assert not isinstance(t._map_sums, S._Taken)
    if kernels.isa() > 0:
        assert all(torch.equal(x.grad, y.grad) for x, y in zip(a.slices, t.slices))
    assert float(((t.compute(frozenset({SUMSQ})).sumsq - taken).abs() / taken).max()) < 1e-6


def test_control_runs_of_counted_positions_are_caught(monkeypatch):
    """The table built from ``group_parts``' counted positions without mapping them to slice
    indices: the partials of the wrong slices (here the replica's)."""
    def broken(self, sums):
        runs = list(self.group_parts.runs) if sums else []
        return kernels.MapTable(runs, self.numel)
    monkeypatch.setattr(S.SliceMeta, "map_table", broken)
    taken, second = _taken_and_second_pass()
    assert not torch.equal(taken, second)
