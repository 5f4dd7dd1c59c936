"""Independent references for the gradient shapers: transcriptions of the official codes and
thin wrappers of third-party packages, applied to ``p.grad`` in place, one process.

This module must stay independent of the system under test: it imports torch and the
``zclip`` package only, never ``megatron_shaping`` (``test_peer_references.py`` checks it).
Each transcription keeps the official code's arithmetic (dtypes, where eps goes, strict
comparisons, step counters) and cites the file and commit it was read from.
"""
from __future__ import annotations

from typing import Dict, List

import torch


def _grads(params) -> List[torch.nn.Parameter]:
    return [p for p in params if p.grad is not None]


class OfficialGradientStabilizer:
    """``GradientStabilizer._scale_param`` of TianjinYellow/GradientStabilizer,
    ``src/gradient_stabilizer/gradient_stabilizer.py``, commit d77016fe235e8259da495389c89b42a5fb70df27:
    per parameter, fp32 EMAs of ||g|| and ||g||^2; a zero or non-finite norm is skipped without
    counting a step; the factor is computed in the gradient's dtype."""

    def __init__(self, gamma1: float = 0.6, gamma2: float = 0.999, eps: float = 1e-12):
        self.gamma1, self.gamma2, self.eps = gamma1, gamma2, eps
        self.state: Dict[int, dict] = {}

    @torch.no_grad()
    def __call__(self, params) -> None:
        for p in _grads(params):
            g = p.grad
            st = self.state.setdefault(id(p), {"mnorm": torch.zeros((), dtype=torch.float32),
                                               "vnorm": torch.zeros((), dtype=torch.float32), "step": 0})
            g_norm = g.norm(p=2).to(torch.float32)
            if not torch.isfinite(g_norm) or g_norm <= 0:
                continue
            st["step"] += 1
            step = st["step"]
            st["mnorm"].mul_(self.gamma1).add_(g_norm, alpha=1.0 - self.gamma1)
            m_est = st["mnorm"] / (1.0 - self.gamma1 ** step)
            st["vnorm"].mul_(self.gamma2).add_(g_norm * g_norm, alpha=1.0 - self.gamma2)
            v_est = st["vnorm"] / (1.0 - self.gamma2 ** step)
            target_over_sigma = (m_est / v_est.sqrt().add_(self.eps)).to(g.dtype)
            g.mul_(target_over_sigma / g_norm.clamp(min=self.eps).to(g.dtype))


