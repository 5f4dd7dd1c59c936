"""The shaper contract: statistics in, a plan out, state carried explicitly.

A shaper is an optax-style pair of pure functions over small per-group tensors:

    state = shaper.init(layout)
    plan, state = shaper.update(stats, state)

``stats`` are per-group statistics of the *true* (loss-scale-free) gradient, already reduced
over every shard that holds a piece of the group. ``plan`` says what to do to each group's
gradient. Nothing here knows where the gradient lives (one GPU, ZeRO partitions, TP shards,
pipeline stages): that is `megatron_shaping.stats`'s job. No collectives and no DeepSpeed
import here (tests/shapers/test_shaper_imports.py scans this package for both).

A *group* is the unit a shaper keeps statistics for: one tensor (granularity ``tensor``), a
block of tensors (``block``, e.g. one transformer layer) or the whole model (``global``).
A *unit* is a row of a weight (AGC's unit-wise norm); vectors are one unit each.

Why float64: statistics and state are one value per group (a few hundred numbers), and float64
keeps a sum of squares and a second moment finite for gradient spikes up to ~1e150 and
non-zero for gradients down to ~1e-150. In float32 a single 1e20 entry already makes
``sum(g**2)`` infinite and poisons an EMA forever.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch

STAT_DTYPE = torch.float64

# Statistics a shaper may ask for (``Shaper.needs``).
SUMSQ = "sumsq"                        # sum of g^2 per group
SUMABS = "sumabs"                      # sum of |g| per group
UNIT_SUMSQ = "unit_sumsq"              # sum of g^2 per unit (row)
UNIT_PARAM_SUMSQ = "unit_param_sumsq"  # sum of w^2 per unit (row)
ALL_STATS = (SUMSQ, SUMABS, UNIT_SUMSQ, UNIT_PARAM_SUMSQ)


class GroupLayout(NamedTuple):
    """What a shaper needs to know about the groups, independent of sharding."""
    names: Tuple[str, ...]          # group names, the keys of the saved state
    numel: torch.Tensor             # [L] float64, elements per group (whole model, all shards)
    unit_group: torch.Tensor        # [U] int64, group of each unit (row); U >= L
    unit_numel: torch.Tensor        # [U] float64, elements per unit

    @property
    def num_groups(self) -> int:
        return len(self.names)

    @property
    def device(self) -> torch.device:
        return self.numel.device


def make_layout(names: Sequence[str], numel: Sequence[float], units_per_group: Optional[Sequence[int]] = None,
                unit_numel: Optional[Sequence[float]] = None, device: Any = "cpu",
                unit_group: Optional[Sequence[int]] = None) -> GroupLayout:
    """Build a layout (the one constructor: tests and :func:`megatron_shaping.stats.layout.build_grouping`).

    Units are given either as ``unit_group`` (the group of each unit, in unit order, with
    ``unit_numel``) or as ``units_per_group`` (units numbered group after group); without
    either, each group is one unit."""
    L = len(names)
    if unit_group is not None and units_per_group is not None:
        raise ValueError("make_layout: give unit_group or units_per_group, not both")
    if unit_group is None:
        if units_per_group is None:
            units_per_group = [1] * L
            unit_numel = list(numel)
        unit_group = torch.repeat_interleave(torch.arange(L), torch.tensor(list(units_per_group), dtype=torch.long))
    return GroupLayout(tuple(names), torch.tensor(list(numel), dtype=STAT_DTYPE, device=device),
                       torch.as_tensor(unit_group, dtype=torch.long).to(device),
                       torch.tensor(list(unit_numel), dtype=STAT_DTYPE, device=device))


class Stats(NamedTuple):
    """Per-group statistics of the true gradient, reduced over all shards. Absent ones are None."""
    sumsq: Optional[torch.Tensor] = None             # [L] sum of g^2
    sumabs: Optional[torch.Tensor] = None            # [L] sum of |g|
    unit_sumsq: Optional[torch.Tensor] = None        # [U] sum of g^2 per unit
    unit_param_sumsq: Optional[torch.Tensor] = None  # [U] sum of w^2 per unit
    #: [L] sum of premap(g)^2 (:meth:`Shaper.premap`), taken in the same pass; the first
    #: statistics of a step only, and only where the driver could take them exactly
    mapped_sumsq: Optional[torch.Tensor] = None

    def norm(self) -> torch.Tensor:
        """[L] L2 norm of each group."""
        return self.sumsq.sqrt()

    def global_norm(self) -> torch.Tensor:
        """Scalar L2 norm of the whole gradient."""
        return self.sumsq.sum().sqrt()


class Elementwise:
    """An elementwise map g -> f(g) with per-group parameters, run on true gradient values in fp32.

    ``params`` are [L] tensors; the driver passes each slice its group's values as floats.
    Subclasses implement ``apply(g, **group_params)`` and must keep f(0) = 0 and sign(f(g)) = sign(g).

    ``exact_in_storage``: True for a map whose result, rounded to a 16-bit storage dtype, equals
    the map run in that dtype on the stored values (a clamp: rounding is monotone and leaves
    stored values unchanged, so round(clamp(g, lo, hi)) = clamp(g, round(lo), round(hi))); the
    driver may then skip the fp32 copy when no loss scale has to be divided out.
    """
    exact_in_storage = False

    def __init__(self, **params: torch.Tensor):
        self.params = params

    def apply(self, g: torch.Tensor, **group_params: float) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class Plan(NamedTuple):
    """What to do to each group's gradient, in order:

    1. multiply group l by ``scale[l]`` and, if present, unit u by ``unit_scale[u]``;
    2. if ``elementwise`` is set, replace every entry g by elementwise.apply(g, group params);
    3. if ``finish`` is set, compute the statistics of the result again (a second reduction) and
       multiply group l by ``finish(stats_after)[l]``.

    ``skip_map`` (a 0-d bool tensor, optional) is a shaper's shortcut decided on the device: when
    true, the plan is the pure scale (``scale``, ``unit_scale``) alone, without the map, the
    finish and their statistics pass (the shaper then puts the shortcut's factors in ``scale``).
    The driver reads it with the plan's other host values in one copy (:meth:`resolve`).

    ``after_sumsq`` ([L] float64, optional): the group sums of squares of the gradient after
    the whole plan, when the shaper knows them before it runs (its map is its
    :meth:`Shaper.premap`, whose sums the first statistics pass took: ``Stats.mapped_sumsq``).
    A chain then uses them instead of a statistics pass after the map (:meth:`Chain.step`);
    :meth:`resolve` drops them with the map when ``skip_map`` fires.
    """
    scale: torch.Tensor                              # [L] float64
    unit_scale: Optional[torch.Tensor] = None        # [U] float64
    elementwise: Optional[Elementwise] = None
    finish: Optional[Callable[[Stats], torch.Tensor]] = None
    skip_map: Optional[torch.Tensor] = None          # 0-d bool
    after_sumsq: Optional[torch.Tensor] = None       # [L] float64

    @property
    def is_pure_scale(self) -> bool:
        return self.elementwise is None and self.finish is None

    def resolve(self, skip: Optional[bool] = None) -> "Plan":
        """The plan as it runs once ``skip_map`` is known (``skip``; None: read it here, one
        host read): the pure scale when it is true, else this plan without ``skip_map``."""
        if self.skip_map is None:
            return self
        if skip is None:
            skip = bool(self.skip_map)
        return Plan(self.scale, self.unit_scale) if skip else self._replace(skip_map=None)


class Shaper:
    """Base class. Subclasses set ``name``, ``needs``, ``default_granularity`` and implement
    ``init`` and ``update``. ``State`` is a NamedTuple of per-group float64 tensors."""
    name: str = "shaper"
    needs: frozenset = frozenset({SUMSQ})
    default_granularity: str = "tensor"
    #: Hyperparameters in config order (for repr and the config docs).
    hparams: Tuple[str, ...] = ()

    def init(self, layout: GroupLayout) -> NamedTuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, stats: Stats, state: NamedTuple) -> Tuple[Plan, NamedTuple]:  # pragma: no cover
        raise NotImplementedError

    def premap(self, layout: GroupLayout) -> Optional[Elementwise]:
        """The map this shaper's plans apply when it is known before the statistics (fixed by
        the hyperparameters, a scale of ones before it), else None. A session asks once; the
        first statistics pass of each step then also takes the group sums of squares of the
        mapped gradient (``Stats.mapped_sumsq``, None where the driver cannot take them
        exactly) and the shaper hands them on as its plan's ``after_sumsq``: no statistics
        pass after the map. Only a chain's first member sees the incoming gradient: only its
        premap is asked for."""
        return None

    def state_layout(self, layout: GroupLayout) -> GroupLayout:
        """The groups this shaper keeps state for when it runs on ``layout``'s groups: those
        groups themselves (a member that sums them into coarser ones answers with its own)."""
        return layout

    def chain_members(self) -> Tuple[Tuple["Shaper", Optional[str]], ...]:
        """What this shaper puts into a :class:`Chain`: ``(member, granularity)`` pairs, a
        granularity of None meaning the session's. A single shaper is a chain of one."""
        return ((self, None),)

    def diagnostics(self, prev: NamedTuple, new: NamedTuple) -> Dict[str, torch.Tensor]:
        """What the monitors show of one step: named [L] series, NaN where a group has no value yet.

        ``prev`` is the state before the step, ``new`` the state after it. Keys the monitors read
        (:mod:`megatron_shaping.monitoring`), each optional:

        ``stat``       the method's running statistic of the group norm as it stood before the
                       step: the reference a spike of the incoming norm is measured against;
        ``threshold``  the norm the method let through or steered the group to on this step
                       (comparable with the norm after shaping).

        A method without a per-group norm statistic returns ``{}``. This default reads the
        first [L] state field named in :data:`GENERIC_STAT_FIELDS` (an EMA of the group norm
        by convention) as ``stat``, NaN where a ``count`` field is 0; methods override it with
        their own bias corrections and thresholds.
        """
        fields = prev._asdict() if hasattr(prev, "_asdict") else {}
        count = fields.get("count")
        for f in GENERIC_STAT_FIELDS:
            x = fields.get(f)
            if x is not None and x.dim() == 1:
                return {STAT: x if count is None else nan_where_not(x, count > 0)}
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.hparams)
        return f"{type(self).__name__}({args})"


