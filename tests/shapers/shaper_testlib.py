"""Helpers shared by the shaper tests (imported as a plain module: pytest puts this folder on sys.path)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from megatron_shaping.shapers import GroupLayout, Shaper, Stats, make_layout
from megatron_shaping.shapers.base import STAT_DTYPE
from megatron_shaping.torch_api import GradientShaper


def layout_of(*numels: int) -> GroupLayout:
    """One group per entry, each a single unit (vectors)."""
    return make_layout([f"g{i}" for i in range(len(numels))], list(numels))


def stats_of_norms(*norms: float) -> Stats:
    """Statistics of groups whose gradients have these L2 norms."""
    return Stats(sumsq=torch.tensor([n * n for n in norms], dtype=STAT_DTYPE))


def params_with_grads(grads: Dict[str, torch.Tensor], values: Optional[Dict[str, torch.Tensor]] = None,
                      dtype=torch.float32) -> Dict[str, torch.nn.Parameter]:
    """Named parameters (weights from ``values`` or ones) carrying copies of ``grads``."""
    out = {}
    for name, g in grads.items():
        w = values[name].clone() if values and name in values else torch.ones_like(g)
        p = torch.nn.Parameter(w.to(dtype))
        p.grad = g.detach().clone().to(dtype)
        out[name] = p
    return out


def shape_once(shaper, grads: Dict[str, torch.Tensor], values: Optional[Dict[str, torch.Tensor]] = None,
               granularity: Optional[str] = None, dtype=torch.float32) -> Dict[str, torch.Tensor]:
    """Shape one gradient with a fresh shaper; returns the shaped grads by name."""
    ps = params_with_grads(grads, values, dtype)
    GradientShaper(ps.items(), shaper, granularity=granularity).apply_()
    return {n: p.grad for n, p in ps.items()}


class Driver:
    """A GradientShaper over fixed parameters, fed one gradient after another."""

    def __init__(self, shaper, shapes: Dict[str, Sequence[int]], values: Optional[Dict[str, torch.Tensor]] = None,
                 granularity: Optional[str] = None, dtype=torch.float32):
        self.params = {n: torch.nn.Parameter((values[n] if values else torch.ones(s)).to(dtype).clone())
                       for n, s in shapes.items()}
        self.gs = GradientShaper(self.params.items(), shaper, granularity=granularity)

    def step(self, grads: Dict[str, torch.Tensor], loss_scale: float = 1.0):
        for n, p in self.params.items():
            p.grad = grads[n].detach().clone().to(p.dtype)
        rec = self.gs.apply_(loss_scale)
        return rec, {n: p.grad.clone() for n, p in self.params.items()}


def torch_clipped(grads: Dict[str, torch.Tensor], max_norm: float) -> list:
    """The independent reference of global norm clipping: ``torch.nn.utils.clip_grad_norm_`` on
    copies of ``grads``; returns the clipped gradients in ``grads``' order."""
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads.values()]
    for p, g in zip(ref, grads.values()):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(ref, max_norm)
    return [p.grad for p in ref]


def total_norm(grads: Dict[str, torch.Tensor]) -> float:
    return float(torch.cat([g.double().flatten() for g in grads.values()]).norm())


def states_equal(a, b) -> bool:
    """Two shaper states (a NamedTuple or a tuple of them) are equal field by field, NaN == NaN."""
    if isinstance(a, tuple) and not hasattr(a, "_fields"):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return all(torch.equal(x, y) or (x.shape == y.shape and torch.allclose(x, y, rtol=0, atol=0, equal_nan=True))
               for x, y in zip(a, b))


def is_shaper(x) -> bool:
    return isinstance(x, Shaper)
