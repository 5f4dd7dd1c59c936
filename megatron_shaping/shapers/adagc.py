"""AdaGC: per-tensor clipping relative to an EMA of the tensor's own clipped gradient norms.

The rule of the official code (lishuai-97/AdaGC, Megatron patch ``megatron/optimizer/clip_grads.py``,
``AdaGC.clip_by_norm``, commit 32c249f), per group l (a tensor at the default granularity), with
n_l = ||g_l||, N = sqrt(sum_l n_l^2) the global norm over the groups with finite statistics, and
t the group's step (1-based):

  warmup, t <= warmup_steps (global clipping, the official code's GlobalGC warm-up stage):
      h = min(1, warmup_max_norm / (N + eps))                       (the same h for all groups)
      gamma_l <- h n_l                 at t = 1
      gamma_l <- min(gamma_l, h n_l)   afterwards                    (running minimum)
  after warmup (per tensor), with c_l = lambda_rel * gamma_l (gamma_l of the previous step):
      if n_l > c_l:  h_l = c_l / (n_l + eps),  gamma_l <- beta * gamma_l + (1 - beta) * c_l
      else:          h_l = 1,                  gamma_l <- beta * gamma_l + (1 - beta) * n_l
  g_l <- h_l g_l

So a tensor is only scaled when its norm exceeds lambda_rel times its running norm; eps only
guards the division on a clipping step, and the EMA sees the threshold c_l on a clipping step
(not h_l n_l, which is eps-smaller). A group that reaches the per-tensor phase without a gamma
(``warmup_steps = 0``) starts from its own norm, gamma_l = n_l, as the official code does
(``state["norm_value"] = norm_value``), then follows the rule above (h_l = 1 for lambda_rel >= 1).

Deliberate differences from the official code (docs/SHAPERS.md says why):
  * A group with a zero norm does not update gamma or its step. The official code would record
    gamma = 0 (during warmup the running minimum takes it), after which every later non-zero
    gradient of that tensor is multiplied by 0 for good. A group with a non-finite norm is
    skipped the same way and left unscaled (the official code runs after Megatron's overflow
    check and never sees one).
  * Warmup and step counts are per group; the official code counts steps once for the whole
    model. They differ only for groups that skipped steps (zero or non-finite norms), whose
    warmup then ends later, after the same number of steps that carried a gradient.
  * Statistics and state are float64 (the official state is the fp32 norm tensor).
  * Granularities ``block`` and ``global`` are extensions. The official ``GlobalAdaGC``
    (``--clip-mode AdaGC-Global``) is this rule at ``global`` granularity, except that its
    warmup keeps min(N, warmup_max_norm) where this keeps h N (they differ by a relative eps / N).

Defaults, all the official code's: lambda_rel 1.04 (``--clip-ratio``), beta 0.99
(``--clip-beta``), eps 1e-6 and warmup_steps 100 (``AdaGC(eps=1.0e-6, start_clip_steps=100)``),
warmup_max_norm 1.0 (the global clip of the warmup, Megatron's ``--clip-grad``, 1.0 in the
official run scripts). The third-party pytorch-optimizer ``AdaGC`` uses 1.05 / 0.98.

References:
    Wang, Li, Chen, Zeng, Yang, Yu, Ma, Shen, "AdaGC: Enhancing LLM Pretraining Stability via
    Adaptive Gradient Clipping", arXiv:2502.11034 (Algorithm 1).
    github.com/lishuai-97/AdaGC, ``megatron-gpt2.patch`` (``megatron/optimizer/clip_grads.py``,
    classes ``AdaGC`` and ``GlobalAdaGC``), commit 32c249fa365e08169779d63d416bfa76c2be31fc.
"""
from __future__ import annotations

from typing import Dict, NamedTuple

import torch

from . import _checks
from .base import (STAT, STAT_DTYPE, SUMSQ, THRESHOLD, GroupLayout, Plan, Shaper, Stats, finite_positive, keep_where,
                   nan_where_not)


class AdaGCState(NamedTuple):
    gamma: torch.Tensor   # [L] EMA (running min during warmup) of the clipped norm: n, or the threshold when clipped
    count: torch.Tensor   # [L] steps this group has learned from (finite, non-zero norm)


class AdaGC(Shaper):
    name = "adagc"
    needs = frozenset({SUMSQ})
    default_granularity = "tensor"
    hparams = ("lambda_rel", "beta", "warmup_steps", "warmup_max_norm", "eps")

    def __init__(self, lambda_rel: float = 1.04, beta: float = 0.99, warmup_steps: int = 100,
                 warmup_max_norm: float = 1.0, eps: float = 1e-6):
        n = self.name
        self.lambda_rel = _checks.positive(n, "lambda_rel", lambda_rel)
        self.beta = _checks.in_range(n, "beta", beta, 0.0, 1.0, hi_open=True)
        self.warmup_steps = _checks.integer(n, "warmup_steps", warmup_steps, 0)
        self.warmup_max_norm = _checks.positive(n, "warmup_max_norm", warmup_max_norm)
        self.eps = _checks.positive(n, "eps", eps, allow_inf=False)

    def init(self, layout: GroupLayout) -> AdaGCState:
        z = torch.zeros(layout.num_groups, dtype=STAT_DTYPE, device=layout.device)
        return AdaGCState(z, z.clone())

    def update(self, stats: Stats, state: AdaGCState):
        n = stats.norm()
        finite = torch.isfinite(n)
        ok = finite_positive(n)
        n0 = torch.where(finite, n, torch.zeros_like(n))
        ones = torch.ones_like(n)
        first = state.count == 0
        warm = state.count + 1 <= self.warmup_steps

        # warmup: global clipping, gamma = running minimum of the clipped norms
        global_norm = n0.square().sum().sqrt()
        h_warm = torch.clamp(self.warmup_max_norm / (global_norm + self.eps), max=1.0) * ones
        gamma_warm = torch.where(first, h_warm * n0, torch.minimum(state.gamma, h_warm * n0))

        # per tensor: clip only above lambda_rel * gamma; the EMA sees the threshold when clipped
        prev = torch.where(first, n0, state.gamma)
        limit = self.lambda_rel * prev
        clip = n0 > limit
        h_rel = torch.where(clip, limit / (n0 + self.eps), ones)
        gamma_rel = self.beta * prev + (1 - self.beta) * torch.where(clip, limit, n0)

        h = torch.where(warm, h_warm, h_rel)
        gamma = torch.where(warm, gamma_warm, gamma_rel)
        new = keep_where(ok, AdaGCState(gamma, state.count + 1), state)
        return Plan(torch.where(finite, h, ones)), new

    def diagnostics(self, prev: AdaGCState, new: AdaGCState) -> Dict[str, torch.Tensor]:
        """stat: gamma before the step; threshold: lambda_rel * gamma once the group's step is
        past the warmup (during the warmup the clip is global: no per-group threshold)."""
        seen = prev.count > 0
        per_layer = seen & (prev.count + 1 > self.warmup_steps)
        return {STAT: nan_where_not(prev.gamma, seen),
                THRESHOLD: nan_where_not(self.lambda_rel * prev.gamma, per_layer)}
