"""Plain PyTorch, one process: the API users call without DeepSpeed, and the reference every
sharded test compares against.

    shaper = GradientShaper(model.named_parameters(), "gradient_stabilizer")
    loss.backward()
    shaper.apply_()          # shapes p.grad in place; returns the StepRecord (None if skipped)
    optimizer.step()
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple, Union

import torch

from .core import ShapingSession, shaper_from_spec
from .shapers import Shaper, build_shaper
from .stats.layout import ParamInfo
from .stats.slices import SliceSet, slices_from_params


class GradientShaper:
    def __init__(self, named_parameters: Iterable[Tuple[str, torch.nn.Parameter]],
                 shaper: Union[str, Shaper, Dict[str, Any]], params: Optional[Dict[str, Any]] = None,
                 granularity: Optional[str] = None, block_pattern: Optional[str] = None):
        self.named = [(n, p) for n, p in named_parameters if p.requires_grad]
        if isinstance(shaper, str):
            shaper = build_shaper(shaper, params)
        elif isinstance(shaper, dict):
            shaper = shaper_from_spec(shaper)
        device = self.named[0][1].device if self.named else None
        infos = [ParamInfo(n, tuple(p.shape)) for n, p in self.named]
        self.session = ShapingSession(shaper, infos, granularity, block_pattern, device)

    @property
    def shaper(self) -> Shaper:
        return self.session.shaper

    @property
    def state(self):
        return self.session.state

    @torch.no_grad()
    def apply_(self, loss_scale: float = 1.0):
        """Shape every ``p.grad`` in place (grads may carry ``loss_scale``)."""
        g = self.session.grouping
        needs_param = "unit_param_sumsq" in self.session.shaper.needs
        slices = slices_from_params(self.named, g.group, with_param=needs_param, unit_base=g.unit_base)
        ss = SliceSet(slices, self.session.layout)
        ss.loss_scale = loss_scale
        return self.session.step(ss)

    def state_dict(self):
        return self.session.state_dict()

    def load_state_dict(self, sd):
        self.session.load_state_dict(sd)
