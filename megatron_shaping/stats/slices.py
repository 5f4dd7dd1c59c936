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
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import math

import torch

from ..profiling import APPLY, STATS, marked
from . import kernels
from ..shapers.base import (STAT_DTYPE, SUMABS, SUMSQ, UNIT_PARAM_SUMSQ, UNIT_SUMSQ, Elementwise, GroupLayout,
                            Plan, Stats)


#: Elements per partial sum on the CPU path: each partial is the sum kernel's float64 sum of
#: exact squares (relative error ~1e-16; :func:`_kernel_sums`), or on the torch path accumulated
#: in fp32 by PyTorch's native row reduction (~1e-7 for 2048 elements); the partials are added
#: in float64.
CHUNK = 2048
#: 16-bit slices are widened to fp32 in runs of at most this many elements (bounded temporary).
WIDEN_BLOCK = 1 << 18
#: A partial norm below this (or not finite) is recomputed exactly: fp32 squares underflow
#: below ~1e-19 and overflow above ~1e19, so such a chunk's fp32 norm may be wrong (or is a
#: genuine inf/nan, which the exact float64 pass keeps). 1e-13: a chunk of 2048 entries below
#: it, scaled by 2^100, can neither overflow nor lose a normal fp32 square.
_LOW = 1e-13
#: Sums of |x| on the CPU go through a bounded fp32 buffer of this many elements.
ABS_BLOCK = 1 << 16
_UP = 2.0 ** 100


@dataclass
class GradSlice:
    grad: torch.Tensor                   # 1-D view into the real gradient storage (any float dtype)
    group: int                           # statistics group (layer) id
    counted: bool = True                 # False: a replica counted by another slice
    param: Optional[torch.Tensor] = None  # 1-D values of the matching parameter elements (AGC)
    offset: int = 0                      # flat offset of grad[0] within the local tensor
    row_len: int = 0                     # elements per unit (row) of the local tensor; 0: one unit
    unit_base: int = 0                   # global unit id of the local tensor's row 0


class Piece(NamedTuple):
    """What a front end hands over for one :class:`GradSlice` before it is described (group,
    counted, units: :class:`SliceCache`): the parameter, a 1-D view into the real gradient
    storage, the flat offset of ``grad[0]`` in the local tensor, and the matching parameter
    values (1-D) or None."""
    param: torch.Tensor
    grad: torch.Tensor
    offset: int
    values: Optional[torch.Tensor]


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


#: (device type, 16-bit dtype, factor dtype or "rows") -> whether the native multiply of a
#: 16-bit tensor by that factor computes in fp32 and rounds once (see _native_rounds_once).
_NATIVE_ONCE: Dict[tuple, bool] = {}


def _probe_data(dtype, device):
    """64 16-bit values (every 7-bit mantissa, both signs) and a factor whose products differ
    between one rounding (fp32 product rounded to the 16-bit dtype) and two (the factor rounded
    to the 16-bit dtype first) on about a third of them (bf16 and fp16)."""
    x = ((torch.arange(64, dtype=torch.float32, device=device) % 2 * -2 + 1)
         * (1 + torch.arange(64, dtype=torch.float32, device=device) / 64)).to(dtype)
    return x, 1.0 / 3.0


def _native_rounds_once(device: torch.device, dtype: torch.dtype, form) -> bool:
    """Whether the native multi-tensor multiply of a ``dtype`` tensor on ``device`` rounds once.

    ``form``: a factor dtype (0-d factor tensors, as :func:`_mul_rounded_once_` passes them) or
    ``"rows"`` (fp32 factors broadcast over rows, as :func:`_scale_rows_`). PyTorch's CPU kernels
    read a 0-d CPU factor in fp32 and round the product once; an accelerator may cast a 0-d
    device factor to the 16-bit dtype first (two roundings). Probed once per (device type,
    dtype, form) on a few elements where the two differ, compared with the widened product;
    any error or difference selects the widening path."""
    key = (device.type, dtype, form)
    hit = _NATIVE_ONCE.get(key)
    if hit is None:
        x, f = _probe_data(dtype, device)
        want = (x.float() * f).to(dtype)
        try:
            got = x.clone()
            if form == "rows":
                fac = torch.full((8, 1), f, dtype=torch.float32, device=device)
                torch._foreach_mul_([got[:56].view(7, 8), got[56:]], [fac[:7], fac[7]])
            else:
                torch._foreach_mul_([got], [torch.tensor(f, dtype=form, device=device)])
            hit = bool(torch.equal(got, want))
        except (RuntimeError, TypeError):
            hit = False
        _NATIVE_ONCE[key] = hit
    return hit


def _mul_rounded_once_(tensors: List[torch.Tensor], scalars: List) -> None:
    """tensors[i] *= scalars[i] in place, each product rounded once to the tensor's dtype.

    ``torch._foreach_mul_`` with Python scalars computes a bf16/fp16 tensor's product with the
    scalar already rounded to that dtype (a factor off by up to 0.4 % in bf16). A 16-bit tensor
    is multiplied natively (:func:`_narrow_factor`) where :func:`_native_rounds_once` found that
    this computes in fp32 and rounds once; elsewhere it is widened to fp32 (one slice-sized
    temporary at a time), multiplied and rounded once. fp32/fp64 tensors and the native 16-bit
    ones go through one multi-tensor call.
    ``scalars``: Python floats or 0-d tensors (factors kept on the device: no host read).
    """
    wide_t, wide_s = [], []
    for t, f in zip(tensors, scalars):
        if t.dtype in _NARROW:
            native = _narrow_factor(t, f)
            if native is None:
                t.copy_(t.float().mul_(f))
                continue
            f = native
        wide_t.append(t)
        wide_s.append(f)
    if wide_t:
        if len({isinstance(f, torch.Tensor) for f in wide_s}) > 1:
            # one multi-tensor call takes scalars of one kind: Python floats beside the 0-d
            # factors of native 16-bit tensors become 0-d float64 tensors (an fp32 product is
            # computed and rounded as with the float)
            wide_s = [f if isinstance(f, torch.Tensor) else torch.tensor(f, dtype=torch.float64, device=t.device)
                      for t, f in zip(wide_t, wide_s)]
        torch._foreach_mul_(wide_t, wide_s)


def _narrow_factor(t: torch.Tensor, f):
    """The factor to multiply the 16-bit tensor ``t`` by natively with one rounding, or None
    (widen): a 0-d factor where the device reads it in fp32 (the CPU), else a 1-element fp32
    tensor, whose type promotion makes the multiply compute in fp32 (one fused pass on an
    accelerator; on the CPU slower than widening), each as the probe confirms."""
    form = f.dtype if isinstance(f, torch.Tensor) else torch.float64
    if _native_rounds_once(t.device, t.dtype, form):
        return f if isinstance(f, torch.Tensor) else torch.tensor(f, dtype=torch.float64, device=t.device)
    if _native_rows(t.device) and _native_rounds_once(t.device, t.dtype, "rows"):
        if isinstance(f, torch.Tensor):
            return f.to(torch.float32).view(1)
        return torch.tensor([f], dtype=torch.float32, device=t.device)
    return None


def _native_rows(device: torch.device) -> bool:
    """Row scaling of 16-bit slices without widening: on the CPU the mixed-dtype broadcast
    multiply is slower than widening (0.09 vs 0.06 ms for 128K bf16 elements), elsewhere it is
    one fused pass; used where :func:`_native_rounds_once` confirms it rounds once."""
    return device.type != "cpu"


def _row_pieces(g: torch.Tensor, offset: int, row_len: int, f: torch.Tensor):
    """(piece of g, its factor) for the partial first row, the whole rows and the partial last row."""
    n = g.numel()
    head = min(n, (-offset) % row_len)
    out = [(g[:head], f[0:1])] if head else []
    body_rows = (n - head) // row_len
    r0 = 1 if head else 0
    if body_rows:
        out.append((g[head:head + body_rows * row_len].view(body_rows, row_len), f[r0:r0 + body_rows].unsqueeze(1)))
    tail = head + body_rows * row_len
    if tail < n:
        out.append((g[tail:], f[r0 + body_rows:r0 + body_rows + 1]))
    return out


def _scale_rows_(g: torch.Tensor, offset: int, row_len: int, row_factor: torch.Tensor) -> None:
    """g[j] *= row_factor[row(j) - first_row] in place (row_factor as returned by _row_sums's layout)."""
    if g.dtype in _NARROW:
        if _native_rows(g.device) and _native_rounds_once(g.device, g.dtype, "rows"):
            f = row_factor.to(torch.float32)     # fp32 arithmetic, one rounding (as widened)
        else:
            # Multiply in fp32 and round once: casting the factors to bf16/fp16 first would
            # round them (bf16 keeps 8 bits) before a second rounding of the product.
            wide = g.float()
            _scale_rows_(wide, offset, row_len, row_factor)
            g.copy_(wide)
            return
    else:
        f = row_factor.to(g.dtype)
    pieces = _row_pieces(g, offset, row_len, f)
    torch._foreach_mul_([x for x, _ in pieces], [y for _, y in pieces])


def _unit_span(s: GradSlice) -> tuple:
    """(first global unit id, row_len) for a slice; row_len = whole local tensor if 0."""
    row_len = s.row_len if s.row_len > 0 else None
    if row_len is None:
        return s.unit_base, None
    return s.unit_base + s.offset // row_len, row_len


# ---------------------------------------------------------------------------------- partial sums
# A *run* (start, k, length) is k consecutive chunks of ``length`` elements of one flat tensor,
# starting at element ``start``: one native row reduction gives its k partial sums. Runs and the
# output index of every partial (group or unit id) depend only on the slices' geometry, so they
# are built once per geometry (:class:`SliceMeta`) and reused every step.

def _chunk_runs(start: int, n: int, chunk: int) -> List[Tuple[int, int, int]]:
    """n elements from ``start`` as chunks of ``chunk`` elements and a shorter last one."""
    runs = []
    q, r = divmod(n, chunk)
    if q:
        runs.append((start, q, chunk))
    if r:
        runs.append((start + q * chunk, 1, r))
    return runs


