"""One shaper, its state and its grouping: the object every front end drives.

The same :class:`ShapingSession` runs the single-process reference (:mod:`megatron_shaping.torch_api`)
and the DeepSpeed integration; only the :class:`~megatron_shaping.stats.slices.SliceSet` differs.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import torch

from .shapers import Chain, Shaper, StepRecord, as_chain, build_shaper, chain, run_shapers
from .stats.layout import ParamGrouping, ParamInfo, build_grouping
from .stats.slices import SliceSet

logger = logging.getLogger("megatron_shaping")

STATE_FORMAT_VERSION = 1


def shaper_from_spec(spec: Dict[str, Any]) -> Shaper:
    """``{"type": ..., "params": {...}}`` or ``{"type": "chain", "shapers": [spec, ...]}``."""
    if spec.get("type") == "chain":
        return chain(*(shaper_from_spec(s) for s in spec["shapers"]))
    return build_shaper(spec["type"], spec.get("params") or {})


class ShapingSession:
    """Holds the shaper state and runs one shaping step on a set of local slices."""

    def __init__(self, shaper: Shaper, params: Sequence[ParamInfo], granularity: Optional[str] = None,
                 block_pattern: Optional[str] = None, device=None):
        self.shaper = shaper
        self.granularity = granularity or as_chain(shaper).default_granularity
        self.block_pattern = block_pattern
        self.grouping: ParamGrouping = build_grouping(params, self.granularity, block_pattern, device)
        self.state = shaper.init(self.grouping.layout)
        self.steps = 0           # shaping steps applied
        self.skipped = 0         # steps skipped because the gradient was not finite
        self.last: Optional[StepRecord] = None

    @property
    def layout(self):
        return self.grouping.layout

    def step(self, slices: SliceSet) -> Optional[StepRecord]:
        """Shape the gradient held by ``slices`` in place. A non-finite gradient (overflow) is
        left untouched with the state, and None is returned: the caller skips the update."""
        probe = slices.compute(frozenset({"sumsq"}))
        if not bool(torch.isfinite(probe.sumsq).all()):
            self.skipped += 1
            self.last = None
            return None
        first = [probe]

        def compute(needs):
            # The probe already holds the first pass's sum of squares: reuse it when enough.
            if first and needs <= {"sumsq"}:
                return first.pop()
            first.clear()
            return slices.compute(needs)

        self.state, record = run_shapers(self.shaper, self.state, self.layout, compute, slices.apply)
        self.steps += 1
        self.last = record
        return record

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Shaper state keyed by group name (parameter names at tensor granularity)."""
        ch = as_chain(self.shaper)
        states = self.state if isinstance(self.shaper, Chain) else (self.state,)
        members: List[Dict[str, Any]] = []
        for member, st in zip(ch.shapers, states):
            members.append({"type": member.name, "hparams": {k: getattr(member, k) for k in member.hparams},
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
        if sd["granularity"] != self.granularity:
            raise ValueError(f"{source}: saved granularity {sd['granularity']!r} != configured {self.granularity!r}")
        ch = as_chain(self.shaper)
        saved_types = [m["type"] for m in sd["members"]]
        if saved_types != [m.name for m in ch.shapers]:
            raise ValueError(f"{source}: saved shaper {saved_types} != configured {[m.name for m in ch.shapers]}")
        saved, mine = list(sd["groups"]), list(self.layout.names)
        if set(saved) != set(mine):
            missing = sorted(set(mine) - set(saved))[:5]
            extra = sorted(set(saved) - set(mine))[:5]
            raise ValueError(f"{source}: saved shaper state covers other layers: missing {missing}, "
                             f"unexpected {extra} ({len(saved)} saved vs {len(mine)} configured groups)")
        order = torch.tensor([saved.index(n) for n in mine], dtype=torch.long)
        L = len(mine)
        states = self.state if isinstance(self.shaper, Chain) else (self.state,)
        new_states = []
        for m, st in zip(sd["members"], states):
            fields = {}
            for f, cur in st._asdict().items():
                if f not in m["fields"]:
                    raise ValueError(f"{source}: shaper state of {m['type']} lacks field {f!r}")
                t = m["fields"][f]
                if t.dim() >= 1 and t.shape[0] == L and cur.dim() >= 1 and cur.shape[0] == L:
                    t = t.index_select(0, order)
                if t.shape != cur.shape:
                    raise ValueError(f"{source}: field {m['type']}.{f} has shape {tuple(t.shape)}, "
                                     f"expected {tuple(cur.shape)}")
                fields[f] = t.to(device=cur.device, dtype=cur.dtype)
            new_states.append(type(st)(**fields))
        self.state = tuple(new_states) if isinstance(self.shaper, Chain) else new_states[0]
        self.steps = int(sd.get("steps", 0))
        self.skipped = int(sd.get("skipped", 0))
