"""GradientStabilizer: keep the direction, replace the magnitude by a normalised running mean.

Per group (tensor by default), with n = ||g||:

    m <- beta1 * m + (1 - beta1) * n          v <- beta2 * v + (1 - beta2) * n^2
    m_hat = m / (1 - beta1^t)                  v_hat = v / (1 - beta2^t)
    g <- g * (m_hat / (sqrt(v_hat) + eps)) / max(n, eps)

so the shaped norm is ||g'|| = n / max(n, eps) * m_hat / (sqrt(v_hat) + eps) <= m_hat / sqrt(v_hat).
A group whose n is zero or non-finite is skipped: its state and gradient are left untouched.

Bound for an arbitrarily large spike. Write a = 1 - beta1, b = 1 - beta2 and let the spike
n_t = N dominate every earlier norm. Then m_t -> a N + beta1 m_{t-1} and v_t -> b N^2 + ...,
so m_hat/sqrt(v_hat) -> (a / (1 - beta1^t)) / sqrt(b / (1 - beta2^t)) as N -> inf. In general,
by Cauchy-Schwarz on the EMA weights w_i = a beta1^(t-i), u_i = b beta2^(t-i):

    m_t = sum_i w_i n_i = sum_i (w_i / sqrt(u_i)) sqrt(u_i) n_i
        <= sqrt(sum_i w_i^2 / u_i) * sqrt(sum_i u_i n_i^2) = C_t * sqrt(v_t)

with C_t^2 = (a^2 / b) sum_{k<t} (beta1^2 / beta2)^k. Hence, for every gradient sequence,

    ||g'_t|| <= m_hat_t / sqrt(v_hat_t) <= C_t * sqrt(1 - beta2^t) / (1 - beta1^t) =: B_t,

and since beta1^2 < beta2, C_t^2 <= (a^2 / b) / (1 - beta1^2 / beta2) for every t. With the
defaults (0.6, 0.999) C_inf = 0.4 / sqrt(0.001 * (1 - 0.36 / 0.999)) = 15.82 and
B_1 = 1 / sqrt(1 - 0.999) * sqrt(1 - 0.999) = 1: a spike of any size yields a step of norm at
most B_t (:func:`norm_bound`), the largest over t being about 15.8 * sqrt(1 - 0.999^t).

References:
    GradientStabilizer, official implementation defaults beta1=0.6, beta2=0.999, eps=1e-12.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple

import torch

from . import _checks
from .base import (STAT, STAT_DTYPE, SUMSQ, THRESHOLD, GroupLayout, Plan, Shaper, Stats, finite_positive, keep_where,
                   nan_where_not)


class GradientStabilizerState(NamedTuple):
    m: torch.Tensor       # [L] EMA of ||g|| (not bias-corrected)
    v: torch.Tensor       # [L] EMA of ||g||^2 (not bias-corrected)
    count: torch.Tensor   # [L] number of updates this group has seen (t in the bias correction)


class GradientStabilizer(Shaper):
    name = "gradient_stabilizer"
    needs = frozenset({SUMSQ})
    default_granularity = "tensor"
    hparams = ("beta1", "beta2", "eps")

    def __init__(self, beta1: float = 0.6, beta2: float = 0.999, eps: float = 1e-12):
        n = self.name
        self.beta1 = _checks.in_range(n, "beta1", beta1, 0.0, 1.0, hi_open=True)
        self.beta2 = _checks.in_range(n, "beta2", beta2, 0.0, 1.0, hi_open=True)
        self.eps = _checks.positive(n, "eps", eps, allow_inf=False)

    def init(self, layout: GroupLayout) -> GradientStabilizerState:
        z = torch.zeros(layout.num_groups, dtype=STAT_DTYPE, device=layout.device)
        return GradientStabilizerState(z, z.clone(), z.clone())

    def update(self, stats: Stats, state: GradientStabilizerState):
        n = stats.norm()
        ok = finite_positive(n)
        n0 = torch.where(ok, n, torch.zeros_like(n))
        b1, b2 = self.beta1, self.beta2
        m = b1 * state.m + (1 - b1) * n0
        v = b2 * state.v + (1 - b2) * n0.square()
        t = state.count + 1
        m_hat = m / (1 - torch.pow(b1, t))
        v_hat = v / (1 - torch.pow(b2, t))
        target = m_hat / (v_hat.sqrt() + self.eps)
        scale = target / n0.clamp_min(self.eps)
        new = keep_where(ok, GradientStabilizerState(m, v, t), state)
        return Plan(torch.where(ok, scale, torch.ones_like(scale))), new

    def diagnostics(self, prev: GradientStabilizerState, new: GradientStabilizerState) -> Dict[str, torch.Tensor]:
        """stat: the bias-corrected EMA of the norm m_hat before the step; threshold: the shaped
        norm m_hat / (sqrt(v_hat) + eps) of the step. (count 0 divides by zero: masked.)"""
        m_hat_prev = prev.m / (1 - torch.pow(self.beta1, prev.count))
        m_hat = new.m / (1 - torch.pow(self.beta1, new.count))
        v_hat = new.v / (1 - torch.pow(self.beta2, new.count))
        return {STAT: nan_where_not(m_hat_prev, prev.count > 0),
                THRESHOLD: nan_where_not(m_hat / (v_hat.sqrt() + self.eps), new.count > 0)}

    def norm_bound(self, t: int) -> float:
        """B_t: the largest shaped norm any gradient sequence can produce at update t (>= 1)."""
        a, b = 1 - self.beta1, 1 - self.beta2
        r = self.beta1 ** 2 / self.beta2
        c2 = (a * a / b) * (t if r == 1 else (1 - r ** t) / (1 - r))
        return math.sqrt(c2) * math.sqrt(1 - self.beta2 ** t) / (1 - self.beta1 ** t)
