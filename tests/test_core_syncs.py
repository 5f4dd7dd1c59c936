"""Device-to-host reads of one shaping step, counted (issue 11): on a GPU each read stalls the step.

Every way PyTorch hands a tensor value to Python (``item``, ``tolist``, ``cpu``, ``numpy``,
``bool()``, ``int()``, ``float()``, ``__index__``: the benchmark's ``SyncCounter.METHODS``, wrapped by its
``wrapped``) is wrapped during one ``ShapingSession.step``
(through :class:`GradientShaper`, i.e. a :class:`SliceSet` of whole-tensor slices): a single
shaper makes exactly one read, the step's decision, which an elementwise plan's parameters share.
A chain adds at most one read per further elementwise member; a deferred pure-scale step
(``defer=True``: the DeepSpeed hook on ZeRO-1/2/3) makes none. The controls show that the count
catches a host branch put back into a shaper and reads that are not folded into one copy, and
that a deferral keeping the new state on a veto is caught.
"""
import math
from contextlib import contextmanager

import pytest
import torch

from megatron_shaping import GradientShaper
from megatron_shaping.core import ShapingSession
from megatron_shaping.shapers import REGISTRY, build_shaper, chain
from megatron_shaping.shapers.value_clip import ValueClip
from megatron_shaping.stats import kernels as sum_kernels
from megatron_shaping.stats.slices import SliceSet
from tools.bench_overhead import SyncCounter, wrapped

#: the reads the benchmark counts, wrapped the same way
READS = SyncCounter.METHODS

#: parameters that make every method act on the test gradient (a clip that never fires skips its map)
ACTIVE = {"norm_clip": {"max_norm": 0.05}, "value_clip": {"clip_value": 1e-3}, "zclip": {"warmup_steps": 1},
          "adagc": {"warmup_steps": 1}, "entrywise_shrink": {"threshold": 2.0}, "spamp": {}, "agc": {},
          "gradient_stabilizer": {}}
ELEMENTWISE = {"spamp", "value_clip", "entrywise_shrink"}
SHAPES = {"emb.weight": (40, 16), "l0.weight": (32, 16), "l0.bias": (32,), "norm.weight": (16,), "head.weight": (7, 32)}


class Reads:
    def __init__(self):
        self.n = 0
        self.where = []
        self.in_stats = 0      # of them, inside SliceSet.compute (the CPU statistics' exact pass)


@contextmanager
def counting_reads():
    reads = Reads()

    def wrap(name, fn):
        def counted(t, *a, **k):
            reads.n += 1
            reads.where.append(name)
            return fn(t, *a, **k)
        return counted
    with wrapped(torch.Tensor, READS, wrap):
        yield reads


def grads(seed, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (n, s) in enumerate(SHAPES.items()):
        g = torch.randn(s, generator=gen, dtype=torch.float64) * 0.01 * (1 + i)
        g.view(-1)[0] *= 50.0 * (1 + seed)           # a heavy entry: the clips and SPAMP's power act
        out[n] = (g * scale).to(dtype)
    return out


class Model:
    """GradientShaper over fixed parameters; ``step`` counts the reads and the statistics passes."""

    def __init__(self, shaper, dtype=torch.float32, granularity=None):
        gen = torch.Generator().manual_seed(1)
        self.params = {n: torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for n, s in SHAPES.items()}
        self.gs = GradientShaper(self.params.items(), shaper, granularity=granularity)
        self.dtype = dtype

    def step(self, seed, scale=1.0, gate=None, grad=None, defer=False):
        for n, p in self.params.items():
            p.grad = grads(seed, self.dtype, scale)[n] if grad is None else grad(p)
        passes = [0]
        orig = SliceSet.compute
        with counting_reads() as reads:
            def compute(ss, needs, *premap):
                passes[0] += 1
                n0 = reads.n
                out = orig(ss, needs, *premap)
                reads.in_stats += reads.n - n0
                return out
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(SliceSet, "compute", compute)
                if gate is not None or defer:
                    session = self.gs.session
                    mp.setattr(session, "step", lambda ss, _s=ShapingSession.step: _s(session, ss, gate, defer))
                rec = self.gs.apply_(scale)
        return rec, reads, passes[0]


def method(name):
    return build_shaper(name, ACTIVE[name])


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1.0), (torch.bfloat16, 1.0), (torch.float32, 1024.0)])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_one_read_per_step(name, dtype, scale):
    m = Model(method(name), dtype)
    m.step(0, scale)                                # first step: EMAs and warm-ups start
    rec, reads, passes = m.step(1, scale)
    assert rec is not None
    assert reads.n == 1 and reads.in_stats == 0, reads.where
    # the map really ran for the elementwise methods (its statistics pass follows it), except
    # value_clip without a loss scale: its clamp's sums come from the first pass (premap)
    one_pass = name == "value_clip" and scale == 1.0
    assert passes == (2 if name in ELEMENTWISE and not one_pass else 1)
    if one_pass:        # the clamp ran: every entry within the clip (rounded to the storage dtype)
        bound = torch.tensor(ACTIVE[name]["clip_value"], dtype=torch.float32).to(dtype)
        assert all(bool((p.grad.abs() <= bound).all()) for p in m.params.values())
        assert max(float(p.grad.abs().max()) for p in m.params.values()) == float(bound)


