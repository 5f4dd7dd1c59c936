"""AGC: adaptive gradient clipping relative to the parameter norm, unit-wise (Brock et al. 2021).

For each unit u (a row of a weight, i.e. dim 0: one output unit of a ``[out, in]`` Linear or
``[out, in, kh, kw]`` convolution; a vector or scalar parameter is one unit), with
W_u = max(||w_u||, eps) and G_u = ||g_u||:

    g_u <- g_u * clipping * W_u / G_u      if G_u > clipping * W_u, else unchanged

(Brock et al. eq. 3: clip when ||G||/||W||* > lambda). With ``unitwise = false`` the same rule
is applied per group (a tensor at the default granularity) with the group norms
W = max(||w||, eps), G = ||g||; W is the root of the group's summed parameter rows, so this
path keeps the unit -> group map of the layout given to ``init``.

Defaults, from the paper and the official NFNets code (deepmind-research/nfnets/agc_optax.py):
``clipping = 0.01`` (the paper's lambda for batch size 4096; it recommends smaller lambda for
larger batches), ``eps = 1e-3`` (the floor on the parameter norm so zero-initialised weights
can still move), ``unitwise = true``. ``clipping = inf`` never clips. Like the paper we apply
it to every parameter; exclude the final classifier by listing it in a separate shaper if
you follow the paper's advice of not clipping it.

The reference code divides by max(G_u, 1e-6) instead of G_u; the two agree whenever
clipping * eps >= 1e-6 (true for the defaults), because then G_u > clipping * W_u > 1e-6.

References:
    Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition Without
    Normalization", ICML 2021, arXiv:2102.06171, section 4.1.
    deepmind-research/nfnets/agc_optax.py (``unitwise_norm``, ``clip_grad``).
"""
from __future__ import annotations

import math

import torch

from . import _checks
from .base import (SUMSQ, UNIT_PARAM_SUMSQ, UNIT_SUMSQ, GroupLayout, Plan, Shaper, Stats, StepCount,
                   segment_sum)


def agc_factor(grad_norm: torch.Tensor, param_norm: torch.Tensor, clipping: float, eps: float) -> torch.Tensor:
    """clipping * max(param_norm, eps) / grad_norm where that is < 1, else 1 (non-finite: 1).
    Norms are >= 0, +inf or nan, so "finite" is "below inf"."""
    max_norm = param_norm.clamp_min(eps).mul_(clipping)
    clip = (grad_norm > max_norm).logical_and_(grad_norm < math.inf)
    # the quotient is only taken where it clips (elsewhere it may be x/0: not selected)
    return torch.where(clip, max_norm.div_(grad_norm), 1.0)


class AGC(Shaper):
    name = "agc"
    needs = frozenset({UNIT_SUMSQ, UNIT_PARAM_SUMSQ})
    default_granularity = "tensor"
    hparams = ("clipping", "eps", "unitwise")

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, unitwise: bool = True):
        self.clipping = _checks.positive(self.name, "clipping", clipping)
        self.eps = _checks.positive(self.name, "eps", eps, allow_inf=False)
        self.unitwise = _checks.boolean(self.name, "unitwise", unitwise)
        # Per-group clipping only needs the group sums (sumsq) and the parameter row norms.
        self.needs = type(self).needs if unitwise else frozenset({SUMSQ, UNIT_PARAM_SUMSQ})

    def init(self, layout: GroupLayout) -> StepCount:
        # update() sees statistics, not the layout; the per-group path needs the unit -> group
        # map to add up parameter rows, so keep it (it is static: fixed by the parameter list).
        self._unit_group = layout.unit_group
        return StepCount.zeros(layout)

    def update(self, stats: Stats, state: StepCount):
        L = stats.sumsq.numel()
        ok = torch.isfinite(stats.sumsq)
        new = state.counted(ok)
        ones = torch.ones_like(stats.sumsq)
        if self.unitwise:
            unit = agc_factor(stats.unit_sumsq.sqrt(), stats.unit_param_sumsq.sqrt(), self.clipping, self.eps)
            return Plan(ones, unit_scale=unit), new
        unit_group = getattr(self, "_unit_group", None)
        if unit_group is None or unit_group.numel() != stats.unit_param_sumsq.numel():
            raise ValueError("agc with unitwise=false: update() got statistics for another layout than init()")
        param_sumsq = segment_sum(stats.unit_param_sumsq, unit_group.to(stats.sumsq.device), L)
        return Plan(agc_factor(stats.norm(), param_sumsq.sqrt(), self.clipping, self.eps)), new
