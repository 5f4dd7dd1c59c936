"""ValueClip: clamp every gradient entry to [-clip_value, clip_value].

    g_i <- min(max(g_i, -clip_value), clip_value)

on the *true* gradient values (the driver divides out the loss scale before the map and puts it
back after, so the threshold means the same thing under fp16 loss scaling), computed in fp32.
It is ``torch.nn.utils.clip_grad_value_`` applied to the unscaled gradient. The granularity only
decides how the (unused) step counter is kept; the clamp is the same everywhere.

Defaults: ``clip_value = 1.0`` (the conventional choice; Keras ``clipvalue`` and most examples
using ``clip_grad_value_`` use 1.0). ``clip_value = inf`` is the identity: the shaper then
returns a pure-scale plan of ones and no extra statistics pass is run.

References:
    Mikolov, "Statistical language models based on neural networks", PhD thesis, Brno 2012
    (element-wise gradient clipping for RNN LMs).
    PyTorch ``torch.nn.utils.clip_grad_value_``.
"""
from __future__ import annotations

import math

import torch

from . import _checks
from .base import STAT_DTYPE, SUMSQ, Elementwise, GroupLayout, Plan, Shaper, StepCount, Stats


class ClampMap(Elementwise):
    """g -> clamp(g, -clip, clip); params: clip [L]."""
    exact_in_storage = True

    def apply(self, g: torch.Tensor, clip: float) -> torch.Tensor:
        if math.isinf(clip):
            return g
        return g.clamp(-clip, clip)

    @staticmethod
    def is_identity(clip: float) -> bool:
        return math.isinf(clip)

    @staticmethod
    def apply_(g: torch.Tensor, clip: float) -> torch.Tensor:
        """The map in place on ``g`` (a tensor the caller owns), no temporary."""
        return g.clamp_(-clip, clip)

    @staticmethod
    def map_into(src: torch.Tensor, dst: torch.Tensor, clip: float) -> torch.Tensor:
        """The map of ``src`` written into ``dst`` (same dtype) in one pass: the values
        :meth:`apply_foreach_` (and the fused kernel) leave in a copy of ``src``, bit for bit
        (the bound in fp32, a 16-bit result rounded once: a clamp of a stored value is the
        stored value or the rounded bound)."""
        return torch.clamp(src, -clip, clip, out=dst)

    @staticmethod
    def kernel_args(clip: float):
        """The fused kernel computing this map (``clamp``: the same operations, one pass)."""
        return "clamp", (clip,)

    @staticmethod
    def apply_foreach_(gs, clip) -> None:
        """The map in place on every tensor of ``gs`` (one clip value per tensor), no temporary."""
        if gs:
            torch._foreach_clamp_min_(gs, [-c for c in clip])
            torch._foreach_clamp_max_(gs, list(clip))


class ValueClip(Shaper):
    name = "value_clip"
    needs = frozenset({SUMSQ})
    default_granularity = "tensor"
    hparams = ("clip_value",)

    def __init__(self, clip_value: float = 1.0):
        self.clip_value = _checks.positive(self.name, "clip_value", clip_value)

    def init(self, layout: GroupLayout) -> StepCount:
        return StepCount.zeros(layout)

    def premap(self, layout: GroupLayout):
        """The clamp, known before the statistics (None for the identity, clip_value = inf):
        the first statistics pass also takes the sums of squares of the clamped gradient."""
        if math.isinf(self.clip_value):
            return None
        return ClampMap(clip=torch.full((layout.num_groups,), self.clip_value, dtype=STAT_DTYPE,
                                        device=layout.device))

    def update(self, stats: Stats, state: StepCount):
        ok = torch.isfinite(stats.sumsq)
        new = state.counted(ok)
        ones = torch.ones_like(stats.sumsq)
        if math.isinf(self.clip_value):
            return Plan(ones), new
        # Nothing above the threshold (max |g_i| <= ||g||_2 <= clip): skip the map and its pass
        # (decided on the device, read by the driver with the map's parameters).
        below = (stats.sumsq <= self.clip_value * self.clip_value).all()   # not **: it raises past 1.3e154
        # The sums of squares of the clamped gradient, when the first pass took them (premap).
        return Plan(ones, elementwise=ClampMap(clip=torch.full_like(ones, self.clip_value)), skip_map=below,
                    after_sumsq=stats.mapped_sumsq), new