#: Keys of :meth:`Shaper.diagnostics` the monitors read.
STAT = "stat"
THRESHOLD = "threshold"
#: State fields that, in a shaper without its own ``diagnostics``, hold an EMA of the group norm.
GENERIC_STAT_FIELDS = ("tau", "mean", "gamma")


# ----------------------------------------------------------------------------------------------
# helpers shared by the shapers


def finite_positive(x: torch.Tensor) -> torch.Tensor:
    """Mask of entries that are finite and > 0 (a group a shaper may learn from)."""
    return torch.isfinite(x) & (x > 0)


def keep_where(mask: torch.Tensor, new: NamedTuple, old: NamedTuple) -> NamedTuple:
    """Per-group select between two states of the same type: ``new`` where mask, else ``old``.

    Fields whose first dimension is not the number of groups (scalars, buffers) are taken whole
    from ``new`` if any group is selected, else from ``old``.
    """
    out = []
    for n, o in zip(new, old):
        if n.dim() >= 1 and n.shape[0] == mask.shape[0]:
            m = mask.view(-1, *([1] * (n.dim() - 1)))
            out.append(torch.where(m, n, o))
        else:
            out.append(torch.where(mask.any(), n, o))
    return type(new)(*out)


class StepCount(NamedTuple):
    """The state of a shaper that keeps no running statistic (norm, value and adaptive clipping):
    the steps each group was shaped (finite statistics), so that the state contract (a
    NamedTuple of per-group float64 tensors, round-tripped through checkpoints) holds for it."""
    count: torch.Tensor   # [L]

    @classmethod
    def zeros(cls, layout: GroupLayout) -> "StepCount":
        return cls(torch.zeros(layout.num_groups, dtype=STAT_DTYPE, device=layout.device))

    def counted(self, ok: torch.Tensor) -> "StepCount":
        """One more step for the groups where ``ok``; the others keep their count."""
        return keep_where(ok, StepCount(self.count + 1), self)


