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
    P/spikes                 spike events so far in this process (norm_before > spike_threshold * stat;
                             not restored on resume, unlike the two skip counts)
    P/skipped_steps          steps skipped so far (non-finite gradient, or the spike rule)
    P/spike_skips            ... of which by the spike rule (only with gradient_shaping.skip)
    P/loss_scale             loss scale the step's backward used (1 without fp16)
    P/layer/<name>/norm_before, norm_after, factor       (with log_per_layer)
    P/layer/<name>/stat, threshold, ratio                (where the method has them)

``<name>`` is the statistics group: the parameter name at ``granularity: tensor``, the block
name at ``block``, ``global`` at ``global``. ``stat`` is the method's running statistic of the
group norm as it stood *before* the step (the reference a spike is measured against), ``ratio``
is ``norm_before / stat`` and ``threshold`` the norm the method let through or steered to on the
step: each shaper's own ``diagnostics`` method, read by :func:`megatron_shaping.monitoring.layer_stats`
(DeepSpeed-free, like :func:`~megatron_shaping.monitoring.shaped_fraction` and the update-size
sums; see docs/MONITORING.md). A skipped step writes only the global counters and the loss scale.

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
from typing import Any, Dict, List, Optional, Tuple

import torch

from ...monitoring import (LAYER_FIELDS, NAN, SHAPED_TOL, UPDATE_FIELDS, LayerStats, UpdateSize,  # noqa: F401
                           UpdateSizeTracker, layer_stats, shaped_fraction)
from ...shapers.base import StepRecord

logger = logging.getLogger("megatron_shaping")

TAG_PREFIX = "Train/Samples/gradient_shaping"
GLOBAL_FIELDS = ("global_norm_before", "global_norm_after", "shaped_fraction", "max_ratio", "spikes",
                 "skipped_steps", "loss_scale", "spike_skips", "param_norm", "update_ratio")
#: Layers listed in the end-of-run summary.
SUMMARY_WORST = 5


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