class OfficialAdaGC:
    """``AdaGC.clip_by_norm`` of lishuai-97/AdaGC, ``megatron-gpt2.patch`` ->
    ``megatron/optimizer/clip_grads.py``, commit 32c249fa365e08169779d63d416bfa76c2be31fc,
    for one process (no tensor parallelism), norm_type 2, CPU tensors instead of CUDA ones.

    One step counter for the model; the first ``start_clip_steps`` steps clip the global norm
    to ``max_norm`` and keep each tensor's running minimum of its clipped norm; afterwards a
    tensor is clipped only when its norm exceeds ``clip_ratio`` times its EMA, and the EMA then
    takes ``clip_ratio * EMA`` (the official code's ``norm_value = self.clip_ratio * avg_norm_value``).

    ``flawed=True`` is the rule this project used before issue 10 (a factor
    ``min(1, ratio * EMA / (n + eps))`` on every step and the EMA of ``factor * n``): a
    deliberately wrong peer that shows the comparison's power.
    """

    def __init__(self, clip_ratio: float = 1.04, beta: float = 0.99, eps: float = 1e-6,
                 start_clip_steps: int = 100, max_norm: float = 1.0, flawed: bool = False):
        self.clip_ratio, self.beta, self.eps = clip_ratio, beta, eps
        self.start_clip_steps, self.max_norm, self.flawed = start_clip_steps, max_norm, flawed
        self.steps = 0
        self.state: Dict[int, dict] = {}

    @torch.no_grad()
    def __call__(self, params) -> None:
        self.steps += 1
        params = _grads(params)
        grads = [p.grad.detach() for p in params]
        # multi_tensor_l2norm over all grads (fp32), then .item() ** (1 / 2) of the squared norm
        total_norm = torch.stack([g.norm(2) for g in grads]).norm(2) ** 2.0
        total_norm = total_norm.item() ** (1.0 / 2.0)
        if self.steps <= self.start_clip_steps:
            clip_coeff = self.max_norm / (total_norm + self.eps)
            if clip_coeff < 1.0:
                torch._foreach_mul_(grads, clip_coeff)
            for p in params:
                state = self.state.setdefault(id(p), {})
                norm_value = torch.norm(p.grad.data, 2.0)
                if "norm_value" not in state:
                    state["norm_value"] = norm_value
                if norm_value < state["norm_value"]:
                    state["norm_value"] = norm_value
            return
        for p in params:
            state = self.state.setdefault(id(p), {})
            norm_value = torch.norm(p.grad.data, 2.0)
            if "norm_value" not in state:
                state["norm_value"] = norm_value
            avg_norm_value = state["norm_value"]
            if self.flawed:
                clip_coef = torch.clamp(self.clip_ratio * avg_norm_value / (norm_value + self.eps), max=1.0)
                p.grad.data.mul_(clip_coef)
                norm_value = clip_coef * norm_value
            elif norm_value > self.clip_ratio * avg_norm_value:
                clip_coef = (self.clip_ratio * avg_norm_value) / (norm_value + self.eps)
                p.grad.data.mul_(clip_coef)
                norm_value = self.clip_ratio * avg_norm_value
            state["norm_value"] = avg_norm_value * self.beta + norm_value * (1.0 - self.beta)


def timm_unitwise_norm(x: torch.Tensor, norm_type: float = 2.0) -> torch.Tensor:
    """``unitwise_norm`` of huggingface/pytorch-image-models ``timm/utils/agc.py``,
    commit 15d1dbc896dde826b89d1aab479f9bd4ffda085a."""
    if x.ndim <= 1:
        return x.norm(norm_type)
    return x.norm(norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def timm_adaptive_clip_grad(parameters, clip_factor: float = 0.01, eps: float = 1e-3, norm_type: float = 2.0):
    """``adaptive_clip_grad`` of timm (same file and commit as :func:`timm_unitwise_norm`).
    timm is not a dependency (it pulls torchvision); the function is ten lines, transcribed."""
    for p in _grads(parameters):
        p_data = p.detach()
        g_data = p.grad.detach()
        max_norm = timm_unitwise_norm(p_data, norm_type=norm_type).clamp_(min=eps).mul_(clip_factor)
        grad_norm = timm_unitwise_norm(g_data, norm_type=norm_type)
        clipped_grad = g_data * (max_norm / grad_norm.clamp(min=1e-6))
        new_grads = torch.where(grad_norm < max_norm, g_data, clipped_grad)
        p.grad.detach().copy_(new_grads)


class TorchNormClip:
    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def __call__(self, params) -> None:
        torch.nn.utils.clip_grad_norm_(_grads(params), self.max_norm)


class TorchValueClip:
    def __init__(self, clip_value: float):
        self.clip_value = clip_value

    def __call__(self, params) -> None:
        torch.nn.utils.clip_grad_value_(_grads(params), self.clip_value)


class ZClipPackage:
    """The ``zclip`` package's ``ZClip.step(model)`` (it reads ``model.parameters()``)."""

    def __init__(self, model: torch.nn.Module, **kw):
        from zclip import ZClip
        self.model, self.zclip = model, ZClip(**kw)

    def __call__(self, params) -> None:
        self.zclip.step(self.model)


class TimmAGC:
    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3):
        self.clip_factor, self.eps = clip_factor, eps

    def __call__(self, params) -> None:
        timm_adaptive_clip_grad(params, self.clip_factor, self.eps)

