"""EntrywiseShrink: smooth entry-wise shrinkage of heavy-tailed gradient noise.

Motivated by "Can Entry-Wise Clipping Give Spectral Control of Stochastic Gradients?"
(arXiv:2605.27733). We could not read that paper: the derivation below is ours, and the
knobs are this project's, not the paper's.

Per group l (a tensor at the default granularity), with N the group's number of elements:

    s     = sum|g| / N                                (mean absolute entry: one shardable sum)
    m     <- beta * m + (1 - beta) * s                 (EMA across steps; beta = 0: this step's s)
    s_hat = max(m / (1 - beta^t), eps)                 (bias-corrected, t = the group's step)
    T     = threshold * s_hat
    g_i   <- g_i / (1 + |g_i / T|^power)^(1 / power)

Derivation. Why entry-wise: heavy-tailed noise concentrates in a few entries, and a single
entry of size M contributes a rank-one piece of spectral norm M to the gradient matrix, while a
matrix of m x n independent entries bounded by T has spectral norm O(T (sqrt(m) + sqrt(n)))
(Bai-Yin / Latala). Bounding every entry therefore bounds the spectrum of the noise, and only
needs a per-tensor scale. Why mean |g|: it needs one sum per group, reduced with the sum of
squares in the same collective, and it is far less sensitive to outliers than the rms: an
entry of size M moves it by M / N instead of moving the rms by about M / sqrt(N). Why this map:
f(g) = g / (1 + |g/T|^p)^(1/p) is odd, smooth, strictly increasing, f(g) = g (1 - |g/T|^p / p
+ ...) near 0 and |f(g)| < T; p = 2 is the influence function of the pseudo-Huber loss and
p -> inf is the hard clip at T. Why threshold = 10: for Gaussian entries E|g| = sigma sqrt(2/pi)
= 0.80 sigma, so T = 8 sigma, above the largest entry a Gaussian tensor produces (about
sigma sqrt(2 ln N) = 6.1 sigma for N = 1e8): the Gaussian bulk is left nearly alone (the norm
of a Gaussian gradient drops by about 2 %), heavy-tail entries are bounded by about 8 sigma as
long as their summed size is small against N sigma. Past that the outliers raise their own
threshold (one entry of 1e6 sigma in 2e5 entries moves s from 0.8 to 5.8 sigma): still bounded,
but loosely; beta > 0 (a scale with memory) is the remedy.

The map is scale-equivariant (g -> c g, s -> c s gives f -> c f), so with beta = 0 a tensor
scaled up as a whole is not shrunk; beta > 0 gives the threshold a memory, which also limits
whole-tensor spikes (to roughly threshold * (1 - beta) * the spike's own scale per entry).
A group whose sum |g| is zero or non-finite is left untouched with its state.

Defaults: threshold 10.0, power 2.0, beta 0.0, eps 1e-30 (a floor that keeps T a normal fp32
number). threshold = inf is the identity and skips the map.

References:
    "Can Entry-Wise Clipping Give Spectral Control of Stochastic Gradients?", arXiv:2605.27733
    (motivation only; formula and defaults derived here).
    Latala, "Some estimates of norms of random matrices", Proc. AMS 133 (2005).
    Charbonnier et al. 1997 / Hartley & Zisserman 2003 (pseudo-Huber loss).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import _checks
from .base import SUMABS, STAT_DTYPE, Elementwise, GroupLayout, Plan, Shaper, Stats, finite_positive, keep_where


class EntrywiseShrinkState(NamedTuple):
    m: torch.Tensor       # [L] EMA of the mean absolute entry sum|g| / N (not bias-corrected)
    count: torch.Tensor   # [L] steps this group has learned from (finite, non-zero sum |g|)


class ShrinkMap(Elementwise):
    """g -> g / (1 + |g/T|^p)^(1/p), computed without overflow; params T [L], p [L]."""

    def apply(self, g: torch.Tensor, T: float, p: float) -> torch.Tensor:
        if math.isinf(T):
            return g
        return self.apply_(g.clone(), T, p)

    #: the driver may pass ``absmax`` (a bound on |g| per tensor) to skip needless clamps
    uses_absmax = True

    @staticmethod
    def is_identity(T: float, p: float, absmax: float = math.inf) -> bool:
        return math.isinf(T)

    @staticmethod
    def apply_(g: torch.Tensor, T: float, p: float) -> torch.Tensor:
        """The map in place on ``g`` (a tensor the caller owns), one temporary.

        One branch: g * (1 + u^p)^(-1/p) with u = |g| / T, after clamping g to +-B*T where
        B = 10^(36/p) (at most 1e30): u^p <= 1e36 never overflows fp32 (no clamp is needed
        when B * T exceeds the dtype's range: then u < B already), and a clamped entry
        maps to T * (1 + 1e-36)^(-1/p) = T, the limit of the map, as the far branch
        T / (1 + u^-p)^(1/p) of the two-branch form gives. Below the clamp the operations are
        those of that form's near branch; above T the two forms agree to rounding."""
        ShrinkMap.apply_foreach_([g], T=[T], p=[p])
        return g

    @staticmethod
    def _bound(T: float, p: float, dtype) -> float:
        b = 10.0 ** min(36.0 / p, 30.0) * T       # min first: 10.0 ** 360 raises OverflowError
        return b if b < torch.finfo(dtype).max else math.inf      # else |g| / T < B already

    @staticmethod
    def kernel_args(T: float, p: float, absmax: float = math.inf):
        """The fused kernel computing this map on an fp32 value, the same operations as
        :meth:`apply_foreach_` (``shrink2``: the clamp, then g * rsqrt(1 + g * g * T^-2)), for
        the p = 2 path; None (the multi-tensor ops) otherwise."""
        if not ShrinkMap._fast(T, p):
            return None
        return "shrink2", (1.0 / (T * T), ShrinkMap._clamp_at(T, p, torch.float32, absmax))

    @staticmethod
    def _fast(T: float, p: float) -> bool:
        """The p = 2 path: one addcmul and an inverse square root (T^-2 a normal fp32 number)."""
        return p == 2.0 and 1e-15 <= T <= 1e15

    @staticmethod
    def _clamp_at(T: float, p: float, dtype, absmax: Optional[float]) -> float:
        """The clamp bound this tensor needs, or inf: none when |g| < B * T already (the dtype's
        range, or the bound ``absmax`` on |g|)."""
        b = ShrinkMap._bound(T, p, dtype)
        return b if b < math.inf and (absmax is None or not absmax * (1 + 1e-5) < b) else math.inf

    @staticmethod
    def apply_foreach_(gs, T, p, absmax=None) -> None:
        """The map in place on every tensor of ``gs`` (group parameters per tensor), one
        temporary per tensor, as multi-tensor operations. p = 2 with 1e-15 <= T <= 1e15:
        1 + g * g * T^-2 (one addcmul) and its inverse square root; otherwise
        1 + (|g| / T)^p to the power -1/p. ``absmax``: a bound on |g| per tensor (the group's
        norm); tensors whose bound is below the clamp are not clamped (it would change nothing)."""
        if not gs:
            return
        bounds = [ShrinkMap._clamp_at(t, q, g.dtype, None if absmax is None else absmax[i])
                  for i, (g, t, q) in enumerate(zip(gs, T, p))]
        clamp = [i for i, b in enumerate(bounds) if b < math.inf]
        if clamp:
            torch._foreach_clamp_min_([gs[i] for i in clamp], [-bounds[i] for i in clamp])
            torch._foreach_clamp_max_([gs[i] for i in clamp], [bounds[i] for i in clamp])
        fast = [i for i, (t, q) in enumerate(zip(T, p)) if ShrinkMap._fast(t, q)]
        if fast:
            xs = [gs[i] for i in fast]
            one = torch.ones((), dtype=xs[0].dtype, device=xs[0].device)
            ts = torch._foreach_addcmul([one] * len(xs), xs, xs, [1.0 / (T[i] * T[i]) for i in fast])
            torch._foreach_rsqrt_(ts)
            torch._foreach_mul_(xs, ts)
        slow = [i for i in range(len(gs)) if i not in set(fast)]
        if slow:
            xs = [gs[i] for i in slow]
            ts = torch._foreach_abs(xs)
            torch._foreach_div_(ts, [T[i] for i in slow])
            torch._foreach_pow_(ts, [p[i] for i in slow])
            torch._foreach_add_(ts, 1.0)
            torch._foreach_pow_(ts, [-1.0 / p[i] for i in slow])
            torch._foreach_mul_(xs, ts)


class EntrywiseShrink(Shaper):
    name = "entrywise_shrink"
    needs = frozenset({SUMABS})
    default_granularity = "tensor"
    hparams = ("threshold", "power", "beta", "eps")

    def __init__(self, threshold: float = 10.0, power: float = 2.0, beta: float = 0.0, eps: float = 1e-30):
        n = self.name
        self.threshold = _checks.positive(n, "threshold", threshold)
        self.power = _checks.positive(n, "power", power, allow_inf=False)
        self.beta = _checks.in_range(n, "beta", beta, 0.0, 1.0, hi_open=True)
        self.eps = _checks.positive(n, "eps", eps, allow_inf=False)

    def init(self, layout: GroupLayout) -> EntrywiseShrinkState:
        self._numel = layout.numel
        z = torch.zeros(layout.num_groups, dtype=STAT_DTYPE, device=layout.device)
        return EntrywiseShrinkState(z, z.clone())

    def update(self, stats: Stats, state: EntrywiseShrinkState):
        s = stats.sumabs / self._numel.to(stats.sumabs.device)
        ok = finite_positive(s)
        s0 = torch.where(ok, s, torch.zeros_like(s))
        m = self.beta * state.m + (1 - self.beta) * s0
        t = state.count + 1
        new = keep_where(ok, EntrywiseShrinkState(m, t), state)
        ones = torch.ones_like(s)
        if math.isinf(self.threshold):
            return Plan(ones), new
        s_hat = (m / (1 - torch.pow(self.beta, t))).clamp_min(self.eps)
        T = torch.where(ok, self.threshold * s_hat, torch.full_like(s, math.inf))
        # no group to shrink: no map (decided on the device, read with the map's parameters)
        return Plan(ones, elementwise=ShrinkMap(T=T, p=torch.full_like(s, self.power)), skip_map=~ok.any()), new
