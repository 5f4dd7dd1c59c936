"""Seeing what the shaper does: DeepSpeed monitor events, a spike log and an end-of-run summary.

Installed by :class:`~.engine.DeepSpeedShaping` when ``gradient_shaping.log_interval > 0`` or
``gradient_shaping.spike_log`` is set; with both off nothing is registered and nothing runs.

Events go through ``engine.monitor.write_events`` (DeepSpeed's ``MonitorMaster``: tensorboard,
csv_monitor, wandb, comet, as configured), with DeepSpeed's step convention: the value of
optimizer step s is written at ``engine.global_samples`` *after* that step, like DeepSpeed's own
``Train/Samples/lr`` and ``Train/Samples/loss_scale``. Tags (P = ``Train/Samples/gradient_shaping``):

    P/global_norm_before     L2 norm of the whole (loss-scale-free) gradient before shaping
    P/global_norm_after      ... after shaping (before DeepSpeed's own gradient_clipping)
    P/shaped_fraction        fraction of layers whose factor differs from 1 by more than 1e-6
    P/max_ratio              largest norm_before / stat over the layers (absent without a stat)
    P/spikes                 spike events so far (norm_before > spike_threshold * stat)
    P/skipped_steps          steps skipped so far (non-finite gradient, or the spike rule)
    P/spike_skips            ... of which by the spike rule (only with gradient_shaping.skip)
    P/loss_scale             loss scale the step's backward used (1 without fp16)
    P/layer/<name>/norm_before, norm_after, factor       (with log_per_layer)
    P/layer/<name>/stat, threshold, ratio                (where the method has them)

``<name>`` is the statistics group: the parameter name at ``granularity: tensor``, the block
name at ``block``, ``global`` at ``global``. ``stat`` is the method's running statistic of the
group norm as it stood *before* the step (the reference a spike is measured against), ``ratio``
is ``norm_before / stat`` and ``threshold`` the norm the method let through or steered to on the
step; see :data:`ACCESSORS`, :func:`stat_and_threshold` (chains) and docs/MONITORING.md. A
skipped step writes only the global counters and the loss scale.

Ranks. The statistics in a :class:`~megatron_shaping.shapers.base.StepRecord` are identical on
every rank: the layout is built from the gathered parameter list of all pipeline stages, every
rank fills the same [L] vector with its local sums (zeros for groups it does not hold) and one
all-reduce over the whole job sums it, so stage 1's layers are known on stage 0. So no gather is
needed and only global rank 0, the rank DeepSpeed's ``MonitorMaster`` writes on, does any work
(tests/monitor checks the records are bitwise equal across ranks, pipeline stages included).
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import time
import weakref
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from ...shapers.base import Chain, Shaper, StepRecord
from ...shapers.regroup import Regrouped

logger = logging.getLogger("megatron_shaping")

TAG_PREFIX = "Train/Samples/gradient_shaping"
GLOBAL_FIELDS = ("global_norm_before", "global_norm_after", "shaped_fraction", "max_ratio", "spikes",
                 "skipped_steps", "loss_scale", "spike_skips", "param_norm", "update_ratio")
LAYER_FIELDS = ("norm_before", "norm_after", "factor", "stat", "threshold", "ratio")
#: |factor - 1| above this counts a layer as shaped.
SHAPED_TOL = 1e-6
#: Layers listed in the end-of-run summary.
SUMMARY_WORST = 5

NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# per-method running statistic and threshold (pure torch: usable without DeepSpeed)

def _where_valid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, torch.full_like(x, NAN))


def _spamp(sh, prev, new):
    seen = prev.count > 0
    # The threshold of this step: tau_{t-1} ("previous") or tau_t ("current"); on a group's
    # first step both are the first norm, which is what new.tau holds then.
    used = new.tau if sh.threshold_from == "current" else torch.where(seen, prev.tau, new.tau)
    return _where_valid(prev.tau, seen), _where_valid(used, new.count > 0)


def _gradient_stabilizer(sh, prev, new):
    # stat: bias-corrected EMA of the norm; threshold: the shaped norm m_hat / sqrt(v_hat).
    # (count 0 divides by zero; those entries are masked out.)
    m_hat_prev = prev.m / (1 - torch.pow(sh.beta1, prev.count))
    m_hat = new.m / (1 - torch.pow(sh.beta1, new.count))
    v_hat = new.v / (1 - torch.pow(sh.beta2, new.count))
    return _where_valid(m_hat_prev, prev.count > 0), _where_valid(m_hat / (v_hat.sqrt() + sh.eps), new.count > 0)


def _zclip(sh, prev, new):
    ready = prev.count >= sh.window
    std = prev.var.sqrt()
    # Where the spike test fires: z > z_thresh, i.e. n > mean + z_thresh * (std + eps).
    slack = std if sh.mode == "percentile" else std + sh.eps
    thr = prev.mean + sh.z_thresh * slack
    if sh.max_grad_norm is not None:
        thr = torch.where(ready, thr.clamp(max=sh.max_grad_norm), torch.full_like(thr, sh.max_grad_norm))
        return _where_valid(prev.mean, ready), thr
    return _where_valid(prev.mean, ready), _where_valid(thr, ready)


def _adagc(sh, prev, new):
    # Per-layer threshold lambda_rel * gamma after warmup; during warmup the clip is global.
    seen = prev.count > 0
    per_layer = seen & (prev.count + 1 > sh.warmup_steps)
    return _where_valid(prev.gamma, seen), _where_valid(sh.lambda_rel * prev.gamma, per_layer)


def _norm_clip(sh, prev, new):
    return None, torch.full_like(new.count, float(sh.max_norm))


def _none(sh, prev, new):
    return None, None


Accessor = Callable[[Shaper, Any, Any], Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]

#: shaper name -> f(shaper, state before the step, state after) -> (stat, threshold), [L] or None.
#: ``entrywise_shrink`` tracks the mean |entry| (not a norm), ``agc`` and ``value_clip`` act per
#: row / per entry: none of them has a per-group norm statistic. Methods not listed fall back to
#: :func:`_generic`.
ACCESSORS: Dict[str, Accessor] = {
    "spamp": _spamp,
    "gradient_stabilizer": _gradient_stabilizer,
    "zclip": _zclip,
    "adagc": _adagc,
    "norm_clip": _norm_clip,
    "entrywise_shrink": _none,
    "agc": _none,
    "value_clip": _none,
}

#: State fields that, in a shaper without an accessor, hold an EMA of the group norm.
GENERIC_STAT_FIELDS = ("tau", "mean", "gamma")


def _generic(sh, prev, new):
    fields = prev._asdict() if hasattr(prev, "_asdict") else {}
    count = fields.get("count")
    for f in GENERIC_STAT_FIELDS:
        x = fields.get(f)
        if x is not None and x.dim() == 1:
            return (x if count is None else _where_valid(x, count > 0)), None
    return None, None


def stat_and_threshold(shaper: Shaper, prev_state, new_state, num_groups: int
                       ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-group running statistic (before the step) and threshold (of the step), NaN where the
    method has none yet.

    In a chain, the statistic comes from the first member only (the only one that sees the
    incoming gradient whose norm it is compared with) and the threshold from the last member
    that has one (the last bound the gradient went through, comparable with norm_after).
    Members run at a coarser granularity (:class:`Regrouped`) are skipped: their numbers cover
    a block or the whole model, not the group they would be compared with."""
    if isinstance(shaper, Chain):
        members = list(zip(shaper.shapers, prev_state, new_state))
    else:
        members = [(shaper, prev_state, new_state)]
    stat = thr = None
    for i, (sh, p, n) in enumerate(members):
        if isinstance(sh, Regrouped):
            continue
        s, t = ACCESSORS.get(sh.name, _generic)(sh, p, n)
        if i == 0 and s is not None and s.shape == (num_groups,):
            stat = s
        if t is not None and t.shape == (num_groups,):
            thr = t
    return stat, thr


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
    (``prev_state`` None: unknown, e.g. right after a checkpoint load: no stat that step)."""
    before = record.stats_before.norm()
    L = before.numel()
    nan = torch.full_like(before, NAN)
    stat, thr = (None, None) if prev_state is None else stat_and_threshold(shaper, prev_state, new_state, L)
    stat = nan if stat is None else stat.to(before)
    thr = nan if thr is None else thr.to(before)
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


UPDATE_FIELDS = ("param_norm", "update_ratio")


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


def install_update_size(shaping) -> Optional[UpdateSizeTracker]:
    """An :class:`UpdateSizeTracker` on every rank when ``log_interval > 0`` and
    ``log_update_size``; None otherwise (then nothing runs)."""
    cfg = shaping.config
    if not (cfg.log_interval > 0 and getattr(cfg, "log_update_size", False)):
        return None
    if not getattr(getattr(shaping.engine, "monitor", None), "enabled", False):
        return None             # nothing would be written (the same answer on every rank: config)
    reduce = shaping._all_reduce if shaping.world > 1 else None
    return UpdateSizeTracker(shaping.session.layout.num_groups, cfg.log_interval, shaping.session.layout.device,
                             reduce)


# ----------------------------------------------------------------------------------------------
# the DeepSpeed side


def _global_rank() -> int:
    import deepspeed.comm as dist
    return dist.get_rank() if dist.is_initialized() else 0


class ShapingMonitor:
    """Monitor events, spike log and summary for one engine. Exists on global rank 0 only
    (``engine.gradient_shaping.monitor`` is None elsewhere and when monitoring is off)."""

    def __init__(self, shaping, config):
        self.shaping = shaping
        self.engine = shaping.engine
        self.session = shaping.session
        self.interval = int(config.log_interval)
        self.per_layer = bool(config.log_per_layer)
        self.k = float(config.spike_threshold)
        self.spike_path = config.spike_log
        self.names = list(self.session.layout.names)
        if self.interval and not getattr(self.engine.monitor, "enabled", False):
            logger.warning("gradient_shaping.log_interval=%d but no DeepSpeed monitor (tensorboard, csv_monitor, "
                           "wandb, comet) is enabled: per-step statistics are not written", self.interval)
            self.interval = 0
        # spike bookkeeping: layer -> [count, worst ratio, first step, last step]
        self.spikes = 0
        self.nonfinite = 0
        self.spike_skipped = 0          # steps skipped by the spike rule (gradient_shaping.skip)
        self.per_layer_spikes: Dict[str, list] = {}
        self._pending_events: List[Tuple[str, float]] = []
        self._pending_lines: List[Dict[str, Any]] = []
        self._prev = self.session.state
        self._prev_steps = self.session.steps
        self._file = None
        self._closed = False
        if self.spike_path:
            d = os.path.dirname(os.path.abspath(self.spike_path))
            os.makedirs(d, exist_ok=True)
            # Append: a resumed run continues the same log; the start line marks the boundary.
            self._file = open(self.spike_path, "a", buffering=1)
            self._write_line({"event": "start", "time": time.time(), "shaper": repr(self.session.shaper),
                              "granularity": self.session.granularity, "spike_threshold": self.k,
                              "step": int(self.engine.global_steps), "samples": int(self.engine.global_samples)})
        shaping.callbacks.append(self._on_step)
        self._wrap_engine()
        self._atexit = _make_atexit(self)
        atexit.register(self._atexit)

    # ------------------------------------------------------------------ hooks
    def _wrap_engine(self):
        # The callback runs inside the shaping hook, before DeepSpeed's step bookkeeping; events
        # are written once that returns, when engine.global_samples has advanced, so that our
        # points line up with DeepSpeed's own Train/Samples/* points of the same step.
        eng = self.engine
        inner_step = eng._take_model_step

        def _take_model_step(lr_kwargs=None):
            # The state before the step: the reference a spike is measured against. Taken here,
            # not remembered from the last step, so a checkpoint load in between is no problem.
            self._prev, self._prev_steps = self.session.state, self.session.steps
            out = inner_step(lr_kwargs)
            self._queue_update_size()
            self.flush()
            return out

        eng._take_model_step = _take_model_step
        inner_destroy = getattr(eng, "destroy", None)
        if inner_destroy is not None:
            def destroy(*a, **k):
                self.close()
                return inner_destroy(*a, **k)
            eng.destroy = destroy

    def _on_step(self, shaping, record: Optional[StepRecord]) -> None:
        step = int(self.engine.global_steps)          # 0-based index of the step being taken
        log_now = self.interval > 0 and (step + 1) % self.interval == 0
        if record is None:
            why = tuple(getattr(shaping, "last_skip_reasons", ()) or ("nonfinite",))
            if "nonfinite" in why:
                self.nonfinite += 1
                if self._file is not None:
                    self._pending_lines.append({"event": "nonfinite"})
            else:
                self.spike_skipped += 1
                if self._file is not None:
                    self._pending_lines.append({"event": "skip", "reasons": list(why), **self._skip_values(shaping)})
            if log_now:
                self._pending_events += [("skipped_steps", float(self.session.skipped))] + self._spike_skip_event() \
                    + [("loss_scale", float(shaping.last_loss_scale))]
            return
        # _prev is the state taken just before this step (see _wrap_engine); if shape() ran
        # outside _take_model_step we do not know it, and the step has no stat.
        prev = self._prev if self.session.steps == self._prev_steps + 1 else None
        ls = layer_stats(self.session.shaper, prev, self.session.state, record)
        spike = ls.ratio > self.k                      # NaN compares False
        if bool(spike.any()):
            self._count_spikes(step, ls, spike)
        if log_now:
            self._queue_events(ls, shaping)

    def _count_spikes(self, step: int, ls: LayerStats, spike: torch.Tensor) -> None:
        idx = spike.nonzero().flatten().tolist()
        cols = torch.stack([ls.ratio, ls.norm_before, ls.stat, ls.factor, ls.threshold])[:, idx].tolist()
        for j, i in enumerate(idx):
            name = self.names[i]
            ratio, norm, stat, factor, thr = (c[j] for c in cols)
            self.spikes += 1
            e = self.per_layer_spikes.setdefault(name, [0, 0.0, step + 1, step + 1])
            e[0] += 1
            e[1] = max(e[1], ratio)
            e[3] = step + 1
            if self._file is not None:
                self._pending_lines.append({"event": "spike", "layer": name, "ratio": ratio, "norm": norm,
                                            "stat": stat, "factor": factor, "threshold": thr})

    def _queue_events(self, ls: LayerStats, shaping) -> None:
        gb = float(ls.norm_before.square().sum().sqrt())
        ga = float(ls.norm_after.square().sum().sqrt())
        ratio = ls.ratio[~ls.ratio.isnan()]
        ev = [("global_norm_before", gb), ("global_norm_after", ga),
              ("shaped_fraction", shaped_fraction(ls.factor))]
        if ratio.numel():
            ev.append(("max_ratio", float(ratio.max())))
        ev += [("spikes", float(self.spikes)), ("skipped_steps", float(self.session.skipped))]
        ev += self._spike_skip_event()
        ev.append(("loss_scale", float(shaping.last_loss_scale)))
        if self.per_layer:
            cols = torch.stack(list(ls)).tolist()       # one device->host copy for all layers
            for f, col in zip(LayerStats._fields, cols):
                for name, v in zip(self.names, col):
                    if not math.isnan(v):
                        ev.append((f"layer/{name}/{f}", v))
        self._pending_events += ev

    def _queue_update_size(self) -> None:
        """Parameter norms and update ratios of the step just taken (computed on every rank by
        the UpdateSizeTracker after the optimizer step), when it was a logged one."""
        tracker = getattr(self.shaping, "update_size", None)
        got = tracker.take() if tracker is not None else None
        if got is None or not self.interval:
            return
        us, before2 = got
        b, u, p = float(before2.sum().sqrt()), float(us.update_norm.square().sum().sqrt()), \
            float(us.param_norm.square().sum().sqrt())
        ev = [("param_norm", p), ("update_ratio", u / b if b > 0 else NAN)]
        if self.per_layer:
            cols = torch.stack([us.param_norm, us.update_ratio]).tolist()
            for f, col in zip(UPDATE_FIELDS, cols):
                for name, v in zip(self.names, col):
                    if not math.isnan(v):
                        ev.append((f"layer/{name}/{f}", v))
        self._pending_events += [(t, v) for t, v in ev if not math.isnan(v)]

    def _spike_skip_event(self) -> List[Tuple[str, float]]:
        """``spike_skips`` (steps skipped by the spike rule so far), only when the rule is on."""
        if getattr(self.shaping, "skip", None) is None:
            return []
        return [("spike_skips", float(self.shaping.spike_skips))]

    @staticmethod
    def _skip_values(shaping) -> Dict[str, Any]:
        """The numbers behind a spike skip (a skipped step only: one host read)."""
        rule = getattr(shaping, "skip", None)
        if rule is None or not rule.last:
            return {}
        keys = list(rule.last)
        vals = torch.stack([rule.last[k].double().reshape(()) for k in keys]).tolist()
        return dict(zip(keys, vals))

    # ------------------------------------------------------------------ output
    def flush(self) -> None:
        """Write what the last step(s) queued, at the engine's current sample count."""
        samples = int(self.engine.global_samples)
        if self._pending_events:
            events = [(f"{TAG_PREFIX}/{t}", v, samples) for t, v in self._pending_events]
            self._pending_events = []
            self.engine.monitor.write_events(events)
        if self._pending_lines:
            step = int(self.engine.global_steps)
            for line in self._pending_lines:
                self._write_line({"event": line.pop("event"), "step": step, "samples": samples, **line})
            self._pending_lines = []

    def _write_line(self, obj: Dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(_finite_or_none(obj), allow_nan=False, default=_jsonable) + "\n")

    def summary(self) -> Dict[str, Any]:
        """Counts so far: steps shaped and skipped, spike events, the layers with most spikes."""
        worst = sorted(self.per_layer_spikes.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))[:SUMMARY_WORST]
        return {"steps": self.session.steps, "skipped": self.session.skipped, "spike_threshold": self.k,
                "spikes": self.spikes, "nonfinite": self.nonfinite,
                "spike_skips": int(getattr(self.shaping, "spike_skips", 0) or 0),
                "layers_with_spikes": len(self.per_layer_spikes),
                "worst_layers": [{"layer": n, "spikes": c, "max_ratio": r, "first_step": a, "last_step": b}
                                 for n, (c, r, a, b) in worst]}

    def log_summary(self) -> Dict[str, Any]:
        s = self.summary()
        worst = ", ".join(f"{w['layer']} ({w['spikes']}x, max {w['max_ratio']:.3g})" for w in s["worst_layers"])
        logger.info("gradient shaping: %d steps shaped, %d skipped (%d by the spike rule), %d spike events "
                    "(norm > %g x running statistic) in %d layers%s", s["steps"], s["skipped"], s["spike_skips"],
                    s["spikes"], self.k, s["layers_with_spikes"], f"; most: {worst}" if worst else "")
        return s

    def close(self) -> Optional[Dict[str, Any]]:
        """Flush, log the summary once, write it to the spike log and close the file. Called on
        ``engine.destroy()`` and at interpreter exit; safe to call again."""
        if self._closed:
            return None
        self._closed = True
        try:
            try:
                self.flush()
            except Exception as e:     # noqa: BLE001 - at exit the process group may be gone
                logger.warning("gradient shaping monitor: last events not written: %s", e)
            s = self.log_summary()
            if self._file is not None:
                self._write_line({"event": "summary", "step": int(self.engine.global_steps),
                                  "samples": int(self.engine.global_samples), **s})
                self._file.close()
                self._file = None
        finally:
            atexit.unregister(self._atexit)
        return s


def _finite_or_none(obj):
    """JSON has no NaN/inf: such values become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return str(x)


def _make_atexit(monitor: ShapingMonitor):
    # A weak reference: the exit hook must not keep an engine (and its model) alive.
    ref = weakref.ref(monitor)

    def _at_exit():
        m = ref()
        if m is not None:
            try:
                m.close()
            except Exception:           # noqa: BLE001 - interpreter shutdown: never raise
                pass
    return _at_exit


def install_monitor(shaping) -> Optional[ShapingMonitor]:
    """Attach a :class:`ShapingMonitor` to a :class:`~.engine.DeepSpeedShaping` when its config
    asks for one and this is global rank 0. Otherwise register nothing and return None: with
    ``log_interval: 0`` and no ``spike_log`` monitoring costs nothing."""
    cfg = shaping.config
    if not (cfg.log_interval > 0 or cfg.spike_log):
        return None
    if _global_rank() != 0:
        return None
    return ShapingMonitor(shaping, cfg)
