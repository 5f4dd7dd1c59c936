"""Local gradient slices and the fused statistics pass over them.

A :class:`GradSlice` is one contiguous piece of one parameter's gradient that this rank holds:
the whole ``p.grad`` on one GPU, the part of a parameter inside this rank's ZeRO partition, a
ZeRO-3 ``ds_tensor`` partition, a tensor-parallel shard. Every element of the model's gradient
is *counted* by exactly one slice across all ranks of the reduction group; replicas (ZeRO-0 or
BF16_Optimizer grads on data-parallel rank > 0 when the group spans DP, TP-replicated norm
weights on TP rank > 0, tied weights on the non-owner stage) are shaped but not counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..shapers.base import (STAT_DTYPE, SUMABS, SUMSQ, UNIT_PARAM_SUMSQ, UNIT_SUMSQ, Elementwise, GroupLayout,
                            Stats)


@dataclass
class GradSlice:
    grad: torch.Tensor                   # 1-D view into the real gradient storage (any float dtype)
    group: int                           # statistics group (layer) id
    counted: bool = True                 # False: a replica counted by another slice
    param: Optional[torch.Tensor] = None  # 1-D values of the matching parameter elements (AGC)
    offset: int = 0                      # flat offset of grad[0] within the local tensor
    row_len: int = 0                     # elements per unit (row) of the local tensor; 0: one unit
    unit_base: int = 0                   # global unit id of the local tensor's row 0


def _row_sums(x: torch.Tensor, offset: int, row_len: int) -> torch.Tensor:
    """Per-row sums of a flat slice x that starts ``offset`` elements into a tensor of rows of
    ``row_len`` elements. Returns sums for rows offset//row_len ... (last row touched)."""
    n = x.numel()
    first_row = offset // row_len
    last_row = (offset + n - 1) // row_len
    out = torch.zeros(last_row - first_row + 1, dtype=x.dtype, device=x.device)
    head = min(n, (first_row + 1) * row_len - offset)
    out[0] = x[:head].sum()
    if head < n:
        body_rows = (n - head) // row_len
        if body_rows:
            out[1:1 + body_rows] = x[head:head + body_rows * row_len].view(body_rows, row_len).sum(1)
        tail = head + body_rows * row_len
        if tail < n:
            out[-1] = x[tail:].sum()
    return out


_NARROW = (torch.bfloat16, torch.float16)


def _mul_rounded_once_(tensors: List[torch.Tensor], scalars: List[float]) -> None:
    """tensors[i] *= scalars[i] in place, each product rounded once to the tensor's dtype.

    ``torch._foreach_mul_`` with Python scalars computes a bf16/fp16 tensor's product with the
    scalar already rounded to that dtype (a factor off by up to 0.4 % in bf16). 16-bit tensors
    are therefore multiplied in fp32 (one slice-sized fp32 temporary at a time) and rounded once;
    fp32/fp64 tensors keep the fused multi-tensor multiply.
    """
    wide_t, wide_s = [], []
    for t, f in zip(tensors, scalars):
        if t.dtype in _NARROW:
            t.copy_(t.float().mul_(f))
        else:
            wide_t.append(t)
            wide_s.append(f)
    if wide_t:
        torch._foreach_mul_(wide_t, wide_s)


def _scale_rows_(g: torch.Tensor, offset: int, row_len: int, row_factor: torch.Tensor) -> None:
    """g[j] *= row_factor[row(j) - first_row] in place (row_factor as returned by _row_sums's layout)."""
    if g.dtype in _NARROW:
        # Multiply in fp32 and round once: casting the factors to bf16/fp16 first would round
        # them (bf16 keeps 8 bits) before a second rounding of the product.
        wide = g.float()
        _scale_rows_(wide, offset, row_len, row_factor)
        g.copy_(wide)
        return
    n = g.numel()
    first_row = offset // row_len
    head = min(n, (first_row + 1) * row_len - offset)
    f = row_factor.to(g.dtype)
    g[:head].mul_(f[0])
    if head < n:
        body_rows = (n - head) // row_len
        if body_rows:
            g[head:head + body_rows * row_len].view(body_rows, row_len).mul_(f[1:1 + body_rows].unsqueeze(1))
        tail = head + body_rows * row_len
        if tail < n:
            g[tail:].mul_(f[-1])


def _unit_span(s: GradSlice) -> tuple:
    """(first global unit id, row_len) for a slice; row_len = whole local tensor if 0."""
    row_len = s.row_len if s.row_len > 0 else None
    if row_len is None:
        return s.unit_base, None
    return s.unit_base + s.offset // row_len, row_len


