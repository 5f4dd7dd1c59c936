"""Run a shaper at a coarser granularity than the chain it sits in.

``chain(gradient_stabilizer, norm_clip)`` wants per-tensor statistics for the first member and
one global norm for the second. The chain works on the finest groups (tensors); a
:class:`Regrouped` member sums those statistics into its own groups (sums of squares and of
absolute values are additive; unit statistics do not change), runs the inner shaper there, and
expands its plan back: every tensor of a coarse group gets that group's factor.
"""
from __future__ import annotations

import copy
from typing import Dict, NamedTuple

import torch

from .base import GroupLayout, Plan, Shaper, Stats, segment_sum


class Regrouped(Shaper):
    def __init__(self, inner: Shaper, index: torch.Tensor, layout: GroupLayout):
        """``index[l]``: the coarse group of fine group l; ``layout``: the coarse layout."""
        self.inner = inner
        self.index = index
        self.coarse = layout
        self.name = inner.name
        self.needs = inner.needs
        self.hparams = inner.hparams
        self.default_granularity = inner.default_granularity
        for k in inner.hparams:
            setattr(self, k, getattr(inner, k))

    def state_layout(self, layout: GroupLayout) -> GroupLayout:
        return self.coarse

    def init(self, layout: GroupLayout) -> NamedTuple:
        return self.inner.init(self.coarse)

    def _coarse_stats(self, s: Stats) -> Stats:
        L = self.coarse.num_groups
        idx = self.index.to(s.sumsq.device if s.sumsq is not None else self.index.device)
        agg = (lambda t: None if t is None else segment_sum(t, idx, L))
        return Stats(agg(s.sumsq), agg(s.sumabs), s.unit_sumsq, s.unit_param_sumsq)

    def update(self, stats: Stats, state):
        plan, state = self.inner.update(self._coarse_stats(stats), state)
        idx = self.index.to(plan.scale.device)
        elementwise = plan.elementwise
        if elementwise is not None:
            elementwise = copy.copy(elementwise)
            elementwise.params = {k: v[idx] for k, v in plan.elementwise.params.items()}
        finish = None
        if plan.finish is not None:
            inner_finish = plan.finish
            finish = (lambda s: inner_finish(self._coarse_stats(s))[idx])
        return Plan(plan.scale[idx], plan.unit_scale, elementwise, finish, plan.skip_map), state

    def diagnostics(self, prev, new) -> Dict[str, torch.Tensor]:
        """None per fine group: the inner shaper's numbers cover a block or the whole model,
        not the group they would be compared with."""
        return {}

    def __repr__(self) -> str:
        return f"{self.inner!r}@{self.coarse.num_groups}groups"