def _row_chunk(row_len: int) -> int:
    """Chunk length for rows longer than CHUNK: the largest divisor of row_len <= CHUNK (>= 256),
    else whole rows (one fp32 accumulation per row)."""
    if row_len <= CHUNK:
        return row_len
    for d in range(CHUNK, 255, -1):
        if row_len % d == 0:
            return d
    return row_len


def _group_runs(n: int, out_id: int):
    runs = _chunk_runs(0, n, CHUNK)
    return runs, [out_id] * sum(k for _, k, _ in runs)


def _unit_runs(n: int, offset: int, row_len: int, unit_first: int):
    """Runs over a slice that starts ``offset`` elements into a tensor of rows of ``row_len``;
    every partial maps to the global unit id of its row (``unit_first`` = the first row's)."""
    runs: List[Tuple[int, int, int]] = []
    ids: List[int] = []
    # A slice that starts on a row boundary has no partial first row; rows of at most CHUNK
    # elements are one partial each either way (same values: one run fewer).
    head = min(n, row_len - offset % row_len)
    if head == row_len and row_len <= CHUNK:
        head = 0
    for r in _chunk_runs(0, head, CHUNK):
        runs.append(r)
        ids += [unit_first] * r[1]
    r0 = unit_first + (1 if head else 0)     # unit of the first whole row
    body = (n - head) // row_len
    if body:
        d = _row_chunk(row_len)
        m = row_len // d
        runs.append((head, body * m, d))
        ids += [r0 + j // m for j in range(body * m)]
    tail_start = head + body * row_len
    if tail_start < n:
        for r in _chunk_runs(tail_start, n - tail_start, CHUNK):
            runs.append(r)
            ids += [r0 + body] * r[1]
    return runs, ids


def _split_runs(runs, block: int):
    """Split runs so that none covers more than ``block`` elements (16-bit widening)."""
    out = []
    for a, k, length in runs:
        per = max(1, block // length)
        for j in range(0, k, per):
            kk = min(per, k - j)
            out.append((a + j * length, kk, length))
    return out


class _Partials:
    """Runs of every counted tensor of one statistic and the output index of their partials.

    Tensors of at most CHUNK elements (biases, norm weights, small pieces at partition edges)
    are reduced together by one multi-tensor call (``small``); the others run by run (``big``).
    Partials are ordered small first, then big, and ``index`` / ``where`` follow that order."""

    def __init__(self, runs_per_tensor: List[list], ids_per_tensor: List[List[int]], size: int, device):
        self.small = [t for t, runs in enumerate(runs_per_tensor) if len(runs) == 1 and runs[0][:2] == (0, 1)]
        small = set(self.small)
        self.big = [(t, runs) for t, runs in enumerate(runs_per_tensor) if t not in small]
        ids: List[int] = []
        # (tensor position, start, length) of every partial, for the exact recomputation
        self.where: List[Tuple[int, int, int]] = []
        for t in self.small:
            ids += ids_per_tensor[t]
            self.where.append((t, 0, runs_per_tensor[t][0][2]))
        for t, runs in self.big:
            ids += ids_per_tensor[t]
            for a, k, length in runs:
                self.where += [(t, a + j * length, length) for j in range(k)]
        self.index = torch.tensor(ids, dtype=torch.long, device=device)
        self.size = size
        self.n = len(runs_per_tensor)
        self.max_run = max((k * length for _, runs in self.big for _, k, length in runs), default=0)
        #: (tensor position, start, k, length) of every run in partial order (the kernel's table)
        self.runs = [(t, 0, 1, runs_per_tensor[t][0][2]) for t in self.small] + \
            [(t, a, k, length) for t, runs in self.big for a, k, length in runs]
        self._table: Optional[kernels.RunTable] = None
        self._pair: Optional[Tuple["_Partials", kernels.RunTable]] = None

    def table(self) -> "kernels.RunTable":
        """The runs as the sum kernel's table (built on first use, kept: the geometry is fixed)."""
        if self._table is None:
            self._table = kernels.RunTable(self.runs, self.n)
        return self._table

    def pair_table(self, other: "_Partials", n: int) -> "kernels.RunTable":
        """These runs over tensors 0..n-1, then ``other``'s over tensors n.. (AGC's gradient and
        parameter rows in one kernel call), kept for the same ``other``."""
        if self._pair is None or self._pair[0] is not other:
            runs = self.runs + [(t + n, a, k, length) for t, a, k, length in other.runs]
            self._pair = (other, kernels.RunTable(runs, n + other.n))
        return self._pair[1]


def _kernel_ok(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the CPU sum kernel takes these tensors (enabled, built, every one fp32/bf16/fp16
    contiguous on the CPU); float64 data and the fallback keep the torch path."""
    return bool(tensors) and kernels.enabled() and all(kernels.readable(t) for t in tensors) and kernels.available()


def _kernel_sums(tensors: Sequence[torch.Tensor], parts: _Partials, sq: bool = True, ab: bool = False):
    """(sums of x^2, sums of |x|) of every chunk of ``parts``, float64, in partial order, from
    one kernel call (:func:`kernels.sums`: exact squares, no exact pass needed), or None."""
    if not _kernel_ok(tensors):
        return None
    return kernels.sums(tensors, parts.table(), sq, ab)


def _index_sum(vals: torch.Tensor, parts: _Partials) -> torch.Tensor:
    """float64 partials (already sums of squares or of |x|) added into their output ids."""
    return torch.zeros(parts.size, dtype=STAT_DTYPE, device=vals.device).index_add_(0, parts.index, vals)


def _acc_dtype(x: torch.Tensor, cpu: bool):
    """Accumulation dtype of a partial: float64 off the CPU and for float64 data; on the CPU
    fp32 (None: the tensor's own fp32), 16-bit widened to fp32."""
    if x.dtype == torch.float64 or not cpu:
        return STAT_DTYPE
    return None if x.dtype == torch.float32 else torch.float32


def _abs_run_sums(seg: torch.Tensor, k: int, length: int, buf: torch.Tensor,
                  sq: Optional[List[torch.Tensor]] = None, dt=None) -> List[torch.Tensor]:
    """Sums of |x| of the k chunks of ``length`` elements in ``seg``, through the bounded fp32
    ``buf``: vector_norm(ord=1) takes a slow generic path on the CPU; |x| into a buffer and a
    native row sum are ~3x faster. ``sq``: also append the chunks' L2 norms (accumulated in
    ``dt``, the same reduction the p = 2 pass makes) block by block, from the same read."""
    out = []
    per = max(1, buf.numel() // length)
    for j in range(0, k, per):
        kk = min(per, k - j)
        b = buf[:kk * length]
        if b.numel() < kk * length:
            b = torch.empty(kk * length, dtype=torch.float32, device=seg.device)
        blk = seg.narrow(0, j * length, kk * length)
        if blk.dtype == torch.float32:
            torch.abs(blk, out=b)
        else:
            b.copy_(blk).abs_()
        out.append(b.view(kk, length).sum(1))
        if sq is not None:
            # 16-bit: the fp32 copy already made (|x| has the same squares; PyTorch widens a
            # 16-bit input the same way before reducing it), else the block while in cache
            src = blk if blk.dtype == torch.float32 else b
            sq.append(torch.linalg.vector_norm(src.view(kk, length), 2, dim=1, dtype=dt if src is blk else None))
    return out


def _small_partials(xs: List[torch.Tensor], p: int, cpu: bool) -> List[torch.Tensor]:
    dts = {_acc_dtype(x, cpu) for x in xs}
    if len(dts) == 1:
        return [torch.stack(torch._foreach_norm(xs, p, dtype=dts.pop())).view(-1)]
    return [torch.linalg.vector_norm(x, p, dtype=_acc_dtype(x, cpu)).view(1) for x in xs]


def _run_partials(tensors: Sequence[torch.Tensor], parts: _Partials, p: int, cpu: bool,
                  sq: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
    """The partials of every run, small tensors first (one multi-tensor call), in parts' order.
    ``sq`` (with p = 1): the p = 2 partials of the same runs are appended to it, in the same
    order, from the same pass (the big runs' blocks are read once for both)."""
    out = []
    if parts.small:
        xs = [tensors[t] for t in parts.small]
        out += _small_partials(xs, p, cpu)
        if sq is not None:
            sq += _small_partials(xs, 2, cpu)
    buf = None
    for t, runs in parts.big:
        x = tensors[t]
        dt = _acc_dtype(x, cpu)
        for a, k, length in runs:
            seg = x.narrow(0, a, k * length)
            if p == 1 and dt != STAT_DTYPE:
                if buf is None:
                    buf = torch.empty(max(min(ABS_BLOCK, parts.max_run), length), dtype=torch.float32,
                                      device=x.device)
                out += _abs_run_sums(seg, k, length, buf, sq, dt)
            else:
                out.append(torch.linalg.vector_norm(seg.view(k, length), p, dim=1, dtype=dt))
                if sq is not None:
                    sq.append(torch.linalg.vector_norm(seg.view(k, length), 2, dim=1, dtype=dt))
    return out


def _exact_where_needed(vals: torch.Tensor, tensors, parts: _Partials, p: int,
                        more: Sequence[Tuple[Sequence[torch.Tensor], _Partials]] = ()) -> torch.Tensor:
    """fp32 CPU partials to float64, with the ones that may have over- or underflowed fp32 (and
    genuine inf/nan) recomputed exactly. nonzero() and numel() read no tensor value; the host
    reads happen only when a partial needs the exact pass (a zero or tiny chunk, an overflow).
    ``more``: further (tensors, parts) whose partials follow those of ``parts`` in ``vals``
    (AGC's gradient and parameter rows: one check and at most two host reads for both)."""
    # partials are norms (>= 0, +inf or nan): not finite <=> not below inf; below _LOW => finite
    redo_big = (vals < math.inf).logical_not_().nonzero().view(-1)
    redo_small = (vals < _LOW).nonzero().view(-1) if p == 2 else None
    vals = vals.to(STAT_DTYPE)
    segments = [(tensors, parts)] + list(more)
    for idx, scaled in ((redo_big, False), (redo_small, True)):
        if idx is None or not idx.numel():
            continue
        todo, start = idx.tolist(), 0
        for seg_tensors, seg_parts in segments:
            n = len(seg_parts.where)
            mine = [j - start for j in todo if start <= j < start + n]
            if mine:
                _exact_partials(seg_tensors, seg_parts, vals.narrow(0, start, n), mine, p, scaled)
            start += n
    return vals


def _sum_partials(out: List[torch.Tensor], tensors, parts: _Partials, p: int) -> torch.Tensor:
    # Any fp32 partial (a float64 tensor's are exact) takes the check: with float64 ones beside
    # it, cat promotes it to float64 and the dtype alone would not show that it may have over-
    # or underflowed.
    inexact = any(o.dtype != STAT_DTYPE for o in out)
    vals = torch.cat(out) if len(out) > 1 else out[0]
    if inexact:
        vals = _exact_where_needed(vals, tensors, parts, p)
    if p == 2:
        vals = vals.square()
    acc = torch.zeros(parts.size, dtype=STAT_DTYPE, device=vals.device)
    return acc.index_add_(0, parts.index, vals)


def _reduce_partials(tensors: Sequence[torch.Tensor], parts: _Partials, p: int) -> torch.Tensor:
    """float64 vector of ``parts.size`` sums: sum of x^2 (p=2) or |x| (p=1) per output id.

    CPU, fp32/bf16/fp16 with the kernels built: the float64 partials of every chunk from one
    call of the sum kernel (:func:`_kernel_sums`: reads the storage once, squares exact in
    float64, nothing to recompute). Otherwise (float64 data, ``MEGATRON_SHAPING_KERNELS=0``, no
    compiler) each run's partials come from PyTorch's native fp32 row reduction (16-bit runs
    widened to fp32 in bounded blocks), no float64 copy of the gradient, and are added in
    float64; partials that may have overflowed or underflowed in fp32 (and genuine inf/nan) are
    recomputed exactly. Other devices: the same runs reduced with ``dtype=float64``."""
    if not tensors:
        return torch.zeros(parts.size, dtype=STAT_DTYPE, device=parts.index.device)
    got = _kernel_sums(tensors, parts, sq=p == 2, ab=p == 1)
    if got is not None:
        return _index_sum(got[0] if p == 2 else got[1], parts)
    return _sum_partials(_run_partials(tensors, parts, p, tensors[0].device.type == "cpu"), tensors, parts, p)


def _reduce_partials_sq_abs(tensors: Sequence[torch.Tensor], parts: _Partials) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sums of x^2, sums of |x|) per output id, as two _reduce_partials calls give them, from
    one pass over the data (one kernel call for both where the kernel runs)."""
    if not tensors:
        z = torch.zeros(parts.size, dtype=STAT_DTYPE, device=parts.index.device)
        return z, z.clone()
    got = _kernel_sums(tensors, parts, sq=True, ab=True)
    if got is not None:
        return _index_sum(got[0], parts), _index_sum(got[1], parts)
    sq: List[torch.Tensor] = []
    ab = _run_partials(tensors, parts, 1, tensors[0].device.type == "cpu", sq)
    return _sum_partials(sq, tensors, parts, 2), _sum_partials(ab, tensors, parts, 1)


def _reduce_unit_pair(grads: Sequence[torch.Tensor], gparts: _Partials, params: Sequence[torch.Tensor],
                      pparts: _Partials, index: torch.Tensor, out: torch.Tensor) -> None:
    """AGC's unit sums of squares of the gradient (``out[:U]``) and of the parameters
    (``out[U:]``), added into the zeros of ``out``: the partials of both as
    :func:`_reduce_partials` takes them, checked for the exact pass together, squared and added
    by one index_add_ (``index``: the gradient partials' unit ids, then the parameters' + U).
    Bit for bit the two _reduce_partials calls (each unit's partials are added in the same
    order); partials of different dtypes (float64 gradient, fp32 parameters) take those calls.
    With the sum kernel: one kernel call for the gradient and parameter rows (already float64
    squares: no exact pass)."""
    if not grads:
        return
    if _kernel_ok(list(grads) + list(params)):
        vals = kernels.sums(list(grads) + list(params), gparts.pair_table(pparts, len(grads)))
        if vals is not None:
            out.index_add_(0, index, vals[0])
            return
    U = gparts.size
    if _kernel_ok(grads) or _kernel_ok(params):     # one side by the kernel: as the two calls
        out[:U].copy_(_reduce_partials(grads, gparts, 2))
        out[U:].copy_(_reduce_partials(params, pparts, 2))
        return
    cpu = grads[0].device.type == "cpu"
    og = _run_partials(grads, gparts, 2, cpu)
    op = _run_partials(params, pparts, 2, cpu)
    if {v.dtype for v in og + op} != {og[0].dtype}:
        out[:U].copy_(_sum_partials(og, grads, gparts, 2))
        out[U:].copy_(_sum_partials(op, params, pparts, 2))
        return
    vals = torch.cat(og + op)
    if vals.dtype != STAT_DTYPE:
        vals = _exact_where_needed(vals, grads, gparts, 2, more=[(params, pparts)])
    out.index_add_(0, index, vals.square())


def _exact_partials(tensors, parts: _Partials, vals: torch.Tensor, idx: Sequence[int], p: int, scaled: bool) -> None:
    """Recompute the partials at positions ``idx`` of ``vals`` in place without fp32's range
    limits (CPU path).

    ``scaled``: chunks whose fp32 norm is below _LOW (every entry < 1e-13, including all-zero
    chunks such as embedding rows no token hit) are reduced in fp32 after an exact scaling by
    2^100, which keeps every square a normal fp32 number. Otherwise (overflow, inf, nan) the
    chunk is reduced in float64. The chunks of one run are gathered in batches of at most
    WIDEN_BLOCK elements, so the temporaries stay bounded."""
    by_len: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
    for j in idx:
        t, a, length = parts.where[j]
        by_len.setdefault((t, length), []).append((j, a))
    for (t, length), items in by_len.items():
        x = tensors[t]
        per = max(1, WIDEN_BLOCK // length)
        for b in range(0, len(items), per):
            batch = items[b:b + per]
            starts = torch.tensor([a for _, a in batch], dtype=torch.long, device=x.device)
            gather = (starts.unsqueeze(1) + torch.arange(length, device=x.device)).view(-1)
            rows = x.index_select(0, gather).view(len(batch), length)
            where = torch.tensor([j for j, _ in batch], dtype=torch.long, device=vals.device)
            if scaled and length <= CHUNK:
                rows = rows.to(torch.float32).mul_(_UP)
                exact = torch.linalg.vector_norm(rows, p, dim=1).to(STAT_DTYPE) / _UP
            else:
                exact = torch.linalg.vector_norm(rows.to(STAT_DTYPE), p, dim=1)
            vals.index_copy_(0, where, exact)


class _Taken(NamedTuple):
    """Group sums of squares a map's kernel took of its result (:meth:`SliceSet._map_kernel`)."""
    sums: torch.Tensor

    def result(self) -> torch.Tensor:
        return self.sums


class _MapSums:
    """Group partial norms of a map's result, taken while each mapped block is in cache (CPU).

    The second statistics pass after an elementwise map (``compute({SUMSQ})``) would read every
    counted slice again for the partials of ``meta.group_parts``. The map hands each block it
    wrote (:meth:`add`: a view of slice ``i`` starting ``start`` elements in, a multiple of
    CHUNK) and the partials are taken from it right away, with the same reduction per chunk as
    that pass: the sum kernel's float64 sums of squares where it runs (``kern``: a chunk's sum
    depends only on its values), else :func:`_run_partials`'s p = 2 form (chunks of CHUNK, fp32
    or float64 accumulation); small tensors (one partial each) and slices the map left alone are
    reduced in :meth:`result`. :meth:`result` orders the partials as ``group_parts`` does and
    adds them as :func:`_reduce_partials` does (kernel sums by :func:`_index_sum`, else
    :func:`_sum_partials`, exact recomputation included), so the sums are those of the second
    pass, bit for bit."""

    def __init__(self, meta: "SliceMeta", counted: List[torch.Tensor]):
        self.parts = meta.group_parts
        self.counted = counted
        self.kern = _kernel_ok(counted)
        self.pos = {i: t for t, i in enumerate(meta.counted)}
        self.small = set(self.parts.small)
        self.runs = dict(self.parts.big)
        self.got: Dict[int, List[torch.Tensor]] = {}
        self._todo: List[Tuple[int, int, torch.Tensor]] = []

    def add(self, i: int, start: int, piece: torch.Tensor) -> None:
        t = self.pos.get(i)
        if t is not None and t not in self.small:
            self._todo.append((t, start, piece))

    def take(self) -> None:
        """Partials of the blocks added since the last call (the map has written them); small
        tensors are left to :meth:`result` (one multi-tensor call for all, as the second pass)."""
        todo, self._todo = self._todo, []
        blocks = []
        for t, a, x in todo:
            have = self.got.setdefault(t, [])
            if have is None or a % CHUNK or sum(v.numel() for v in have) != _chunks_before(self.runs[t], a):
                self.got[t] = None      # off the chunk grid: reduced again in result()
                continue
            if self.kern:
                blocks.append((t, x))
                continue
            have += _run_partials_p2(x, _chunk_runs(0, x.numel(), CHUNK))
        if blocks:
            self._take_kernel(blocks)

    def _take_kernel(self, blocks: List[Tuple[int, torch.Tensor]]) -> None:
        """The kernel's sums of squares of the blocks' chunks of CHUNK, one call for all."""
        runs = [(j, a, k, length) for j, (_, x) in enumerate(blocks) for a, k, length in _chunk_runs(0, x.numel(), CHUNK)]
        got = kernels.sums([x for _, x in blocks], kernels.RunTable(runs, len(blocks)))
        if got is None:
            for t, _ in blocks:
                self.got[t] = None
            return
        counts = [-(-x.numel() // CHUNK) for _, x in blocks]
        for (t, _), v in zip(blocks, got[0].split(counts)):
            self.got[t].append(v)

    def result(self) -> torch.Tensor:
        """float64 group sums of squares of the counted slices as they are now."""
        if not self.counted:      # e.g. a rank that holds only replicas
            return torch.zeros(self.parts.size, dtype=STAT_DTYPE, device=self.parts.index.device)
        self.take()
        full = {t for t, runs in self.parts.big if self._complete(t, runs)}
        if self.kern:
            return self._result_kernel(full)
        out: List[torch.Tensor] = []
        if self.parts.small:
            out += _small_partials([self.counted[t] for t in self.parts.small], 2, True)
        for t, runs in self.parts.big:
            out += self.got[t] if t in full else _run_partials_p2(self.counted[t], runs)
        return _sum_partials(out, self.counted, self.parts, 2)

    def _complete(self, t: int, runs) -> bool:
        have = self.got.get(t)
        return bool(have) and sum(v.numel() for v in have) == sum(k for _, k, _ in runs)

    def _result_kernel(self, full: set) -> torch.Tensor:
        """The kernel's sums of the chunks not taken yet (small tensors, slices the map left
        alone, blocks off the grid), one call, merged in partial order with those taken."""
        rest = [r for r in self.parts.runs if r[0] not in full]
        sums = kernels.sums(self.counted, kernels.RunTable(rest, len(self.counted)))[0] if rest else None
        out: List[torch.Tensor] = []
        at, done = 0, set()
        for t, _, k, _ in self.parts.runs:
            if t in full:
                if t not in done:
                    out += self.got[t]
                    done.add(t)
            else:
                out.append(sums.narrow(0, at, k))
                at += k
        return _index_sum(torch.cat(out), self.parts)


def _chunks_before(runs, a: int) -> int:
    """How many partials of ``runs`` lie before element ``a`` (a on the chunk grid)."""
    n = 0
    for b, k, length in runs:
        if b >= a:
            break
        n += min(k, (a - b) // length)
    return n


def _run_partials_p2(x: torch.Tensor, runs) -> List[torch.Tensor]:
    """The p = 2 partials of one tensor's runs, as :func:`_run_partials` takes them on the CPU."""
    dt = _acc_dtype(x, True)
    return [torch.linalg.vector_norm(x.narrow(0, a, k * length).view(k, length), 2, dim=1, dtype=dt)
            for a, k, length in runs]


class SliceMeta:
    """Everything about a list of slices that does not change between steps as long as the
    slices cover the same parameters the same way: counted positions, partial-sum runs and their
    group / unit indices, the group of each slice. Built once (at attach time in the DeepSpeed
    integration, see :class:`SliceCache`) and shared by the per-step :class:`SliceSet`."""

    def __init__(self, slices: Sequence[GradSlice], layout: GroupLayout):
        dev = layout.device
        self.key = _geometry(slices)
        self.layout = layout
        L = layout.num_groups
        U = layout.unit_group.numel()
        self.counted = [i for i, s in enumerate(slices) if s.counted and s.grad.numel() > 0]
        self.group_of = [s.group for s in slices]
        counted = [slices[i] for i in self.counted]
        self.counted_group = torch.tensor([s.group for s in counted], dtype=torch.long, device=dev)
        g_runs, g_ids = [], []
        u_runs, u_ids = [], []
        for s in counted:
            n = s.grad.numel()
            r, ids = _group_runs(n, s.group)
            g_runs.append(r)
            g_ids.append(ids)
            first, row_len = _unit_span(s)
            if row_len is None:
                r, ids = _group_runs(n, first)
            else:
                r, ids = _unit_runs(n, s.offset, row_len, first)
            u_runs.append(r)
            u_ids.append(ids)
        wide = [s.grad.dtype in (torch.float16, torch.bfloat16) for s in counted]
        self.group_parts = _Partials([_split_runs(r, WIDEN_BLOCK) if w else r for r, w in zip(g_runs, wide)],
                                     g_ids, L, dev)
        self.unit_parts = _Partials([_split_runs(r, WIDEN_BLOCK) if w else r for r, w in zip(u_runs, wide)],
                                    u_ids, U, dev)
        self.param_unit_parts = None     # built on first use: parameter dtypes may differ
        # (first unit id, row_len or None, rows touched) of every slice, for unit scaling
        self.unit_geometry = []
        for s in slices:
            first, row_len = _unit_span(s)
            n_rows = 0 if row_len is None or not s.grad.numel() else \
                (s.offset + s.grad.numel() - 1) // row_len - s.offset // row_len + 1
            self.unit_geometry.append((first, row_len, n_rows))
        #: slices with elements; those that are one unit, their unit ids; those made of rows
        self.live = [i for i, s in enumerate(slices) if s.grad.numel()]
        self.live_group = torch.tensor([self.group_of[i] for i in self.live], dtype=torch.long, device=dev)
        self.whole_units = [i for i in self.live if self.unit_geometry[i][1] is None]
        self.whole_unit_ids = torch.tensor([self.unit_geometry[i][0] for i in self.whole_units], dtype=torch.long,
                                           device=dev)
        self.row_units = [i for i in self.live if self.unit_geometry[i][1] is not None]
        #: the row kernel's tables (kernels.RowTable), by the row slices it reads
        self.row_tables: Dict[tuple, "kernels.RowTable"] = {}
        self.numel = [s.grad.numel() for s in slices]
        self.dtypes = [s.grad.dtype for s in slices]
        self._map_tables: Dict[bool, "kernels.MapTable"] = {}
        #: scale_table's table (False: a live slice the kernel does not store; None: not built)
        self._scale_table: Union[None, bool, "kernels.RowTable"] = None
        #: (premap, its per-counted-slice parameters, clamp bounds per run): premap_args
        self._premap: Optional[tuple] = None
        self._u_runs = u_runs
        self._u_ids = u_ids

    def premap_args(self, premap: "Premap") -> Tuple[List[Optional[dict]], Optional[List[float]]]:
        """(the premap's parameters of every counted slice, None where it is the identity; the
        clamp kernel's bound of every run of ``group_parts``, inf for the identity, or None when
        the premap is not the clamp), kept for this premap (its parameters are host values fixed
        when the session is built)."""
        if self._premap is None or self._premap[0] is not premap:
            identity = getattr(premap.fn, "is_identity", None)
            kernel_args = getattr(premap.fn, "kernel_args", None)
            kws: List[Optional[dict]] = []
            bounds: Optional[List[float]] = []
            for i in self.counted:
                kw = {k: v[self.group_of[i]] for k, v in premap.params.items()}
                kw = None if identity is not None and identity(**kw) else kw
                kws.append(kw)
                args = None if kw is None or kernel_args is None else kernel_args(**kw)
                if bounds is not None and kw is not None and (args is None or args[0] != "clamp"):
                    bounds = None
                if bounds is not None:
                    bounds.append(math.inf if kw is None else args[1][0])
            if bounds is not None:
                bounds = [bounds[r[0]] for r in self.group_parts.runs]
            self._premap = (premap, kws, bounds)
        return self._premap[1], self._premap[2]

    def scale_table(self) -> Optional["kernels.RowTable"]:
        """The row kernel's table for group factors (:meth:`SliceSet._scale_on_device`): every
        live slice one row whose factor is its group's entry of the [L] factor vector. None
        when a live slice is of a dtype the kernel does not store (fp64): the torch path."""
        if self._scale_table is None:
            live = self.live
            self._scale_table = all(self.dtypes[i] in kernels.DTYPES for i in live) and kernels.RowTable(
                [self.dtypes[i] for i in live], [self.numel[i] for i in live], [0] * len(live),
                [self.numel[i] for i in live], [self.group_of[i] for i in live])
        return self._scale_table or None

    def map_table(self, sums: bool) -> "kernels.MapTable":
        """The map kernel's table over all the slices (the tensors a map runs on,
        :func:`kernels.run_sums`): ``group_parts``' runs if ``sums`` (the partials of what it
        stores), else none (the map alone); built once each, kept."""
        table = self._map_tables.get(sums)
        if table is None:
            runs = [(self.counted[t], a, k, length) for t, a, k, length in self.group_parts.runs] if sums else []
            table = self._map_tables[sums] = kernels.MapTable(runs, self.numel)
        return table

    def param_parts(self, params: Sequence[torch.Tensor]) -> _Partials:
        if self.param_unit_parts is None:
            wide = [w.dtype in (torch.float16, torch.bfloat16) for w in params]
            self.param_unit_parts = _Partials([_split_runs(r, WIDEN_BLOCK) if w else r
                                               for r, w in zip(self._u_runs, wide)],
                                              self._u_ids, self.layout.unit_group.numel(), self.layout.device)
            # unit ids of the gradient partials, then of the parameter partials + U (_reduce_unit_pair)
            self.unit_pair_index = torch.cat([self.unit_parts.index,
                                              self.param_unit_parts.index + self.param_unit_parts.size])
        return self.param_unit_parts


def _geometry(slices: Sequence[GradSlice]) -> tuple:
    return tuple((s.group, s.counted, s.offset, s.row_len, s.unit_base, s.grad.numel(), s.grad.dtype,
                  s.grad.device) for s in slices)


class SliceSet:
    """The gradient slices one rank owns, and how to turn them into reduced statistics.

    ``reduce`` all-reduces (sums) one float64 vector in place over the group that shards these
    slices; the identity for a single process. ``loss_scale`` is the factor the slices carry
    (the loss scale backward used): statistics are of ``grad / loss_scale``. ``meta``: a
    :class:`SliceMeta` of the same geometry to reuse (else built here).
    """

    def __init__(self, slices: Sequence[GradSlice], layout: GroupLayout,
                 reduce: Optional[Callable[[torch.Tensor], None]] = None, meta: Optional["SliceMeta"] = None,
                 meta_checked: bool = False):
        self.slices = list(slices)
        self.layout = layout
        self.reduce = reduce
        self.loss_scale = 1.0
        self.collectives = 0       # number of reductions run (for the benchmark and tests)
        # meta_checked: the caller (SliceCache) matched the slices' geometry to ``meta`` itself
        if meta is None or meta.layout is not layout or (not meta_checked and meta.key != _geometry(self.slices)):
            meta = SliceMeta(self.slices, layout)
        self.meta = meta
        self._counted = [self.slices[i].grad for i in meta.counted]
        self._counted_group = meta.counted_group
        self._counted_slices = [self.slices[i] for i in meta.counted]
        self._group_of = meta.group_of
        #: group sums of squares of the gradient as it is now (None once it was changed):
        #: a map that declares ``uses_absmax`` gets sqrt of it as a bound on every |g_i|.
        self._fresh_sumsq: Optional[torch.Tensor] = None
        #: (map, group factors, map parameters) read by :meth:`read_plan` for the next apply
        self._host_plan: Optional[Tuple[Elementwise, list, Dict[str, list]]] = None
        #: the group partial norms the last map took of its result (CPU), for the next compute()
        self._map_sums: Optional[_MapSums] = None
        #: the local (this rank's, not reduced) group sums of squares of the last statistics pass,
        #: taken by the sum kernel's chunk loop, while the gradient is unchanged since (None
        #: once it was changed): a map reuses them for the groups it leaves unchanged
        self._local_sumsq: Optional[torch.Tensor] = None

    # -------------------------------------------------------------- statistics
    @marked(STATS)
    def compute(self, needs: frozenset, premap: Optional["Premap"] = None) -> Stats:
        """Local sums of what ``needs`` names, packed and reduced in one collective.

        ``premap`` (a map known before the statistics, :meth:`Shaper.premap`): the group sums
        of squares of the gradient as that map would store it are taken in the same pass and
        reduced in the same collective (``Stats.mapped_sumsq``), bit for bit what a pass over
        the mapped gradient gives; None where they cannot be taken exactly (a loss scale, a
        map without a multi-tensor form): the caller then makes that pass after the map."""
        fused, self._map_sums = self._map_sums, None
        self._local_sumsq = None
        sumsq = mapped = None
        if premap is not None:
            plain = fused is None and SUMSQ in needs and not needs & {UNIT_SUMSQ, SUMABS}
            sumsq, mapped = self._premap_sums(premap, plain)
        if UNIT_SUMSQ in needs and UNIT_PARAM_SUMSQ in needs and SUMABS not in needs:
            keys, packed = self._unit_pair_packed(SUMSQ in needs)
        else:
            keys, packed = self._packed(needs, fused, sumsq)
        if mapped is not None:
            keys, packed = keys + ["mapped_sumsq"], torch.cat([packed, mapped])
        if self.reduce is not None and packed.numel():
            self.reduce(packed)
            self.collectives += 1
        L, U = self.layout.num_groups, self.layout.unit_group.numel()
        out = dict(zip(keys, torch.split(packed, [U if k in (UNIT_SUMSQ, UNIT_PARAM_SUMSQ) else L for k in keys])))
        s = float(self.loss_scale)
        if s != 1.0:
            for k in (SUMSQ, UNIT_SUMSQ):
                if k in out:
                    out[k] = out[k] / (s * s)
            if SUMABS in out:
                out[SUMABS] = out[SUMABS] / s
        self._fresh_sumsq = out.get(SUMSQ)
        return Stats(**out)

    def _packed(self, needs: frozenset, fused: Optional["_MapSums"],
                sumsq: Optional[torch.Tensor] = None) -> Tuple[List[str], torch.Tensor]:
        """(keys, their local sums concatenated in the order SUMSQ, SUMABS, UNIT_SUMSQ, UNIT_PARAM_SUMSQ).
        ``sumsq``: the group sums of squares, already taken (:meth:`_premap_sums`)."""
        dev = self.layout.device
        parts: Dict[str, torch.Tensor] = {}
        if UNIT_SUMSQ in needs:
            parts[UNIT_SUMSQ] = self._unit_sum(None)
        if SUMSQ in needs:
            if sumsq is not None:
                parts[SUMSQ] = sumsq
            elif fused is not None and needs == {SUMSQ}:
                parts[SUMSQ] = fused.result()    # taken by the map, bit for bit a second pass
            elif UNIT_SUMSQ in parts:
                # The unit partials cover the same elements: their group sums are the group's.
                parts[SUMSQ] = torch.zeros(self.layout.num_groups, dtype=STAT_DTYPE, device=dev).index_add_(
                    0, self.layout.unit_group, parts[UNIT_SUMSQ])
            elif SUMABS in needs and self._on_cpu():
                parts[SUMSQ], parts[SUMABS] = _reduce_partials_sq_abs(self._counted, self.meta.group_parts)
            else:
                parts[SUMSQ] = self._group_sum(2)
        if SUMABS in needs and SUMABS not in parts:
            parts[SUMABS] = self._group_sum(1)
        if UNIT_PARAM_SUMSQ in needs:
            parts[UNIT_PARAM_SUMSQ] = self._unit_sum("param")
        if SUMSQ in parts and UNIT_SUMSQ not in parts and _kernel_ok(self._counted):
            # the sum kernel's group sums (also those a map or premap took: bit for bit a pass)
            self._local_sumsq = parts[SUMSQ]
        keys = [k for k in (SUMSQ, SUMABS, UNIT_SUMSQ, UNIT_PARAM_SUMSQ) if k in parts]
        packed = torch.cat([parts[k] for k in keys]) if keys else torch.zeros(0, dtype=STAT_DTYPE, device=dev)
        return keys, packed

    def _unit_pair_packed(self, with_sumsq: bool) -> Tuple[List[str], torch.Tensor]:
        """AGC's statistics straight into the packed vector [SUMSQ (L), UNIT_SUMSQ (U),
        UNIT_PARAM_SUMSQ (U)]: one reduction of both unit sums (:func:`_reduce_unit_pair`), the
        group sums added from the unit sums in place (as :meth:`_packed` does), no concatenation."""
        L, U = self.layout.num_groups, self.layout.unit_group.numel()
        xs = self._params()
        pparts = self.meta.param_parts(xs)
        head = L if with_sumsq else 0
        packed = torch.zeros(head + 2 * U, dtype=STAT_DTYPE, device=self.layout.device)
        _reduce_unit_pair(self._counted, self.meta.unit_parts, xs, pparts, self.meta.unit_pair_index,
                          packed.narrow(0, head, 2 * U))
        if with_sumsq:
            packed.narrow(0, 0, L).index_add_(0, self.layout.unit_group, packed.narrow(0, L, U))
        return ([SUMSQ] if with_sumsq else []) + [UNIT_SUMSQ, UNIT_PARAM_SUMSQ], packed

    def _premap_sums(self, premap: "Premap", plain: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(group sums of squares of the gradient or None, those of premap(gradient) or None).

        CPU with the sum kernel: :meth:`_premap_kernel_sums` (a clamp's sums from one kernel
        read; another map: (None, None)). CPU torch path: :func:`_premap_partials` (each block
        mapped into a bounded buffer by the map's ``map_into``, else copied and mapped there by
        the map's own code; reduced as the pass after the map reduces it), added by
        :func:`_sum_partials` with the exact recomputation of the mapped partials that need it
        (:class:`_MappedRows`). ``plain``: the gradient's own sums from the same read.
        Accelerators: :func:`_premap_device_sums` (copies mapped by the map's own code). A loss
        scale other than 1 (the map runs on the unscaled values there) or a map without a
        multi-tensor form: (None, None)."""
        fn = premap.fn
        if getattr(fn, "apply_foreach_", None) is None or float(self.loss_scale) != 1.0:
            return None, None
        if not self._counted:
            return None, torch.zeros(self.layout.num_groups, dtype=STAT_DTYPE, device=self.layout.device)
        kws, bounds = self.meta.premap_args(premap)
        # map_into: proven against the CPU map (kernel, torch ops); elsewhere the map's own code
        run_map = _PremapRun(_Foreach(fn.apply_foreach_, getattr(fn, "kernel_args", None)),
                             getattr(fn, "exact_in_storage", False),
                             getattr(fn, "map_into", None) if self._on_cpu() else None)
        if not self._on_cpu():
            return None, _premap_device_sums(self._counted, self._counted_group, kws, run_map,
                                             self.layout.num_groups)
        if _kernel_ok(self._counted):
            return self._premap_kernel_sums(bounds, plain)
        parts = self.meta.group_parts
        got: Optional[List[torch.Tensor]] = [] if plain else None
        mapped = _premap_partials(self._counted, parts, kws, run_map, got)
        rows = [_MappedRows(x, kw, run_map) for x, kw in zip(self._counted, kws)]
        return (None if got is None else _sum_partials(got, self._counted, parts, 2),
                _sum_partials(mapped, rows, parts, 2))

    def _premap_kernel_sums(self, bounds: Optional[List[float]], plain: bool):
        """(CPU, the sum kernel runs the statistics) The premap sums by the kernel, which the
        pass after the map would take with it: a clamp's by :func:`kernels.clamp_sums` (both
        sums from one read, bit for bit the pass over the clamped gradient); (None, None) for
        another map (that pass then runs after the map). ``bounds``: the clamp's per run
        (:meth:`SliceMeta.premap_args`), None for another map."""
        if bounds is None:
            return None, None
        parts = self.meta.group_parts
        got = kernels.clamp_sums(self._counted, parts.table(), bounds, sq=plain)
        if got is None:
            return None, None
        return (_index_sum(got[0], parts) if plain else None), _index_sum(got[1], parts)

    def _on_cpu(self) -> bool:
        return not self._counted or self._counted[0].device.type == "cpu"

    def _group_sum(self, p: int) -> torch.Tensor:
        if not self._on_cpu():
            # Accelerators: one fused multi-tensor kernel, float64 output.
            acc = torch.zeros(self.layout.num_groups, dtype=STAT_DTYPE, device=self.layout.device)
            norms = torch.stack(torch._foreach_norm(self._counted, p, dtype=STAT_DTYPE))
            return acc.index_add_(0, self._counted_group, norms.square() if p == 2 else norms)
        return _reduce_partials(self._counted, self.meta.group_parts, p)

    def _params(self) -> List[torch.Tensor]:
        xs = [s.param for s in self._counted_slices]
        if any(x is None for x in xs):
            raise ValueError("unit-wise statistics need the parameter values of every slice")
        return xs

    def _unit_sum(self, which: Optional[str]) -> torch.Tensor:
        if which == "param":
            xs = self._params()
            return _reduce_partials(xs, self.meta.param_parts(xs), 2)
        return _reduce_partials(self._counted, self.meta.unit_parts, 2)

    # -------------------------------------------------------------- application
    def read_plan(self, plan: Plan, extra: Sequence[torch.Tensor] = ()) -> Tuple[Plan, List[float]]:
        """The plan's host values and the 0-d tensors ``extra`` (the step's decision) in ONE
        device-to-host copy. Returns the plan as it runs (``skip_map`` resolved) and ``extra``'s
        values. A pure scale reads nothing of its own (its factors stay on the device); a map's
        group factors and parameters (and the group norms, for a map that ``uses_absmax``) are
        kept for the :meth:`apply` of that map."""
        ew = plan.elementwise
        head = [e.reshape(1).to(device=plan.scale.device, dtype=STAT_DTYPE) for e in extra]
        if plan.skip_map is not None:
            head.append(plan.skip_map.reshape(1).to(device=plan.scale.device, dtype=STAT_DTYPE))
        rows = [] if ew is None else self._host_rows(plan.scale, plan.unit_scale, ew)
        if not head and not rows:
            return plan, []
        flat = torch.cat(head + [r.reshape(-1) for r in rows]).tolist()
        got, flat = flat[:len(extra)], flat[len(extra):]
        if plan.skip_map is not None:
            skip, flat = flat[0] != 0.0, flat[1:]
            plan = plan.resolve(skip)
            if skip:
                return plan, got
        if ew is not None:
            L = plan.scale.numel()
            self._host_plan = (ew,) + self._parse_host([flat[i:i + L] for i in range(0, len(flat), L)], ew)
        return plan, got

    def _host_rows(self, scale: torch.Tensor, unit_scale: Optional[torch.Tensor], ew: Elementwise):
        """[L] float64 rows a map's application reads: group factors, map parameters, and the
        group sums of squares when the map bounds |g| by them (gradient unchanged since)."""
        rows = [scale.to(STAT_DTYPE)] + [ew.params[k].to(device=scale.device, dtype=STAT_DTYPE) for k in ew.params]
        if getattr(ew, "uses_absmax", False) and self._fresh_sumsq is not None and unit_scale is None:
            rows.append(self._fresh_sumsq.to(device=scale.device, dtype=STAT_DTYPE))
        return rows

    @staticmethod
    def _parse_host(host: List[list], ew: Elementwise) -> Tuple[list, Dict[str, list]]:
        keys = list(ew.params)
        params = dict(zip(keys, host[1:1 + len(keys)]))
        factors = host[0]
        if len(host) > 1 + len(keys):
            # |g_i| <= the group's L2 norm, times the factor applied before the map
            params["absmax"] = [math.sqrt(v) * abs(f) if v == v else math.inf for v, f in zip(host[-1], factors)]
        return factors, params

    def _host_values(self, scale, unit_scale, ew: Elementwise) -> Tuple[list, Dict[str, list]]:
        """What :meth:`read_plan` kept for this map, else read now (one copy)."""
        kept, self._host_plan = self._host_plan, None
        if kept is not None and kept[0] is ew:
            return kept[1], kept[2]
        return self._parse_host(torch.stack(self._host_rows(scale, unit_scale, ew)).tolist(), ew)

    def discard_plan(self) -> None:
        """Forget what :meth:`read_plan` kept (a vetoed step applies nothing)."""
        self._host_plan = None
        self._fresh_sumsq = None

    @marked(APPLY)
    def apply(self, scale: torch.Tensor, unit_scale: Optional[torch.Tensor],
              elementwise: Optional[Elementwise], stats_after: bool = True) -> None:
        """Multiply each slice by its group's factor, then unit factors, then the map.

        Host reads: none for a pure scale (the factors stay on the device and every slice is
        multiplied by its own, a 0-d tensor); for a map, the values :meth:`read_plan` read
        (else one copy here): its per-group parameters and the group factors (slices whose
        factor is 1 or whose map is the identity are then left alone). ``stats_after=False``:
        no statistics pass follows the map (its sums are known: ``Plan.after_sumsq``), so the
        map does not take its partial norms."""
        params = None
        self._map_sums = None
        # the last pass's local sums, still those of the groups the map will leave unchanged
        local, self._local_sumsq = self._local_sumsq, None
        factors = None
        if elementwise is None and unit_scale is not None:
            # one pass: the group factor folded into the unit factors (AGC's group factor is 1)
            unit_scale = unit_scale * scale.index_select(0, self.layout.unit_group.to(scale.device))
        elif elementwise is None:
            self._scale_on_device(scale)
        else:
            factors, params = self._host_values(scale, unit_scale, elementwise)
            tensors, scalars = [], []
            for s, grp in zip(self.slices, self._group_of):
                f = factors[grp]
                if f != 1.0 and s.grad.numel():
                    tensors.append(s.grad)
                    scalars.append(f)
            if tensors:
                _mul_rounded_once_(tensors, scalars)
        self._fresh_sumsq = None
        if unit_scale is not None:
            self._scale_units(unit_scale)
            local = None
        if elementwise is not None:
            kept = None if local is None or not stats_after else (local, factors)
            self._map(elementwise, params, stats_after, kept)

    def _scale_on_device(self, scale: torch.Tensor) -> None:
        """Every live slice times its group's factor, read where it is (no host read). On the
        CPU with the kernels: one call of the row kernel, each slice one row (its factor rounded to
        fp32, the product in fp32 rounded once: the bits of :func:`_mul_rounded_once_`), and a
        slice whose factor is 1 is not touched (a clip that did not fire, SPAMP's projection of
        a group inside its ball): no pass over it. Elsewhere one multi-tensor multiply of all."""
        live = self.meta.live
        if not live:
            return
        table = self.meta.scale_table() if scale.device.type == "cpu" and kernels.enabled() else None
        if table is not None and kernels.rows([self.slices[i].grad for i in live], table,
                                              scale.to(torch.float64).contiguous()):
            return
        factors = scale.index_select(0, self.meta.live_group.to(scale.device)).unbind()
        _mul_rounded_once_([self.slices[i].grad for i in live], factors)

    def _scale_units(self, unit_scale: torch.Tensor) -> None:
        """Unit factors: slices that are one unit (vectors) by one multi-tensor multiply,
        slices of rows by their row factors: on the CPU the fp32/bf16/fp16 ones by one call of the
        row kernel (:meth:`_scale_rows_kernel`), the others (float64, an accelerator, kernels off)
        fp32/fp64 ones all in one more multi-tensor call (the factors cast to each dtype once),
        16-bit ones by :func:`_scale_rows_`."""
        meta = self.meta
        if meta.whole_units:
            factors = unit_scale.index_select(0, meta.whole_unit_ids.to(unit_scale.device)).unbind()
            _mul_rounded_once_([self.slices[i].grad for i in meta.whole_units], factors)
        cast: Dict[torch.dtype, torch.Tensor] = {}
        pieces = []
        for i in self._scale_rows_kernel(unit_scale):
            s = self.slices[i]
            first, row_len, n_rows = meta.unit_geometry[i]
            if s.grad.dtype in _NARROW:
                _scale_rows_(s.grad, s.offset, row_len, unit_scale[first:first + n_rows])
                continue
            f = cast.get(s.grad.dtype)
            if f is None:
                f = cast[s.grad.dtype] = unit_scale.to(s.grad.dtype)   # as _scale_rows_ casts its rows
            pieces += _row_pieces(s.grad, s.offset, row_len, f[first:first + n_rows])
        if pieces:
            torch._foreach_mul_([x for x, _ in pieces], [y for _, y in pieces])

    def _scale_rows_kernel(self, unit_scale: torch.Tensor) -> List[int]:
        """The row slices the CPU kernel reads (:func:`kernels.rows`: each element times its
        row's factor rounded to fp32, in fp32, rounded once: the bits of :func:`_scale_rows_` and
        of the fp32 multi-tensor multiply, without the widened copy), all in one call; returns
        the row slices left to the torch ops (all of them when the kernel does not run)."""
        meta = self.meta
        rows = meta.row_units
        if not rows or unit_scale.device.type != "cpu" or not kernels.enabled():
            return rows
        todo = [i for i in rows if kernels.readable(self.slices[i].grad)]
        if not todo or not kernels.available():
            return rows
        key = tuple(todo)
        table = meta.row_tables.get(key)
        if table is None:
            geo = [meta.unit_geometry[i] for i in todo]
            table = meta.row_tables[key] = kernels.RowTable(
                [self.slices[i].grad.dtype for i in todo], [self.slices[i].grad.numel() for i in todo],
                [self.slices[i].offset for i in todo], [g[1] for g in geo], [g[0] for g in geo])
        if not kernels.rows([self.slices[i].grad for i in todo], table, unit_scale.to(torch.float64).contiguous()):
            return rows
        done = set(todo)
        return [i for i in rows if i not in done]

    def _map(self, fn: Elementwise, params: Dict[str, list], stats_after: bool = True,
             kept: Optional[Tuple[torch.Tensor, list]] = None) -> None:
        """The map on true gradient values, computed in at least fp32 whatever the storage dtype
        (|g|^alpha of a bf16 value is not a bf16 operation; an fp64 gradient is not rounded to
        fp32). Maps with an in-place multi-tensor form (``apply_foreach_``) run on the gradient
        itself when it is fp32/fp64, and on fp32 copies of 16-bit slices (rounded once when
        written back), in batches of at most WIDEN_BLOCK elements (large slices in pieces of
        that size): the temporaries stay bounded and small slices cost one call per batch.
        A map with ``kernel_args`` runs on CPU fp32/bf16/fp16 slices in a fused kernel instead
        (:mod:`.kernels`: one pass, in place, 16-bit storage read and rounded once, no copy):
        when every group's map has a kernel form and the kernel takes every slice, the whole map
        is one call that also takes the partials of what it stores (:meth:`_map_kernel`).
        Otherwise, on the CPU, the group partial norms of the result are taken from each batch
        as it is written (:class:`_MapSums`), for the statistics pass that follows the map."""
        ls = float(self.loss_scale)
        foreach = getattr(fn, "apply_foreach_", None)
        if foreach is not None:
            foreach = _Foreach(foreach, getattr(fn, "kernel_args", None))
        identity = getattr(fn, "is_identity", None)
        if foreach is not None and foreach.kernel_args is not None and self._on_cpu():
            taken = self._map_kernel(foreach.kernel_args, identity, params, ls, stats_after, kept)
            if taken is not False:
                self._map_sums = taken
                return
        sums = _MapSums(self.meta, self._counted) if self._on_cpu() and stats_after else None
        # a clamp-like map runs on 16-bit storage as it is, exactly (Elementwise.exact_in_storage)
        in_storage = ls == 1.0 and getattr(fn, "exact_in_storage", False)
        keys = list(params)
        batch: List[torch.Tensor] = []
        batch_kw: Dict[str, list] = {k: [] for k in keys}
        size = 0
        for i, (s, grp) in enumerate(zip(self.slices, self._group_of)):
            if not s.grad.numel():
                continue
            kw = {k: v[grp] for k, v in params.items()}
            if identity is not None and identity(**kw):
                continue
            if foreach is None:
                self._map_one(fn, s.grad, kw, ls)
                if sums is not None:
                    sums.add(i, 0, s.grad)
                    sums.take()
                continue
            n = s.grad.numel()
            for a in range(0, n, WIDEN_BLOCK):
                piece = s.grad if n <= WIDEN_BLOCK else s.grad.narrow(0, a, min(WIDEN_BLOCK, n - a))
                if size + piece.numel() > WIDEN_BLOCK:
                    _map_batch(foreach, batch, batch_kw, ls, sums, in_storage)
                    batch, batch_kw, size = [], {k: [] for k in keys}, 0
                batch.append(piece)
                for k in keys:
                    batch_kw[k].append(kw[k])
                size += piece.numel()
                if sums is not None:
                    sums.add(i, a, piece)
        _map_batch(foreach, batch, batch_kw, ls, sums, in_storage)
        self._map_sums = sums

    def _map_kernel(self, args_of: Callable, identity: Optional[Callable], params: Dict[str, list], ls: float,
                    stats_after: bool, kept: Optional[Tuple[torch.Tensor, list]] = None):
        """(CPU) The whole map in one kernel call (:func:`kernels.run_sums`): every slice
        mapped in place, and, if ``stats_after``, the partials of what it stored taken chunk by
        chunk while in cache: the sums the statistics pass after the map takes, bit for bit (same
        chunks, same loop), with no per-block Python. Returns the taken sums (for the next
        :meth:`compute`; None without ``stats_after``), or False (nothing touched) where the
        batched path must run: a slice the kernel does not take, a group whose parameters
        have no kernel form, two kernels in one map, the map not run on this CPU.

        ``kept`` (local group sums of squares of the statistics pass before, the group factors
        applied since): a group whose map is the identity and whose factor was 1 is unchanged
        since that pass; its slices are not read (the kernel's flag 2) and its sums are the kept
        ones, the bits a read gives (the same chunks summed by the same loop)."""
        if not kernels.available():
            return False
        by_group: Dict[int, Optional[tuple]] = {}
        name = None
        for grp in set(self._group_of):
            kw = {k: v[grp] for k, v in params.items()}
            if identity is not None and identity(**kw):
                by_group[grp] = None
                continue
            args = args_of(**kw)
            if args is None or (name is not None and args[0] != name):
                return False
            name = args[0]
            by_group[grp] = args[1]
        if name is None:           # the identity everywhere: the batched path skips every slice
            return False
        arity = kernels.MAPS[name][1]
        prm = [by_group[g] if n else None for g, n in zip(self._group_of, self.meta.numel)]
        cols = [[p[j] if p is not None else 0.0 for p in prm] for j in range(arity)]
        table = self.meta.map_table(stats_after and bool(self._counted))
        same = set() if kept is None else {g for g, a in by_group.items() if a is None and kept[1][g] == 1.0}
        flags = [1 if p is not None else 2 if g in same else 0 for p, g in zip(prm, self._group_of)]
        got = kernels.run_sums(name, [s.grad for s in self.slices], cols, flags, table, ls)
        if got is None:
            return False
        if not stats_after:
            return None
        if not self._counted:
            return _Taken(torch.zeros(self.meta.group_parts.size, dtype=STAT_DTYPE))
        sums = _index_sum(got, self.meta.group_parts)
        if same:
            idx = torch.tensor(sorted(same), dtype=torch.long)
            sums.index_copy_(0, idx, kept[0].index_select(0, idx))
        return _Taken(sums)

    @staticmethod
    def _map_one(fn: Elementwise, grad: torch.Tensor, kw: dict, ls: float) -> None:
        """A map without a multi-tensor form, on a widened copy of one slice."""
        g = grad.to(torch.promote_types(grad.dtype, torch.float32))
        if ls != 1.0:
            g = g / ls
        out = fn.apply(g, **kw)
        if ls != 1.0:
            out = out * ls
        grad.copy_(out)


class _Foreach(NamedTuple):
    """A map's multi-tensor form and its fused-kernel arguments (``kernel_args(**group_params)``:
    ``(kernel, params)`` for :func:`kernels.run`, or None: the multi-tensor torch ops)."""
    apply_foreach_: Callable
    kernel_args: Optional[Callable] = None

    def __call__(self, gs, **kw) -> None:
        self.apply_foreach_(gs, **kw)


def _fused(foreach, batch: List[torch.Tensor], batch_kw: Dict[str, list], ls: float) -> List[int]:
    """Run the map's fused kernel on the tensors of ``batch`` it supports (CPU fp32/bf16/fp16,
    kernels built and enabled), one call per kernel; the indices of the others, left alone."""
    args_of = getattr(foreach, "kernel_args", None)
    if args_of is None or batch[0].device.type != "cpu" or not kernels.available():
        return list(range(len(batch)))
    rest: List[int] = []
    runs: Dict[str, Tuple[List[int], list]] = {}
    for i, x in enumerate(batch):
        args = args_of(**{k: v[i] for k, v in batch_kw.items()}) if kernels.supports(x) else None
        if args is None:
            rest.append(i)
        else:
            idx, prm = runs.setdefault(args[0], ([], []))
            idx.append(i)
            prm.append(args[1])
    for name, (idx, prm) in runs.items():
        if not kernels.run(name, [batch[i] for i in idx], list(zip(*prm)), ls):
            rest += idx
    return sorted(rest)


def _map_batch(foreach, batch: List[torch.Tensor], batch_kw: Dict[str, list], ls: float,
               sums: Optional[_MapSums], in_storage: bool = False) -> None:
    """One batch of the map in place: by the map's fused kernel where it has one (:func:`_fused`),
    else by its multi-tensor torch ops (16-bit tensors through fp32 copies, rounded once when
    written back, unless ``in_storage``: the map is exact on the stored values); then the
    partial norms of what was written, while it is in cache."""
    if not batch:
        return
    rest = _fused(foreach, batch, batch_kw, ls)
    if len(rest) < len(batch):
        batch = [batch[i] for i in rest]
        batch_kw = {k: [v[i] for i in rest] for k, v in batch_kw.items()}
    if batch:
        _map_torch(foreach, batch, batch_kw, ls, in_storage)
    if sums is not None:
        sums.take()


def _map_torch(foreach, batch: List[torch.Tensor], batch_kw: Dict[str, list], ls: float, in_storage: bool) -> None:
    """The map's multi-tensor torch ops on ``batch`` (16-bit tensors through fp32 copies unless
    ``in_storage``), the loss scale divided out before and put back after."""
    wide = [x if in_storage or x.dtype in (torch.float32, torch.float64) else x.float() for x in batch]
    if ls != 1.0:
        torch._foreach_div_(wide, ls)
    foreach(wide, **batch_kw)
    if ls != 1.0:
        torch._foreach_mul_(wide, ls)
    narrow = [(x, w) for x, w in zip(batch, wide) if w is not x]
    if narrow:
        torch._foreach_copy_([x for x, _ in narrow], [w for _, w in narrow])


class Premap(NamedTuple):
    """A map known before the statistics (:meth:`Shaper.premap`) and its per-group parameters
    as host values, read once when the session is built (no host read per step)."""
    fn: Elementwise
    params: Dict[str, list]

    @classmethod
    def of(cls, fn: Optional[Elementwise]) -> Optional["Premap"]:
        return None if fn is None else cls(fn, {k: v.tolist() for k, v in fn.params.items()})


#: Elements per block of :func:`_premap_partials` (the buffer a block is mapped in, in cache).
PREMAP_BLOCK = ABS_BLOCK


class _PremapRun(NamedTuple):
    """A premap run on copies: the same code as the map on the gradient (:func:`_map_batch`,
    loss scale 1), so the copies hold what the map would store, bit for bit; or the map's
    ``map_into(src, dst, **params)`` (one pass from the gradient into the copy, the same values)."""
    foreach: "_Foreach"
    in_storage: bool
    into: Optional[Callable] = None

    def __call__(self, batch: List[torch.Tensor], kws: List[dict]) -> None:
        batch_kw = {k: [kw[k] for kw in kws] for k in kws[0]}
        _map_batch(self.foreach, batch, batch_kw, 1.0, None, self.in_storage)

    def copy(self, src: torch.Tensor, dst: torch.Tensor, kw: dict) -> torch.Tensor:
        """``dst`` (as long as ``src``, same dtype) holding map(src)."""
        if self.into is not None:
            return self.into(src, dst, **kw)
        self([dst.copy_(src)], [kw])
        return dst


def _premap_partials(tensors: Sequence[torch.Tensor], parts: _Partials, kws: List[Optional[dict]],
                     run_map: _PremapRun, plain: Optional[List[torch.Tensor]]) -> List[torch.Tensor]:
    """(CPU) The p = 2 partials of map(x) in ``parts``' order, bit for bit those a pass over
    the mapped tensors takes: small tensors mapped as copies in batches of at most
    PREMAP_BLOCK elements and reduced by :func:`_small_partials`; big runs block by block
    (:func:`_premap_blocks`). ``kws[t]``: tensor t's map parameters, None where the map is
    the identity (x itself is reduced). ``plain``: the partials of x itself are appended to
    it, from the same read (in cache)."""
    out: List[torch.Tensor] = []
    batch: List[int] = []
    size = 0
    for t in parts.small:
        batch.append(t)
        size += tensors[t].numel()
        if size >= PREMAP_BLOCK:
            _premap_small([tensors[u] for u in batch], [kws[u] for u in batch], run_map, out, plain)
            batch, size = [], 0
    if batch:
        _premap_small([tensors[u] for u in batch], [kws[u] for u in batch], run_map, out, plain)
    bufs: Dict[torch.dtype, torch.Tensor] = {}
    for t, runs in parts.big:
        _premap_blocks(tensors[t], runs, kws[t], run_map, bufs, out, plain)
    return out


def _premap_blocks(x: torch.Tensor, runs, kw: Optional[dict], run_map: _PremapRun,
                   bufs: Dict[torch.dtype, torch.Tensor], out: List[torch.Tensor],
                   plain: Optional[List[torch.Tensor]]) -> None:
    """One big tensor's runs, block by block: each block's partials (``plain``), then the block
    mapped into a buffer of its storage dtype (``bufs``, one per dtype, PREMAP_BLOCK elements)
    and its partials (``out``), by the reduction :func:`_run_partials` makes of a run on the
    CPU (as :class:`_MapSums` and :func:`_run_partials_p2` take it: the same chunks, the same
    fp32 or float64 accumulation; a row's result does not depend on the rows beside it)."""
    buf = None
    if kw is not None:
        buf = bufs.get(x.dtype)
        if buf is None or buf.numel() < max(PREMAP_BLOCK, max(length for _, _, length in runs)):
            buf = bufs[x.dtype] = torch.empty(max(PREMAP_BLOCK, max(length for _, _, length in runs)),
                                              dtype=x.dtype, device=x.device)
    for a, k, length in runs:
        per = max(1, PREMAP_BLOCK // length)
        for j in range(0, k, per):
            kk = min(per, k - j)
            blk = x[a + j * length:a + (j + kk) * length]
            if plain is not None:
                plain += _run_partials_p2(blk, [(0, kk, length)])
            if buf is not None:
                blk = run_map.copy(blk, buf[:kk * length], kw)
            out += _run_partials_p2(blk, [(0, kk, length)])


def _mapped_copies(xs: List[torch.Tensor], kws: List[Optional[dict]], run_map: _PremapRun) -> List[torch.Tensor]:
    """Copies of ``xs`` with the map run on them (x itself where its map is the identity)."""
    return [x if kw is None else run_map.copy(x, torch.empty_like(x), kw) for x, kw in zip(xs, kws)]


def _premap_small(xs: List[torch.Tensor], kws: List[Optional[dict]], run_map: _PremapRun,
                  out: List[torch.Tensor], plain: Optional[List[torch.Tensor]]) -> None:
    """Partials of a batch of small tensors (one each) and of their mapped copies."""
    if plain is not None:
        plain += _small_partials(xs, 2, True)
    out += _small_partials(_mapped_copies(xs, kws, run_map), 2, True)


class _MappedRows:
    """A tensor as the premap would store it, for the exact recomputation of its partials
    (:func:`_exact_partials` gathers rows with ``index_select``): the gathered rows are mapped
    as a copy (at most WIDEN_BLOCK elements)."""

    def __init__(self, x: torch.Tensor, kw: Optional[dict], run_map: _PremapRun):
        self.x, self.kw, self.run_map = x, kw, run_map

    @property
    def device(self) -> torch.device:
        return self.x.device

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        rows = self.x.index_select(dim, index)
        return rows if self.kw is None else self.run_map.copy(rows, torch.empty_like(rows), self.kw)


def _premap_device_sums(tensors: Sequence[torch.Tensor], groups: torch.Tensor, kws: List[Optional[dict]],
                        run_map: _PremapRun, L: int) -> torch.Tensor:
    """(Accelerators) float64 group sums of squares of map(x), as the pass after the map takes
    them there (``torch._foreach_norm(dtype=float64)``), on mapped copies in batches of at most
    PREMAP_BLOCK elements (a tensor longer than that in pieces: the sum of the pieces' squared
    norms, equal to the whole tensor's up to float64 rounding)."""
    acc = torch.zeros(L, dtype=STAT_DTYPE, device=groups.device)
    pieces: List[Tuple[torch.Tensor, Optional[dict], int]] = []
    for t, x in enumerate(tensors):
        n = x.numel()
        pieces += [(x.narrow(0, a, min(PREMAP_BLOCK, n - a)), kws[t], t) for a in range(0, n, PREMAP_BLOCK)]
    batch: List[Tuple[torch.Tensor, Optional[dict], int]] = []
    size = 0
    for j, pc in enumerate(pieces):
        batch.append(pc)
        size += pc[0].numel()
        if j == len(pieces) - 1 or size + pieces[j + 1][0].numel() > PREMAP_BLOCK:
            ys = _mapped_copies([x for x, _, _ in batch], [kw for _, kw, _ in batch], run_map)
            norms = torch.stack(torch._foreach_norm(ys, 2, dtype=STAT_DTYPE))
            idx = groups.index_select(0, torch.tensor([t for _, _, t in batch], device=groups.device))
            acc.index_add_(0, idx, norms.square())
            batch, size = [], 0
    return acc


class SliceCache:
    """Slice metadata computed once and reused while the adapter yields the same pieces.

    ``describe(param, offset)`` returns ``(group, counted, row_len, unit_base)`` for a gradient
    piece; it runs for every piece only when the pieces' identity (parameter, offset, length,
    dtype, device) differs from the previous step's, and with it the :class:`SliceMeta` (runs and
    indices of the statistics). The gradient views themselves are taken fresh each step and not
    kept: DeepSpeed may hand out new storage between steps (``storage_changes`` counts the steps
    where any piece's data pointer moved; the metadata does not depend on it).
    """

    def __init__(self, layout: GroupLayout, describe: Callable[[torch.Tensor, int], Tuple[int, bool, int, int]]):
        self.layout = layout
        self.describe = describe
        self.rebuilds = 0
        self.storage_changes = 0
        self._key = None
        self._desc: List[Tuple[int, bool, int, int]] = []
        self._meta: Optional[SliceMeta] = None
        self._ptrs: Optional[tuple] = None

    def slice_set(self, pieces, reduce: Optional[Callable[[torch.Tensor], None]] = None) -> SliceSet:
        """``pieces``: a :class:`Piece` (or a tuple in its order) per slice."""
        pieces = [pc if type(pc) is Piece else Piece(*pc) for pc in pieces]
        key = tuple((id(pc.param), pc.offset, pc.grad.numel(), pc.grad.dtype, pc.grad.device) for pc in pieces)
        if key != self._key:
            self._desc = [self.describe(pc.param, pc.offset) for pc in pieces]
            self._key = key
            self._meta = None
            self.rebuilds += 1
        ptrs = tuple(pc.grad.data_ptr() for pc in pieces)
        if self._ptrs is not None and ptrs != self._ptrs:
            self.storage_changes += 1
        self._ptrs = ptrs
        slices = [GradSlice(pc.grad, d[0], d[1], pc.values, pc.offset, d[2], d[3]) for pc, d in zip(pieces, self._desc)]
        # the key covers the geometry (the description follows from parameter and offset)
        ss = SliceSet(slices, self.layout, reduce, meta=self._meta, meta_checked=True)
        self._meta = ss.meta
        return ss


def slices_from_params(named_params, group_of: Callable[[str], int], with_param: bool = False,
                       unit_base: Optional[Dict[str, int]] = None) -> List[GradSlice]:
    """Whole-tensor slices of ``p.grad`` for a single process (the unsharded reference).

    A gradient whose storage is not row-major contiguous (a transposed parameter's, say) is
    replaced by a contiguous copy first, so that it is shaped in place as one flat run whose
    rows are the tensor's rows (AGC's units); the optimizer then reads the shaped copy. A
    non-contiguous parameter is read through a copy."""
    out = []
    for name, p in named_params:
        if p.grad is None:
            continue
        if not p.grad.is_contiguous():
            p.grad = p.grad.contiguous()
        row_len = p.numel() // p.shape[0] if p.dim() >= 2 else 0
        out.append(GradSlice(grad=p.grad.view(-1), group=group_of(name), counted=True,
                             param=p.detach().reshape(-1) if with_param else None, offset=0, row_len=row_len,
                             unit_base=(unit_base or {}).get(name, 0)))
    return out
