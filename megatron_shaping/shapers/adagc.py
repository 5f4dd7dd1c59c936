"""AdaGC: per-tensor clipping relative to an EMA of the tensor's own clipped gradient norms.

Per group l (a tensor at the default granularity), with n_l = ||g_l||, N = sqrt(sum_l n_l^2)
the global norm over the groups with finite statistics, and t the group's step (1-based):

  warmup, t <= warmup_steps (global clipping, as the paper's first T_start steps):
      h = min(1, warmup_max_norm / (N + eps))                       (the same h for all groups)
      gamma_l <- h n_l                 at t = 1
      gamma_l <- min(gamma_l, h n_l)   afterwards                    (running minimum)
  after warmup (per tensor):
      h_l = min(1, lambda_rel * gamma_l / (n_l + eps))              (gamma_l of the previous step)
      gamma_l <- beta * gamma_l + (1 - beta) * h_l n_l              (EMA of the clipped norm)
  g_l <- h_l g_l

||h_l g_l|| = h_l n_l is the clipped norm, known without a second statistics pass. With
``warmup_steps = 0`` there is no global phase and gamma_l is initialised from the first
unclipped norm (h_l = 1 on the group's first step), so no group starts at gamma = 0.

Choices and deviations, documented because the paper leaves them open:
  * eps is added to the norms in both denominators (torch.nn.utils.clip_grad_norm_ adds 1e-6
    too: with eps = 1e-6 the warmup is exactly ``clip_grad_norm_(warmup_max_norm)``).
  * A group with a zero norm does not update gamma or its step (a zero gradient carries no
    magnitude information, and gamma = 0 would zero that tensor's gradient for good); a group
    with a non-finite norm is skipped the same way and left unscaled.
  * Warmup and step counts are per group (they only differ if some groups were skipped).

Defaults: lambda_rel 1.04, beta 0.99, warmup_steps 100, warmup_max_norm 1.0, eps 1e-6.
lambda_rel = 1.04 / beta = 0.99 are this project's choice; the third-party implementation in
pytorch-optimizer (``AdaGC``) uses lambda_rel = 1.05, beta = 0.98, warmup 100, lambda_abs 1.0.
warmup_steps = 100 (the paper's T_start) and warmup_max_norm = 1.0 (its lambda_abs, the usual
global clipping threshold) are pytorch-optimizer's defaults; we could not check them against
the paper's hyperparameter table.

References:
    Wang, Li, Chen, Zeng, Yang, Yu, Ma, Shen, "AdaGC: Enhancing LLM Pretraining Stability via
    Adaptive Gradient Clipping", arXiv:2502.11034 (Algorithm 1).
    kozistr/pytorch_optimizer, ``pytorch_optimizer/optimizer/adagc.py``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _checks
from .base import STAT_DTYPE, SUMSQ, GroupLayout, Plan, Shaper, Stats, finite_positive, keep_where


class AdaGCState(NamedTuple):
    gamma: torch.Tensor   # [L] EMA (running min during warmup) of the clipped norm h_l * ||g_l||
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
        t = state.count + 1
        first = state.count == 0
        warm = t <= self.warmup_steps

        global_norm = n0.square().sum().sqrt()
        h_warm = torch.clamp(self.warmup_max_norm / (global_norm + self.eps), max=1.0) * ones
        h_rel = torch.clamp(self.lambda_rel * state.gamma / (n0 + self.eps), max=1.0)
        h = torch.where(warm, h_warm, torch.where(first, ones, h_rel))
        clipped = h * n0
        gamma = torch.where(first, clipped,
                            torch.where(warm, torch.minimum(state.gamma, clipped),
                                        self.beta * state.gamma + (1 - self.beta) * clipped))
        new = keep_where(ok, AdaGCState(gamma, t), state)
        return Plan(torch.where(finite, h, ones)), new