def nan_where_not(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x`` where ``valid``, NaN elsewhere (a diagnostic with no value yet)."""
    return torch.where(valid, x, torch.full_like(x, float("nan")))


def ones_like_groups(layout_or_stats: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(layout_or_stats, dtype=STAT_DTYPE)


def segment_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """out[i] = sum of values[j] with index[j] == i."""
    return torch.zeros(size, dtype=values.dtype, device=values.device).index_add_(0, index, values)


def derive_stats(stats: Stats, plan: Plan, layout: GroupLayout) -> Stats:
    """Statistics of the gradient after a pure-scale plan, without touching the gradient.

    Exact: scaling group l by s_l multiplies its sum of squares by s_l^2 and its sum of
    absolute values by |s_l|. A unit scale changes the group sums by the weighted unit sums,
    which needs the unit statistics (``unit_sumsq``); ``sumabs`` cannot be derived through a
    unit scale, so it is dropped (the caller then recomputes).
    """
    assert plan.is_pure_scale
    s = plan.scale
    sumsq, sumabs, unit_sumsq = stats.sumsq, stats.sumabs, stats.unit_sumsq
    if plan.unit_scale is not None:
        if unit_sumsq is None:
            raise ValueError("a unit-scale plan needs unit_sumsq to derive the next statistics")
        s_unit = s.index_select(0, layout.unit_group) * plan.unit_scale
        unit_sumsq = unit_sumsq * s_unit.square()
        sumsq = segment_sum(unit_sumsq, layout.unit_group, layout.num_groups)
        sumabs = None
    else:
        sumsq = None if sumsq is None else sumsq * s.square()
        sumabs = None if sumabs is None else sumabs * s.abs()
        unit_sumsq = None if unit_sumsq is None else unit_sumsq * s[layout.unit_group].square()
    return Stats(sumsq, sumabs, unit_sumsq, stats.unit_param_sumsq)


ComputeStats = Callable[[frozenset], Stats]
#: ``apply_plan(scale, unit_scale, elementwise)``, optionally ``stats_after=False`` (see :meth:`Chain.step`)
ApplyPlan = Callable[..., None]
ReadPlan = Callable[[Plan], Plan]


def _scaled_stats(stats: Stats, plan: Plan, layout: GroupLayout, needs: frozenset,
                  compute_stats: ComputeStats) -> Stats:
    """Statistics after the pure-scale ``plan`` was applied: derived exactly, or computed again
    when one of ``needs`` cannot be derived (see :func:`derive_stats`)."""
    derived = derive_stats(stats, plan, layout)
    if any(getattr(derived, k) is None for k in needs):
        return compute_stats(needs)
    return derived


class StepRecord(NamedTuple):
    """What one shaping step did, for logs and tests."""
    stats_before: Stats           # statistics of the incoming gradient
    factor: torch.Tensor          # [L] overall factor ||g_after|| / ||g_before|| per group
    stats_after: Stats            # statistics of the shaped gradient (sumsq at least)


class Chain(Shaper):
    """Shapers applied one after another; each sees the gradient its predecessors produced.

    Every session runs a chain (a single shaper is a chain of one); the state is always the
    tuple of member states. ``granularities[i]`` is member i's granularity (None: the
    session's). A chain is driven by :meth:`step`, which recomputes statistics only after an
    elementwise map (a pure scale's effect on the statistics is derived exactly, see
    :func:`derive_stats`).
    """
    name = "chain"

    def __init__(self, *shapers: Shaper, granularities: Optional[Sequence[Optional[str]]] = None):
        """Nested chains are flattened; ``granularities`` (one per argument) applies to the
        members of an argument that have none of their own."""
        granularities = tuple(granularities) if granularities is not None else (None,) * len(shapers)
        if len(granularities) != len(shapers):
            raise ValueError(f"chain(): {len(granularities)} granularities for {len(shapers)} shapers")
        pairs = [(m, mg or g) for s, g in zip(shapers, granularities) for m, mg in s.chain_members()]
        if not pairs:
            raise ValueError("chain() needs at least one shaper")
        self.shapers = tuple(m for m, _ in pairs)
        self.granularities = tuple(g for _, g in pairs)
        self.needs = frozenset().union(*(s.needs for s in self.shapers))
        #: what the first statistics pass computes: the members' needs and the sum of squares
        #: (the finiteness check, the record's norm before shaping)
        self.first_needs = self.needs | {SUMSQ}
        #: what the statistics after member i must hold: the needs of the members after it
        self._rest_needs = tuple(frozenset().union(*(s.needs for s in self.shapers[i + 1:])) | {SUMSQ}
                                 for i in range(len(self.shapers)))
        self.default_granularity = self.shapers[0].default_granularity

    def chain_members(self) -> Tuple[Tuple[Shaper, Optional[str]], ...]:
        return tuple(zip(self.shapers, self.granularities))

    def init(self, layout: GroupLayout) -> tuple:
        return tuple(s.init(layout) for s in self.shapers)

    def premap(self, layout: GroupLayout) -> Optional[Elementwise]:
        """The first member's (only it sees the incoming gradient the first pass reads), when
        the members after it need only sums of squares (else a pass follows its map anyway)."""
        return self.shapers[0].premap(layout) if self._rest_needs[0] == {SUMSQ} else None

    def update(self, stats: Stats, state: tuple):
        raise TypeError("a chain's members see the gradient their predecessors produced: drive it with "
                        "Chain.step, not update")

    def step(self, state: tuple, layout: GroupLayout, compute_stats: ComputeStats,
             apply_plan: ApplyPlan, read_plan: Optional[ReadPlan] = None) -> Tuple[tuple, StepRecord]:
        """One shaping step over a gradient the callbacks own; returns the new state (the tuple
        of member states) and a :class:`StepRecord`.

        ``compute_stats(needs)`` returns reduced statistics of the gradient as it is now (one
        collective per call in the distributed drivers). ``read_plan(plan)`` returns the plan as
        it runs (``skip_map`` resolved, :meth:`Plan.resolve` by default); the session reads its
        host values there, in one copy. ``apply_plan(scale, unit_scale, elementwise)`` changes
        the gradient in place; ``apply_plan(..., stats_after=False)`` when no statistics pass
        follows the map (the first member's ``after_sumsq`` stand for it: the members after
        it need only sums of squares), so the map need not prepare one.
        """
        stats = first = compute_stats(self.first_needs)
        new_states = []
        for i, (member, st, rest_needs) in enumerate(zip(self.shapers, state, self._rest_needs)):
            plan, st = member.update(self._seen_by(i, stats, first), st)
            plan = read_plan(plan) if read_plan is not None else plan.resolve()
            new_states.append(st)
            known = plan.after_sumsq is not None and not plan.is_pure_scale and rest_needs == {SUMSQ}
            if known:
                apply_plan(plan.scale, plan.unit_scale, plan.elementwise, stats_after=False)
            else:
                apply_plan(plan.scale, plan.unit_scale, plan.elementwise)
            if plan.is_pure_scale:
                stats = _scaled_stats(stats, plan, layout, rest_needs, compute_stats)
                continue
            stats = Stats(sumsq=plan.after_sumsq) if known else compute_stats(rest_needs)
            if plan.finish is not None:
                post = plan.finish(stats)
                apply_plan(post, None, None)
                stats = _scaled_stats(stats, Plan(post), layout, rest_needs, compute_stats)
        before = first.sumsq.sqrt()
        after = stats.sumsq.sqrt()
        factor = torch.where(before > 0, after / before.clamp_min(torch.finfo(STAT_DTYPE).tiny),
                             torch.ones_like(before))
        return tuple(new_states), StepRecord(first, factor, stats)

    @staticmethod
    def _seen_by(i: int, stats: Stats, first: Stats) -> Stats:
        """The statistics member ``i`` updates on: premap statistics are of the incoming
        gradient (``first``), so only the first member gets them."""
        return stats if i == 0 else stats._replace(mapped_sumsq=None)

    def diagnostics(self, prev: tuple, new: tuple) -> Dict[str, torch.Tensor]:
        """``stat`` of the first member only (the only one that sees the incoming gradient whose
        norm it is compared with); every other series from the last member that has it (for
        ``threshold``: the last bound the gradient went through, comparable with norm_after)."""
        out: Dict[str, torch.Tensor] = {}
        for i, (member, p, n) in enumerate(zip(self.shapers, prev, new)):
            for key, series in member.diagnostics(p, n).items():
                if series is not None and (key != STAT or i == 0):
                    out[key] = series
        return out

    def __repr__(self) -> str:
        # A chain of one is its member (the configured single shaper, as logs and checkpoint meta name it).
        if len(self.shapers) == 1:
            return repr(self.shapers[0])
        return "chain(" + ", ".join(map(repr, self.shapers)) + ")"


def chain(*shapers: Shaper, granularities: Optional[Sequence[Optional[str]]] = None) -> Chain:
    """Compose shapers left to right (see :class:`Chain`)."""
    return Chain(*shapers, granularities=granularities)
