"""ZClip: z-score anomaly detection on the gradient norm, clipping spikes to an adaptive threshold.

A re-statement of ``zclip.ZClip.step`` (package ``zclip`` 1.0.0) as a shaper, per group (the
whole model at the default granularity ``global``, which is what the package does), with
n = ||g||, the package's clip coefficient helper clip(n, c) = c / (n + 1e-6) if n > c else 1,
and W = max(warmup_steps, 1):

  warmup (the first W steps): append n to a buffer; when it holds W norms,
      mean = sum(buffer) / W,    var = sum((x - mean)^2) / W
  and, if max_grad_norm is not None, clip like torch.nn.utils.clip_grad_norm_(max_grad_norm):
      g <- g * min(1, max_grad_norm / (n + 1e-6)).
  after warmup, std = sqrt(var):
      mode "percentile":  T = mean + z_thresh * std;  spike if n > T
      mode "zscore":      z = (n - mean) / (std + eps);  spike if z > z_thresh, then
          clip_option "adaptive_scaling": T = (mean + z_thresh * std / (z / z_thresh)) * clip_factor
          clip_option "mean":             T = mean
      c = T if spike else n;  if max_grad_norm is not None: c = min(c, max_grad_norm)
      g <- g * clip(n, c)
      unless (spike and skip_update_on_spike), with v = T if spike else n:
          mean <- alpha * mean + (1 - alpha) * v
          var  <- alpha * var + (1 - alpha) * (v - mean)^2      (with the NEW mean, as the package)

Notes on fidelity. ``clip_factor`` multiplies the whole adaptive threshold (mean included), as
the package's code does (its docstring says it multiplies z_thresh * std only). The EMA sees the
adaptive threshold T, not the value capped by max_grad_norm. A non-finite norm leaves the
state untouched (the package would put NaN into its buffer or EMA); a zero norm is an ordinary
value, as in the package, with its consequence: a group whose gradient is zero throughout the
warm-up (a tensor at granularity "tensor" that receives no gradient for warmup_steps steps) gets
mean 0 and std 0, so every later non-zero norm is a spike with threshold 0 and the group's
gradient is multiplied by 0 for good (the EMA then sees only that threshold, 0). Use a coarser
granularity where such tensors exist.
The package ignores ``clip_option`` in percentile mode but still accepts only the two
names here, so a typo in a config is an error in every mode.

Defaults are the package's, exactly: alpha 0.97, z_thresh 2.5, max_grad_norm 1.0, eps 1e-6,
warmup_steps 25, mode "zscore", clip_option "adaptive_scaling", clip_factor 1.0,
skip_update_on_spike false. Beware: max_grad_norm = 1.0 is an absolute cap on top of the
adaptive threshold, so with the defaults every step with ||g|| > 1 is clipped to 1 whatever the
statistics say; set ``max_grad_norm: null`` for purely adaptive clipping.

The warmup buffer is a fixed [L, W] tensor in the state (checkpointable, resumable mid-warmup).

References:
    Kumar, Owen, Ashraf et al. (BluOrion), "ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training", arXiv:2504.02507.
    github.com/bluorion-com/ZClip (``zclip/zclip.py``), PyPI package ``zclip`` 1.0.0.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch

from . import _checks
from .base import STAT, STAT_DTYPE, SUMSQ, THRESHOLD, GroupLayout, Plan, Shaper, Stats, keep_where, nan_where_not
from .norm_clip import TORCH_CLIP_EPS, clip_coefficient

MODES = ("zscore", "percentile")
CLIP_OPTIONS = ("adaptive_scaling", "mean")


class ZClipState(NamedTuple):
    mean: torch.Tensor    # [L] EMA of the (clipped) norm; valid once count >= W
    var: torch.Tensor     # [L] EMA of the squared deviation from the EMA mean; valid once count >= W
    count: torch.Tensor   # [L] number of finite steps seen (warmup while count < W)
    buffer: torch.Tensor  # [L, W] norms of the warmup steps (slot i holds step i); zeroed once used


def package_clip_coefficient(norm: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """zclip's ``apply_in_place_clipping``: limit / (norm + 1e-6) if norm > limit else 1."""
    return torch.where(norm > limit, limit / (norm + TORCH_CLIP_EPS), torch.ones_like(norm))