@pytest.mark.parametrize("shaper,why", [
    (lambda: ValueClip(10.0), "the group norms bound every entry by the clip"),
    (lambda: build_shaper("spamp", {}), "the first step: tau = n, alpha = 1"),
    (lambda: build_shaper("entrywise_shrink", {"threshold": math.inf}), "an infinite threshold"),
])
def test_shortcut_without_the_map_reads_once(shaper, why):
    m = Model(shaper())
    before = grads(0)
    rec, reads, passes = m.step(0)
    assert reads.n == 1 and passes == 1, why
    assert rec is not None
    if isinstance(m.gs.session.shaper.shapers[0], ValueClip):      # the session holds a chain of one
        for n, p in m.params.items():
            assert torch.equal(p.grad, before[n])


@pytest.mark.parametrize("kernels", ["0", "1"])
def test_zero_gradient_shrink_skips_the_map_with_one_read(kernels, monkeypatch):
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", kernels)
    if kernels == "1" and not sum_kernels.available():
        pytest.skip("no C compiler: the torch path is the only one")
    m = Model(build_shaper("entrywise_shrink", {"threshold": 2.0}))
    rec, reads, passes = m.step(0, grad=torch.zeros_like)
    assert rec is not None and passes == 1
    if kernels == "0":
        # torch path: all-zero chunks take the CPU statistics' exact pass, which reads which
        # chunks need it (a CPU-only read: accelerators reduce in float64 directly)
        assert reads.in_stats >= 1 and reads.n - reads.in_stats == 1
    else:
        # the sum kernel's float64 partials need no exact pass: no read in the statistics
        assert reads.in_stats == 0 and reads.n == 1, reads.where
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in m.params.values())


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_veto_reads_once_and_leaves_gradient_and_state(name):
    m = Model(method(name))
    m.step(0)
    state = m.gs.session.state
    steps = m.gs.session.steps
    rec, reads, _ = m.step(1, gate=lambda stats: torch.tensor(2, dtype=torch.long))
    assert rec is None and reads.n == 1
    assert m.gs.session.last_code == 2 and m.gs.session.skipped == 1 and m.gs.session.steps == steps
    assert m.gs.session.state is state
    for n, p in m.params.items():
        assert torch.equal(p.grad, grads(1)[n])
    # information bits above the veto mask are read in the same copy and do not skip
    rec, reads, _ = m.step(2, gate=lambda stats: torch.tensor(256, dtype=torch.long))
    assert rec is not None and reads.n == 1 and m.gs.session.last_code == 256


def test_overflow_skips_with_state_untouched():
    m = Model(method("value_clip"))
    m.step(0)
    state = m.gs.session.state
    g = grads(1)
    g["l0.bias"][3] = float("inf")
    for n, p in m.params.items():
        p.grad = g[n].clone()
    assert m.gs.apply_() is None
    assert m.gs.session.state is state and m.gs.session.last_code & 1
    for n, p in m.params.items():
        assert torch.equal(p.grad, g[n])


@pytest.mark.parametrize("members,expected", [
    (("norm_clip", "value_clip"), 1),            # the decision rides on value_clip's read
    (("gradient_stabilizer", "zclip"), 1),       # pure scales: the decision alone, after them
    (("value_clip", "spamp"), 2),                # one read per elementwise member
    (("spamp", "norm_clip"), 1),
])
def test_chain_reads_at_most_one_per_elementwise_member(members, expected):
    m = Model(chain(*(method(n) for n in members)))
    m.step(0)
    rec, reads, _ = m.step(1)
    assert rec is not None and reads.n == expected, reads.where
    assert expected == max(1, sum(n in ELEMENTWISE for n in members))


