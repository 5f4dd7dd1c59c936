"""One shaper, its state and its grouping: the object every front end drives.

The same :class:`ShapingSession` runs the single-process reference (:mod:`megatron_shaping.torch_api`)
and the DeepSpeed integration; only the :class:`~megatron_shaping.stats.slices.SliceSet` differs.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .shapers import Chain, Shaper, StepRecord, build_shaper
from .shapers.regroup import Regrouped
from .shapers.base import Plan, Stats
from .stats.layout import ParamGrouping, ParamInfo, build_grouping
from .stats.slices import Premap, SliceSet

logger = logging.getLogger("megatron_shaping")

STATE_FORMAT_VERSION = 1
#: Step flags (:attr:`ShapingSession.last_code`): bits in this mask skip the step (bit 1: the
#: gradient is not finite); higher bits are information a gate passes to its caller.
VETO_MASK = 0xFF


def shaper_from_spec(spec: Dict[str, Any]) -> Shaper:
    """``{"type": ..., "params": {...}}`` or ``{"type": "chain", "shapers": [spec, ...]}``.
    Chain members may carry their own ``granularity``, kept in the chain's ``granularities``
    (see :class:`ShapingSession`)."""
    if spec.get("type") == "chain":
        members = spec["shapers"]
        return Chain(*(shaper_from_spec(s) for s in members),
                     granularities=[s.get("granularity") or None for s in members])
    return build_shaper(spec["type"], spec.get("params") or {})


class _Vetoed(Exception):
    """The step's decision skips it (raised inside Chain.step, before anything was applied
    that the veto did not neutralise)."""


class ShapingSession:
    """Holds the shaper state and runs one shaping step on a set of local slices.

    ``shaper`` is always a :class:`~megatron_shaping.shapers.base.Chain` (a single shaper is a
    chain of one) and ``state`` the tuple of its member states. A member's granularity is its
    own in the chain (``Chain.granularities``), else ``granularity``, else the member's default.
    """

    def __init__(self, shaper: Shaper, params: Sequence[ParamInfo], granularity: Optional[str] = None,
                 block_pattern: Optional[str] = None, device=None):
        self.block_pattern = block_pattern
        configured = Chain(shaper)
        grans = [g or granularity or m.default_granularity for m, g in configured.chain_members()]
        # Mixed granularities: the chain runs on the finest groups (tensors) and each coarser
        # member sums the statistics into its own groups.
        self.granularity = grans[0] if len(set(grans)) == 1 else "tensor"
        self.grouping: ParamGrouping = build_grouping(params, self.granularity, block_pattern, device)
        # Each session works on its own copy of every member: init() keeps layout facts on the
        # instance (element counts, AGC's unit map), so an instance shared by two sessions (or
        # given twice in one chain) would otherwise serve the last layout to both.
        members = [copy.copy(m) for m in configured.shapers]
        self.shaper = Chain(*(m if g == self.granularity else self._regrouped(m, g, params, block_pattern, device)
                              for m, g in zip(members, grans)), granularities=grans)
        self.state = self.shaper.init(self.grouping.layout)
        #: the first member's map when known before the statistics (host values read once)
        self.premap: Optional[Premap] = Premap.of(self.shaper.premap(self.grouping.layout))
        self.steps = 0           # shaping steps applied
        self.skipped = 0         # steps skipped (gradient not finite, or a gate's veto)
        self.last_code = 0       # flags of the last step (see step)
        self.last: Optional[StepRecord] = None
        #: 0-d bool of a deferred step's decision until :meth:`resolve` (see :meth:`step`)
        self.pending_veto: Optional[torch.Tensor] = None
        self._pending_code: Optional[torch.Tensor] = None

    @staticmethod
    def _regrouped(member: Shaper, granularity: str, params, block_pattern, device) -> Regrouped:
        """``member`` run at ``granularity`` inside a chain on tensor groups."""
        coarse = build_grouping(params, granularity, block_pattern, device)
        # fine group ids follow parameter order at tensor granularity
        index = torch.tensor([coarse.group_of[p.name] for p in params], dtype=torch.long, device=device)
        return Regrouped(member, index, coarse.layout)

    @property
    def layout(self):
        return self.grouping.layout

    def step(self, slices: SliceSet, gate: Optional[Callable[[Stats], Optional[torch.Tensor]]] = None,
             defer: bool = False) -> Optional[StepRecord]:
        """Shape the gradient held by ``slices`` in place. A non-finite gradient (overflow) is
        left untouched with the state, and None is returned: the caller skips the update.

        ``gate(stats)`` (optional) sees the reduced statistics of the incoming gradient and
        returns None or a 0-d int64 tensor of bit flags (non-zero: skip, e.g. the spike rule of
        :mod:`megatron_shaping.spike_skip`). ``last_code`` holds the step's flags; bits in
        :data:`VETO_MASK` skip it.

        One host read per step for a single shaper: the (functional) shaper update runs before
        the decision, and the decision is read with the plan's host values
        (:meth:`SliceSet.read_plan`); a pure scale reads nothing itself, so its plan is applied
        with the decision still on the device (a veto makes every factor 1) and the decision is
        read after it. A veto drops the new state: the state and the gradient stay untouched.

        ``defer``: a caller whose optimizer step reads a validity flag of its own (DeepSpeed's
        check of the global norm) may take the decision there instead. When nothing read it
        (pure scales, no gate flags), the step reads nothing: the state is selected on the
        device (the old one on a veto), ``pending_veto`` holds the 0-d decision, and the
        caller must call :meth:`resolve` with whether the step was skipped before the next
        step (the record is returned as for an applied step)."""
        if self.pending_veto is not None:
            raise RuntimeError("ShapingSession.step: the previous deferred step was not resolved")
        needs = self.shaper.first_needs
        # a map known before the statistics: its sums of squares from the same pass and collective
        first = [slices.compute(needs) if self.premap is None else slices.compute(needs, self.premap)]
        code = (~torch.isfinite(first[0].sumsq).all()).long()
        flags = gate(first[0]) if gate is not None else None
        pending = [code | flags if flags is not None else code]

        def compute(n):
            # The finiteness check already ran the first statistics pass: hand it over.
            return first.pop() if first and n <= needs else slices.compute(n)

        try:
            state, record = self.shaper.step(self.state, self.layout, compute, slices.apply,
                                             lambda plan: self._read_plan(slices, plan, pending))
            if pending and defer and flags is None:
                return self._defer(pending.pop(), state, record)
            if pending:
                self._decide(int(pending.pop()))      # pure scales only: the step's one host read
        except _Vetoed:
            slices.discard_plan()
            self.skipped += 1
            self.last = None
            return None
        self.state = state
        self.steps += 1
        self.last = record
        return record

    def _defer(self, code: torch.Tensor, state, record: StepRecord) -> StepRecord:
        """The decision left on the device: the state selected there (the veto keeps the old)."""
        veto = (code & VETO_MASK) != 0
        self.state = tuple(type(n)(*(torch.where(veto, a, b) for a, b in zip(o, n)))
                           for o, n in zip(self.state, state))
        self.pending_veto = veto
        self._pending_code = code
        self.last = record
        return record

    def resolve(self, skipped: bool) -> Optional[StepRecord]:
        """End a deferred step: ``skipped`` is whether the optimizer skipped it (its own read of
        the validity flag). A skip reads the step's flags (host reads are fine then); an applied
        step had none, since a veto makes the norm the caller checks invalid. Returns the
        record, or None for a step that was vetoed."""
        code, self.pending_veto, self._pending_code = self._pending_code, None, None
        self.last_code = int(code) if skipped else 0
        if self.last_code & VETO_MASK:
            self.skipped += 1
            self.last = None
            return None
        self.steps += 1
        return self.last

    def _read_plan(self, slices: SliceSet, plan, pending: list):
        """A plan as it runs; the first one that reads host values also reads the decision."""
        if not pending:
            return slices.read_plan(plan)[0]
        if plan.is_pure_scale and plan.skip_map is None:
            veto = (pending[0] & VETO_MASK) != 0
            keep = (lambda t: None if t is None else torch.where(veto, torch.ones_like(t), t))
            return Plan(keep(plan.scale), keep(plan.unit_scale))
        plan, (code,) = slices.read_plan(plan, [pending.pop()])
        self._decide(int(code))
        return plan

    def _decide(self, code: int) -> None:
        self.last_code = code
        if code & VETO_MASK:
            raise _Vetoed()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Shaper state keyed by group name (parameter names at tensor granularity)."""
        members: List[Dict[str, Any]] = []
        for member, st in zip(self.shaper.shapers, self.state):
            members.append({"type": member.name, "hparams": {k: getattr(member, k) for k in member.hparams},
                            "groups": list(member.state_layout(self.layout).names),
                            "fields": {f: t.detach().cpu().clone() for f, t in st._asdict().items()}})
        return {"format_version": STATE_FORMAT_VERSION, "granularity": self.granularity,
                "groups": list(self.layout.names), "num_units": int(self.layout.unit_group.numel()),
                "members": members, "steps": self.steps, "skipped": self.skipped}

    def load_state_dict(self, sd: Dict[str, Any], source: str = "state_dict") -> None:
        """Restore state saved by :meth:`state_dict`, remapping groups by name. Any mismatch
        (format, method, granularity, group set) raises ValueError naming the difference."""
        if not isinstance(sd, dict) or "format_version" not in sd:
            raise ValueError(f"{source}: not a megatron-shaping shaper state (no format_version)")
        if sd["format_version"] != STATE_FORMAT_VERSION:
            raise ValueError(f"{source}: shaper state format_version {sd['format_version']} is not supported "
                             f"(this version reads {STATE_FORMAT_VERSION})")
        lacking = [k for k in ("granularity", "groups", "members") if k not in sd] + [
            f"members[{i}].{k}" for i, m in enumerate(sd.get("members", ())) for k in ("type", "fields") if k not in m]
        if lacking:
            raise ValueError(f"{source}: shaper state lacks {lacking}")
        if sd["granularity"] != self.granularity:
            raise ValueError(f"{source}: saved granularity {sd['granularity']!r} != configured {self.granularity!r}")
        mine_types = [m.name for m in self.shaper.shapers]
        saved_types = [m["type"] for m in sd["members"]]
        if saved_types != mine_types:
            raise ValueError(f"{source}: saved shaper {saved_types} != configured {mine_types}")
        saved, mine = list(sd["groups"]), list(self.layout.names)
        if set(saved) != set(mine):
            missing = sorted(set(mine) - set(saved))[:5]
            extra = sorted(set(saved) - set(mine))[:5]
            raise ValueError(f"{source}: saved shaper state covers other layers: missing {missing}, "
                             f"unexpected {extra} ({len(saved)} saved vs {len(mine)} configured groups)")
        new_states = []
        for i, (member, m, st) in enumerate(zip(self.shaper.shapers, sd["members"], self.state)):
            m_saved = list(m.get("groups", saved))
            m_mine = list(member.state_layout(self.layout).names)
            if set(m_saved) != set(m_mine):
                # (a member's own granularity is not in the file: its groups tell it)
                raise ValueError(
                    f"{source}: saved groups of chain member {i} ({m['type']}) differ from the configured ones "
                    f"(granularity {self.shaper.granularities[i]!r}: {len(m_mine)} groups, saved {len(m_saved)}): "
                    f"missing {sorted(set(m_mine) - set(m_saved))[:5]}, "
                    f"unexpected {sorted(set(m_saved) - set(m_mine))[:5]}; was the member's granularity changed?")
            # Rows are remapped by name only when the order differs (a model whose parameters
            # were registered in another order); then every field with one row per group is.
            order = None
            if m_saved != m_mine:
                order = torch.tensor([m_saved.index(n) for n in m_mine], dtype=torch.long)
            L = len(m_mine)
            fields = {}
            for f, cur in st._asdict().items():
                if f not in m["fields"]:
                    raise ValueError(f"{source}: shaper state of {m['type']} lacks field {f!r}")
                t = m["fields"][f]
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"{source}: field {m['type']}.{f} is not a tensor")
                if order is not None and t.dim() >= 1 and t.shape[0] == L and cur.dim() >= 1 and cur.shape[0] == L:
                    t = t.index_select(0, order)
                if t.shape != cur.shape:
                    raise ValueError(f"{source}: field {m['type']}.{f} has shape {tuple(t.shape)}, "
                                     f"expected {tuple(cur.shape)}")
                fields[f] = t.to(device=cur.device, dtype=cur.dtype)
            new_states.append(type(st)(**fields))
        self.state = tuple(new_states)
        self.steps = int(sd.get("steps", 0))
        self.skipped = int(sd.get("skipped", 0))