class ZClip(Shaper):
    name = "zclip"
    needs = frozenset({SUMSQ})
    default_granularity = "global"
    hparams = ("alpha", "z_thresh", "max_grad_norm", "eps", "warmup_steps", "mode", "clip_option", "clip_factor",
               "skip_update_on_spike")

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, max_grad_norm: Optional[float] = 1.0,
                 eps: float = 1e-6, warmup_steps: int = 25, mode: str = "zscore",
                 clip_option: str = "adaptive_scaling", clip_factor: float = 1.0,
                 skip_update_on_spike: bool = False):
        n = self.name
        self.alpha = _checks.in_range(n, "alpha", alpha, 0.0, 1.0)
        self.z_thresh = _checks.positive(n, "z_thresh", z_thresh)
        self.max_grad_norm = _checks.optional_positive(n, "max_grad_norm", max_grad_norm)
        self.eps = _checks.positive(n, "eps", eps, allow_inf=False)
        self.warmup_steps = _checks.integer(n, "warmup_steps", warmup_steps, 0)
        self.mode = _checks.choice(n, "mode", mode, MODES)
        self.clip_option = _checks.choice(n, "clip_option", clip_option, CLIP_OPTIONS)
        self.clip_factor = _checks.positive(n, "clip_factor", clip_factor)
        self.skip_update_on_spike = _checks.boolean(n, "skip_update_on_spike", skip_update_on_spike)
        # The package buffers the first norm even with warmup_steps = 0 (it checks the length
        # after appending), so the warmup always lasts at least one step.
        self.window = max(self.warmup_steps, 1)

    def init(self, layout: GroupLayout) -> ZClipState:
        L = layout.num_groups
        z = torch.zeros(L, dtype=STAT_DTYPE, device=layout.device)
        return ZClipState(z, z.clone(), z.clone(), torch.zeros(L, self.window, dtype=STAT_DTYPE, device=layout.device))

    def update(self, stats: Stats, state: ZClipState):
        n = stats.norm()
        ok = torch.isfinite(n)
        W = self.window
        warm = state.count < W
        ones = torch.ones_like(n)

        # --- warmup: record the norm, initialise mean/var once the buffer is full
        rows = torch.arange(n.numel(), device=n.device)
        slot = state.count.clamp(max=W - 1).long()
        buf = state.buffer.clone()
        buf[rows, slot] = torch.where(warm, n, buf[rows, slot])
        full = warm & (state.count + 1 >= W)
        init_mean = buf.sum(1) / W
        init_var = (buf - init_mean[:, None]).square().sum(1) / W
        warm_scale = ones if self.max_grad_norm is None else clip_coefficient(n, self.max_grad_norm)

        # --- after warmup: spike test against the EMA statistics
        threshold, spike = self._threshold(n, state.mean, state.var)
        limit = torch.where(spike, threshold, n)
        if self.max_grad_norm is not None:
            limit = limit.clamp(max=self.max_grad_norm)
        post_scale = package_clip_coefficient(n, limit)
        v = torch.where(spike, threshold, n)
        a = self.alpha
        mean = a * state.mean + (1 - a) * v
        var = a * state.var + (1 - a) * (v - mean).square()
        if self.skip_update_on_spike:
            mean = torch.where(spike, state.mean, mean)
            var = torch.where(spike, state.var, var)

        new = ZClipState(
            mean=torch.where(warm, torch.where(full, init_mean, state.mean), mean),
            var=torch.where(warm, torch.where(full, init_var, state.var), var),
            count=state.count + 1,
            buffer=torch.where(full[:, None], torch.zeros_like(buf), buf))
        scale = torch.where(ok, torch.where(warm, warm_scale, post_scale), ones)
        return Plan(scale), keep_where(ok, new, state)

    def _threshold(self, n: torch.Tensor, mean: torch.Tensor, var: torch.Tensor):
        """(T, spike) of ``_compute_clip_val``; T is only meaningful where spike."""
        std = var.sqrt()
        if self.mode == "percentile":
            threshold = mean + self.z_thresh * std
            return threshold, n > threshold
        z = (n - mean) / (std + self.eps)
        spike = z > self.z_thresh
        if self.clip_option == "mean":
            return mean, spike
        eta = torch.where(spike, z, torch.ones_like(z)) / self.z_thresh
        return (mean + self.z_thresh * std / eta) * self.clip_factor, spike

    def diagnostics(self, prev: ZClipState, new: ZClipState) -> Dict[str, torch.Tensor]:
        """stat: the EMA mean before the step (once warm); threshold: where the spike test fires,
        z > z_thresh, i.e. n > mean + z_thresh * (std + eps), capped by max_grad_norm (which is
        also the threshold of the warmup)."""
        ready = prev.count >= self.window
        slack = prev.var.sqrt() if self.mode == "percentile" else prev.var.sqrt() + self.eps
        thr = prev.mean + self.z_thresh * slack
        if self.max_grad_norm is not None:
            thr = torch.where(ready, thr.clamp(max=self.max_grad_norm), torch.full_like(thr, self.max_grad_norm))
        else:
            thr = nan_where_not(thr, ready)
        return {STAT: nan_where_not(prev.mean, ready), THRESHOLD: thr}