class HostBranchValueClip(ValueClip):
    """value_clip with the host branch this issue removed put back."""

    def update(self, stats, state):
        if bool((stats.sumsq <= self.clip_value ** 2).all()):
            pass
        return super().update(stats, state)


def test_control_a_host_branch_in_a_shaper_is_counted():
    m = Model(HostBranchValueClip(1e-3))
    m.step(0)
    _, reads, _ = m.step(1)
    assert reads.n == 2 and "__bool__" in reads.where


def test_control_reads_not_folded_into_one_copy_are_counted(monkeypatch):
    # the decision, the shortcut flag and the map's parameters read one by one, as before issue 11
    monkeypatch.setattr(SliceSet, "read_plan", lambda self, plan, extra=(): (plan.resolve(), [int(e) for e in extra]))
    m = Model(method("value_clip"))
    m.step(0)
    _, reads, _ = m.step(1)
    assert reads.n == 3 and sorted(reads.where) == ["__bool__", "__int__", "tolist"]


PURE_SCALE = sorted(set(REGISTRY) - ELEMENTWISE)


@pytest.mark.parametrize("name", PURE_SCALE)
def test_deferred_decision_reads_nothing_and_a_veto_keeps_the_state(name):
    """``defer=True`` (the DeepSpeed hook where the optimizer checks the norm itself): a pure
    scale makes no read; the result equals the undeferred step's, and a vetoed step (a
    non-finite entry) leaves the gradient and, once resolved, the state as they were."""
    ref, m = Model(method(name)), Model(method(name))
    for x in (ref, m):
        x.step(0)
    want, _, _ = ref.step(1)
    rec, reads, _ = m.step(1, defer=True)
    assert reads.n == 0, reads.where
    session = m.gs.session
    assert session.pending_veto is not None and not bool(session.pending_veto)
    assert session.resolve(False) is rec and session.steps == 2 and session.last_code == 0
    assert session.pending_veto is None
    assert torch.equal(rec.factor, want.factor)
    for a, b in zip(session.state, ref.gs.session.state):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for n, p in m.params.items():
        assert torch.equal(p.grad, ref.params[n].grad)

    # a veto: the step still reads nothing, every factor is 1, the state is selected on the device
    old, before, reads = _vetoed_deferred_step(m)
    # (the CPU statistics read which chunks to recompute exactly: the inf rows; not the step)
    assert reads.n - reads.in_stats == 0, reads.where
    for n, p in m.params.items():
        assert torch.equal(p.grad, before[n])
    assert session.resolve(True) is None and session.skipped == 1 and session.steps == 2
    assert session.last_code & 1 and session.last is None
    assert _same_state(session.state, old)


def _vetoed_deferred_step(m):
    """One deferred step on a gradient with one non-finite entry (the other tensors finite, so
    a per-tensor shaper's own mask would still update their groups)."""
    old = [[t.clone() for t in st] for st in m.gs.session.state]
    g = grads(2)
    g["l0.bias"][3] = math.inf
    names = {id(q): k for k, q in m.params.items()}
    _, reads, _ = m.step(2, grad=lambda p: g[names[id(p)]].clone(), defer=True)
    assert bool(m.gs.session.pending_veto)
    return old, g, reads


def _same_state(state, old):
    return all(torch.equal(x, y) for a, b in zip(state, old) for x, y in zip(a, b))


def test_control_a_deferred_veto_without_the_select_changes_the_state(monkeypatch):
    """The state check above can fail: a deferral that keeps the new state is caught."""
    def broken(self, code, state, record):
        self.state, self.pending_veto, self._pending_code, self.last = state, (code & 0xFF) != 0, code, record
        return record
    monkeypatch.setattr(ShapingSession, "_defer", broken)
    m = Model(method("gradient_stabilizer"))
    m.step(0)
    old, _, _ = _vetoed_deferred_step(m)
    m.gs.session.resolve(True)
    assert not _same_state(m.gs.session.state, old)


def test_deferred_step_must_be_resolved():
    m = Model(method("norm_clip"))
    m.step(0, defer=True)
    with pytest.raises(RuntimeError, match="not resolved"):
        m.step(1, defer=True)