class SliceSet:
    """The gradient slices one rank owns, and how to turn them into reduced statistics.

    ``reduce`` all-reduces (sums) one float64 vector in place over the group that shards these
    slices; the identity for a single process. ``loss_scale`` is the factor the slices carry
    (the loss scale backward used): statistics are of ``grad / loss_scale``.
    """

    def __init__(self, slices: Sequence[GradSlice], layout: GroupLayout,
                 reduce: Optional[Callable[[torch.Tensor], None]] = None):
        self.slices = list(slices)
        self.layout = layout
        self.reduce = reduce
        self.loss_scale = 1.0
        self.collectives = 0       # number of reductions run (for the benchmark and tests)
        dev = layout.device
        counted = [s for s in self.slices if s.counted and s.grad.numel() > 0]
        self._counted = [s.grad for s in counted]
        self._counted_group = torch.tensor([s.group for s in counted], dtype=torch.long, device=dev)
        self._counted_slices = counted
        self._group_of = [s.group for s in self.slices]

    # -------------------------------------------------------------- statistics
    def compute(self, needs: frozenset) -> Stats:
        """Local sums of what ``needs`` names, packed and reduced in one collective."""
        L = self.layout.num_groups
        U = self.layout.unit_group.numel()
        dev = self.layout.device
        parts: Dict[str, torch.Tensor] = {}
        if SUMSQ in needs:
            parts[SUMSQ] = self._group_sum(2, L, dev)
        if SUMABS in needs:
            parts[SUMABS] = self._group_sum(1, L, dev)
        if UNIT_SUMSQ in needs:
            parts[UNIT_SUMSQ] = self._unit_sum(lambda s: s.grad, U, dev)
        if UNIT_PARAM_SUMSQ in needs:
            parts[UNIT_PARAM_SUMSQ] = self._unit_sum(lambda s: s.param, U, dev)
        keys = list(parts)
        packed = torch.cat([parts[k] for k in keys]) if keys else torch.zeros(0, dtype=STAT_DTYPE, device=dev)
        if self.reduce is not None and packed.numel():
            self.reduce(packed)
            self.collectives += 1
        out = dict(zip(keys, torch.split(packed, [parts[k].numel() for k in keys])))
        s = float(self.loss_scale)
        if s != 1.0:
            for k in (SUMSQ, UNIT_SUMSQ):
                if k in out:
                    out[k] = out[k] / (s * s)
            if SUMABS in out:
                out[SUMABS] = out[SUMABS] / s
        return Stats(**out)

    def _group_sum(self, p: int, L: int, dev) -> torch.Tensor:
        acc = torch.zeros(L, dtype=STAT_DTYPE, device=dev)
        if self._counted:
            norms = torch.stack(torch._foreach_norm(self._counted, p, dtype=STAT_DTYPE))
            acc.index_add_(0, self._counted_group, norms.square() if p == 2 else norms)
        return acc

    def _unit_sum(self, which, U: int, dev) -> torch.Tensor:
        acc = torch.zeros(U, dtype=STAT_DTYPE, device=dev)
        for s in self._counted_slices:
            x = which(s)
            if x is None:
                raise ValueError("unit-wise statistics need the parameter values of every slice")
            x2 = x.to(STAT_DTYPE).square()
            first, row_len = _unit_span(s)
            if row_len is None:
                acc[first] += x2.sum()
            else:
                sums = _row_sums(x2, s.offset, row_len)
                acc[first:first + sums.numel()] += sums
        return acc

    # -------------------------------------------------------------- application
    def apply(self, scale: torch.Tensor, unit_scale: Optional[torch.Tensor],
              elementwise: Optional[Elementwise]) -> None:
        """Multiply each slice by its group's factor (fused), then unit factors, then the map."""
        factors = scale.tolist()
        tensors, scalars = [], []
        for s, grp in zip(self.slices, self._group_of):
            f = factors[grp]
            if f != 1.0 and s.grad.numel():
                tensors.append(s.grad)
                scalars.append(f)
        if tensors:
            _mul_rounded_once_(tensors, scalars)
        if unit_scale is not None:
            for s in self.slices:
                if not s.grad.numel():
                    continue
                first, row_len = _unit_span(s)
                if row_len is None:
                    _mul_rounded_once_([s.grad], [float(unit_scale[first])])
                else:
                    n_rows = (s.offset + s.grad.numel() - 1) // row_len - s.offset // row_len + 1
                    _scale_rows_(s.grad, s.offset, row_len, unit_scale[first:first + n_rows])
        if elementwise is not None:
            self._map(elementwise)

    def _map(self, fn: Elementwise) -> None:
        params = fn.host_params()
        ls = float(self.loss_scale)
        for s, grp in zip(self.slices, self._group_of):
            if not s.grad.numel():
                continue
            kw = {k: v[grp] for k, v in params.items()}
            # The map is defined on true gradient values and computed in at least fp32 whatever
            # the storage dtype: |g|^alpha of a bf16 value is not a bf16 operation (and an fp64
            # gradient is not rounded to fp32).
            g = s.grad.to(torch.promote_types(s.grad.dtype, torch.float32))
            if ls != 1.0:
                g = g / ls
            out = fn.apply(g, **kw)
            if ls != 1.0:
                out = out * ls
            s.grad.copy_(out)


def slices_from_params(named_params, group_of: Callable[[str], int], with_param: bool = False,
                       unit_base: Optional[Dict[str, int]] = None) -> List[GradSlice]:
    """Whole-tensor slices of ``p.grad`` for a single process (the unsharded reference)."""
    out = []
    for name, p in named_params:
        if p.grad is None:
            continue
        row_len = p.numel() // p.shape[0] if p.dim() >= 2 else 0
        out.append(GradSlice(grad=p.grad.view(-1), group=group_of(name), counted=True,
                             param=p.detach().view(-1) if with_param else None, offset=0, row_len=row_len,
                             unit_base=(unit_base or {}).get(name, 0)))
    return out
