"""NormClip: classic gradient-norm clipping, global by default.

Per group (the whole model at the default granularity ``global``), with n = ||g||:

    coef = max_norm / (n + 1e-6)
    g <- g * coef            if coef < 1, else g unchanged

which is exactly ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` (the same 1e-6 in the
denominator, the coefficient clamped at 1) and DeepSpeed's ``"gradient_clipping": max_norm``.
At granularity ``tensor`` or ``block`` every group is clipped to ``max_norm`` on its own.

Defaults: ``max_norm = 1.0`` (the value most LLM pretraining recipes use, e.g. Megatron-LM's
``--clip-grad 1.0``). ``max_norm = inf`` never clips.

Stateless: the state only counts the steps each group saw (``StepCount``).

References:
    Pascanu, Mikolov, Bengio, "On the difficulty of training recurrent neural networks",
    ICML 2013, arXiv:1211.5063 (norm clipping).
    PyTorch ``torch/nn/utils/clip_grad.py`` (``clip_grad_norm_``: coef = max_norm / (norm + 1e-6)).
"""
from __future__ import annotations

from typing import Dict

import torch

from . import _checks
from .base import SUMSQ, THRESHOLD, GroupLayout, Plan, Shaper, Stats, StepCount

#: The constant torch.nn.utils.clip_grad_norm_ adds to the norm (kept for bit-compatibility).
TORCH_CLIP_EPS = 1e-6


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (norm + 1e-6)) per entry: torch's clip_grad_norm_ coefficient."""
    coef = max_norm / (norm + TORCH_CLIP_EPS)
    return torch.where(coef < 1, coef, torch.ones_like(coef))


class NormClip(Shaper):
    name = "norm_clip"
    needs = frozenset({SUMSQ})
    default_granularity = "global"
    hparams = ("max_norm",)

    def __init__(self, max_norm: float = 1.0):
        self.max_norm = _checks.positive(self.name, "max_norm", max_norm)

    def init(self, layout: GroupLayout) -> StepCount:
        return StepCount.zeros(layout)

    def update(self, stats: Stats, state: StepCount):
        n = stats.norm()
        ok = torch.isfinite(n)
        scale = torch.where(ok, clip_coefficient(n, self.max_norm), torch.ones_like(n))
        return Plan(scale), state.counted(ok)

    def diagnostics(self, prev: StepCount, new: StepCount) -> Dict[str, torch.Tensor]:
        """No running statistic; the threshold is max_norm."""
        return {THRESHOLD: torch.full_like(new.count, float(self.max_norm))}
