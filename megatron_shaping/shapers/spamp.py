"""SPAMP: Statistical Per-layer Adaptive Modulation and Projection.

Per group l (a tensor at the default granularity), with n = ||g||, N = numel of the group:

    tau_t = beta * tau_{t-1} + (1 - beta) * n          (tau_1 = n: the first finite norm)
    tau   = tau_t      if threshold_from == "current"  (the paper's order: update, then shape)
            tau_{t-1}  if threshold_from == "previous" (tau_t on the group's first step)
    r     = n / max(tau, eps)
    alpha = clamp(schedule(r, alpha_min), alpha_min, 1)
    mode "raw":  g_i <- sign(g_i) |g_i|^alpha                              (as in the paper)
    mode "rms":  g_i <- rms * sign(g_i) |g_i / rms|^alpha,  rms = sqrt(sumsq / N)
                      = sign(g_i) |g_i|^alpha * rms^(1 - alpha)          (no division: no eps)
    projection:  g <- g * min(1, tau / max(||g||, eps))                   (onto the tau-ball)

The projection needs the norm of the shaped gradient: it is the plan's ``finish`` step, run after
a second statistics pass. When every group has alpha = 1 the plan is a pure scale
min(1, tau / n), computed from the norm directly, with no map and no second pass (the plan's
``skip_map``: decided on the device, so the shaper itself reads nothing on the host).

Default schedule (the paper does not publish its h; this one is ours):

    alpha(r) = 1                                       for r <= 1
    alpha(r) = 1 - (1 - alpha_min) * (1 - 1 / r)       for r > 1

continuous, non-increasing, alpha(1) = 1, alpha -> alpha_min as r -> inf (alpha = 0.85 at
r = 2 with the default alpha_min). ``schedule`` is a constructor argument (a callable
(r: Tensor, alpha_min: float) -> Tensor), not a config parameter.

Why mode "rms" by default: ``raw`` is not scale-equivariant. Gradients are typically 1e-6 ..
1e-2 per entry, where |g|^0.7 *inflates* every entry (1e-4 -> 1.6e-3), so the result depends on
the loss's units and the learning rate and is then rescaled by the projection alone. The rms
form is the same power law on g measured in units of its own rms: scaling g by c scales the
output by c, entries above the rms shrink, entries below grow, and the shaped norm never
exceeds n (Jensen, x -> x^alpha concave: mean |x|^(2 alpha) <= (mean x^2)^alpha = 1 for
x = g / rms). Why threshold_from "previous" by default: with "current", a spike of norm n
raises tau_t to about (1 - beta) n before being projected onto it, so a 1e6 x spike still
passes as a 1e4 x step; with "previous" the step is bounded by tau_{t-1} whatever the spike.
Like the paper, tau tracks the raw norm, so a spike inflates tau for about 1 / (1 - beta) steps.

A group whose norm is zero or non-finite is left untouched (alpha 1, scale 1, state kept).

Defaults: beta 0.99, alpha_min 0.7, mode "rms", threshold_from "previous", eps 1e-12.

References:
    "Gradient Shaping Beyond Clipping: A Functional Perspective on Update Magnitude Control"
    (SPAMP), arXiv:2510.01578.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

import torch

from . import _checks
from .base import (STAT, STAT_DTYPE, SUMSQ, THRESHOLD, Elementwise, GroupLayout, Plan, Shaper, Stats, finite_positive,
                   keep_where, nan_where_not)

MODES = ("rms", "raw")
THRESHOLD_FROM = ("previous", "current")
Schedule = Callable[[torch.Tensor, float], torch.Tensor]


def default_schedule(r: torch.Tensor, alpha_min: float) -> torch.Tensor:
    """alpha = 1 - (1 - alpha_min) * max(0, 1 - 1/r): 1 up to r = 1, then down to alpha_min."""
    excess = (1 - 1 / r.clamp_min(1.0)).clamp_min(0.0)
    return 1 - (1 - alpha_min) * excess


class SPAMPState(NamedTuple):
    tau: torch.Tensor     # [L] EMA of the raw group norm ||g|| (0 until the first finite, non-zero norm)
    count: torch.Tensor   # [L] steps this group has learned from (finite, non-zero norm)


class PowerMap(Elementwise):
    """g -> coef * sign(g) * |g|^alpha; params alpha [L], coef [L] (rms^(1-alpha) or 1)."""

    def apply(self, g: torch.Tensor, alpha: float, coef: float) -> torch.Tensor:
        if self.is_identity(alpha=alpha, coef=coef):
            return g
        return self.apply_(g.clone(), alpha, coef)

    @staticmethod
    def is_identity(alpha: float, coef: float) -> bool:
        return alpha == 1.0 and coef == 1.0

    @staticmethod
    def apply_(g: torch.Tensor, alpha: float, coef: float) -> torch.Tensor:
        """The map in place on ``g`` (a tensor the caller owns), one temporary: the same
        operations as ``copysign(|g|^alpha * coef, g)``."""
        t = g.abs().pow_(alpha).mul_(coef)
        return torch.copysign(t, g, out=g)

    @staticmethod
    def kernel_args(alpha: float, coef: float):
        """The fused kernel computing this map (``power``: copysign(coef * |g|^alpha, g) in
        float64, rounded once: within 1 ulp of the exact value, where torch's pow is within
        1 ulp before its own rounding of the product by coef)."""
        return "power", (alpha, coef)

    @staticmethod
    def apply_foreach_(gs, alpha, coef) -> None:
        """The map in place on every tensor of ``gs`` (group parameters per tensor), one
        temporary per tensor, the same operations as :meth:`apply_` as multi-tensor calls."""
        if not gs:
            return
        ts = torch._foreach_abs(gs)
        torch._foreach_pow_(ts, list(alpha))
        torch._foreach_mul_(ts, list(coef))
        for t, g in zip(ts, gs):          # (no multi-tensor copysign in torch)
            torch.copysign(t, g, out=g)


class SPAMP(Shaper):
    name = "spamp"
    needs = frozenset({SUMSQ})
    default_granularity = "tensor"
    hparams = ("beta", "alpha_min", "mode", "threshold_from", "eps")

    def __init__(self, beta: float = 0.99, alpha_min: float = 0.7, mode: str = "rms",
                 threshold_from: str = "previous", eps: float = 1e-12, schedule: Optional[Schedule] = None):
        n = self.name
        self.beta = _checks.in_range(n, "beta", beta, 0.0, 1.0, hi_open=True)
        self.alpha_min = _checks.in_range(n, "alpha_min", alpha_min, 0.0, 1.0, lo_open=True)
        self.mode = _checks.choice(n, "mode", mode, MODES)
        self.threshold_from = _checks.choice(n, "threshold_from", threshold_from, THRESHOLD_FROM)
        self.eps = _checks.positive(n, "eps", eps, allow_inf=False)
        if schedule is not None and not callable(schedule):
            raise ValueError(f"spamp: schedule must be a callable (r, alpha_min) -> alpha, got {schedule!r}")
        self.schedule = schedule or default_schedule

    def init(self, layout: GroupLayout) -> SPAMPState:
        self._numel = layout.numel
        z = torch.zeros(layout.num_groups, dtype=STAT_DTYPE, device=layout.device)
        return SPAMPState(z, z.clone())

    def diagnostics(self, prev: SPAMPState, new: SPAMPState) -> Dict[str, torch.Tensor]:
        """stat: tau_{t-1}; threshold: the tau the step projected onto, tau_{t-1} ("previous")
        or tau_t ("current"), which on a group's first step are both its first norm (new.tau)."""
        seen = prev.count > 0
        used = new.tau if self.threshold_from == "current" else torch.where(seen, prev.tau, new.tau)
        return {STAT: nan_where_not(prev.tau, seen), THRESHOLD: nan_where_not(used, new.count > 0)}

    def update(self, stats: Stats, state: SPAMPState):
        n = stats.norm()
        ok = finite_positive(n)
        first = state.count == 0
        n0 = torch.where(ok, n, torch.zeros_like(n))
        tau_new = torch.where(first, n0, self.beta * state.tau + (1 - self.beta) * n0)
        tau = tau_new if self.threshold_from == "current" else torch.where(first, tau_new, state.tau)
        ones = torch.ones_like(n)
        r = n0 / tau.clamp_min(self.eps)
        alpha = self.schedule(r, self.alpha_min).to(STAT_DTYPE).clamp(self.alpha_min, 1.0)
        alpha = torch.where(ok, alpha, ones)
        new = keep_where(ok, SPAMPState(tau_new, state.count + 1), state)

        def project(norm: torch.Tensor) -> torch.Tensor:
            s = torch.clamp(tau / norm.clamp_min(self.eps), max=1.0)
            return torch.where(ok & torch.isfinite(norm), s, ones)

        # alpha = 1 everywhere: the projection alone, a pure scale (no map, no second pass);
        # decided on the device, read by the driver with the map's parameters
        linear = (alpha == 1).all()
        if self.mode == "rms":
            rms = (stats.sumsq / self._numel.to(n.device)).sqrt()
            coef = torch.where(ok, rms.pow(1 - alpha), ones)
        else:
            coef = ones
        return Plan(torch.where(linear, project(n0), ones), elementwise=PowerMap(alpha=alpha, coef=coef),
                    finish=lambda after: project(after.norm()), skip_map=linear), new
