"""What the monitors report about a shaping step, without DeepSpeed: per-group statistics
(:func:`layer_stats`), the shaped fraction and the update-size sums.

Pure torch. The DeepSpeed side (monitor events, spike log, summary) is
:mod:`megatron_shaping.integrations.deepspeed.monitor`; ``engine.gradient_shaping.log_dict()``
and launch/pretrain.py's progress line use :func:`shaped_fraction` too.

Per group (a :class:`LayerStats` of [L] float64 tensors): the norm before and after shaping,
the overall factor, and what the shaper says of itself through its ``diagnostics`` method:
``stat`` (the running statistic of the group norm before the step) and ``threshold`` (the norm
the method let through or steered to on the step), NaN where it has none; ``ratio`` is
``norm_before / stat``. No method is known here by name: a new shaper's diagnostics reach the
monitors with no edit in this module.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch

from .shapers.base import STAT, THRESHOLD, Shaper, StepRecord

LAYER_FIELDS = ("norm_before", "norm_after", "factor", "stat", "threshold", "ratio")
UPDATE_FIELDS = ("param_norm", "update_ratio")
#: |factor - 1| above this counts a layer as shaped.
SHAPED_TOL = 1e-6

NAN = float("nan")


def _per_group(series: Optional[torch.Tensor], nan: torch.Tensor) -> torch.Tensor:
    """A diagnostic as an [L] series like ``nan`` (NaN when absent or not one value per group)."""
    if series is None or series.shape != nan.shape:
        return nan
    return series.to(nan)


class LayerStats(NamedTuple):
    """One step, per group ([L] float64 tensors; NaN where a method has no value)."""
    norm_before: torch.Tensor
    norm_after: torch.Tensor
    factor: torch.Tensor
    stat: torch.Tensor
    threshold: torch.Tensor
    ratio: torch.Tensor


def layer_stats(shaper: Shaper, prev_state, new_state, record: StepRecord) -> LayerStats:
    """Everything the monitor reports about one step, from the record and the two states
    (``prev_state`` None: unknown, e.g. right after a checkpoint load: no stat that step).
    ``stat`` and ``threshold`` are the shaper's own :meth:`~megatron_shaping.shapers.base.Shaper.diagnostics`
    (a chain's: ``stat`` of its first member, ``threshold`` of the last member that has one)."""
    before = record.stats_before.norm()
    L = before.numel()
    nan = torch.full_like(before, NAN)
    series = {} if prev_state is None else shaper.diagnostics(prev_state, new_state)
    stat, thr = (_per_group(series.get(k), nan) for k in (STAT, THRESHOLD))
    ratio = torch.where(stat > 0, before / stat, nan)
    return LayerStats(before, record.stats_after.norm(), record.factor, stat, thr, ratio)


def shaped_fraction(record_or_factor) -> float:
    """Fraction of groups whose factor differs from 1 by more than :data:`SHAPED_TOL`
    (a StepRecord or its ``factor``); NaN for None (a skipped step)."""
    if record_or_factor is None:
        return NAN
    f = record_or_factor.factor if isinstance(record_or_factor, StepRecord) else record_or_factor
    return float(((f - 1).abs() > SHAPED_TOL).double().mean()) if f.numel() else 0.0


class UpdateSize(NamedTuple):
    """One logged step, per group ([L] float64): the parameters after the step and the step's
    update, ``update_ratio = ||w_after - w_before|| / ||w_before||`` (NaN where ||w_before|| = 0)."""
    param_norm: torch.Tensor
    update_norm: torch.Tensor
    update_ratio: torch.Tensor



class UpdateSizeTracker:
    """Per-group parameter norm and update/parameter norm ratio of the logged steps.

    Runs on *every* rank (the sums span ZeRO partitions, TP shards and pipeline stages) when
    ``log_interval > 0`` and ``log_update_size``; with ``log_interval: 0`` it does not exist.
    On a logged step that is not skipped, :meth:`before` keeps a copy of this rank's *counted*
    parameter slices (the values the optimizer updates: the fp32 master partition under ZeRO,
    the model weights on ZeRO-0; replicas are not counted, as for the gradient statistics), and
    :meth:`after` sums, per group, w_after^2, (w_after - w_before)^2 and w_before^2 over those
    slices in float64 and all-reduces the three [L] vectors as one: one extra collective and one
    copy of the local shard, on logged steps only."""

    def __init__(self, num_groups: int, interval: int, device, reduce: Optional[Callable[[torch.Tensor], None]]):
        self.L = int(num_groups)
        self.interval = int(interval)
        self.device = device
        self.reduce = reduce
        self._held: Optional[Tuple[List[torch.Tensor], List[torch.Tensor], torch.Tensor]] = None
        #: The result of the last logged step, until :meth:`take` hands it over.
        self.last: Optional[Tuple[UpdateSize, torch.Tensor]] = None

    def due(self, global_steps: int) -> bool:
        """Is the step with 0-based index ``global_steps`` a logged one?"""
        return (int(global_steps) + 1) % self.interval == 0

    def before(self, slices) -> None:
        """``slices``: GradSlice-like objects with ``param`` (1-D live view), ``group``, ``counted``."""
        live, groups = [], []
        for s in slices:
            if s.counted and s.param is not None and s.param.numel():
                live.append(s.param)
                groups.append(s.group)
        copies = [w.detach().clone() for w in live]
        self._held = (live, copies, torch.tensor(groups, dtype=torch.long, device=self.device))

    def after(self) -> Optional[UpdateSize]:
        """Reduce the sums of the step :meth:`before` saw (every rank calls it on the same steps)."""
        if self._held is None:
            return None
        live, copies, groups = self._held
        self._held = None
        acc = torch.zeros(3, self.L, dtype=torch.float64, device=self.device)
        if live:
            deltas = [w.detach().to(torch.float64) - c.to(torch.float64) for w, c in zip(live, copies)]
            for row, ts in enumerate((live, deltas, copies)):
                norms = torch.stack(torch._foreach_norm([t.detach() for t in ts], 2, dtype=torch.float64))
                acc[row].index_add_(0, groups, norms.to(acc.device).square())
        flat = acc.view(-1)
        if self.reduce is not None:
            self.reduce(flat)
        after2, delta2, before2 = acc.unbind(0)
        before = before2.sqrt()
        upd = delta2.sqrt()
        ratio = torch.where(before > 0, upd / before.clamp_min(torch.finfo(torch.float64).tiny),
                            torch.full_like(before, NAN))
        self.last = (UpdateSize(after2.sqrt(), upd, ratio), before2)
        return self.last[0]

    def take(self) -> Optional[Tuple[UpdateSize, torch.Tensor]]:
        out, self.last = self.last, None
        return out
