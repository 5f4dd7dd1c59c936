"""Attach a shaper to a DeepSpeed engine: layout, reduction group, the pre-step hook.

The hook wraps ``engine._take_model_step``, which DeepSpeed calls once per optimizer step at
the gradient-accumulation boundary on both the normal and the pipeline engine, after the
gradients are fully reduced into the optimizer's partitions and before the optimizer
unscales, clips and steps.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch

from ...core import ShapingSession, shaper_from_spec
from ...profiling import HOOK, marked
from ...spike_skip import NONFINITE, NO_LOSS, SpikeSkip, reasons
from ...stats.layout import ParamInfo
from ...stats.slices import GradSlice, SliceCache, SliceSet
from ...stats.tp import full_shape as _full_shape
from ...stats.tp import is_tp_sharded as _is_tp_sharded
from ...stats.tp import local_shape as _local_shape
from ...stats.tp import partition_dim as _partition_dim
from .adapters import Adapter, UnsupportedPath, config_dict, select_adapter
from .config import GRADIENT_SHAPING, GradientShapingConfig, get_gradient_shaping_config
from ...monitoring import shaped_fraction as _shaped_fraction

logger = logging.getLogger("megatron_shaping")

ATTR = "gradient_shaping"      # engine.gradient_shaping -> DeepSpeedShaping
LOG_PREFIX = "shaping/"        # keys of DeepSpeedShaping.log_dict()
SKIP_KEY = "skip"              # the spike rule's windows inside the saved shaper state
NAN = float("nan")


def _tp_info(engine) -> Tuple[int, int]:
    """(tensor-parallel rank, world size) from the mpu or the pipeline grid; (0, 1) without."""
    mpu = getattr(engine, "mpu", None)
    if mpu is not None:
        for r, w in (("get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size"),
                     ("get_model_parallel_rank", "get_model_parallel_world_size")):
            if hasattr(mpu, r):
                return int(getattr(mpu, r)()), int(getattr(mpu, w)())
    grid = getattr(engine, "grid", None)
    if grid is not None:
        return int(grid.get_slice_parallel_rank()), int(grid.get_slice_parallel_world_size())
    return 0, 1


def _is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine
    return isinstance(engine, PipelineEngine)


class DeepSpeedShaping:
    """The shaping state of one engine. Reachable as ``engine.gradient_shaping``."""

    def __init__(self, engine, config: GradientShapingConfig):
        import deepspeed.comm as dist
        self.engine = engine
        self.config = config
        self.adapter: Adapter = select_adapter(engine)
        self.dist = dist
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.tp_rank, self.tp_world = _tp_info(engine)
        # The replicas of a gradient on the unsharded paths: DeepSpeed reduces gradients over the
        # sequence-data-parallel group (the data-parallel group unless Ulysses sequence
        # parallelism is on; then it also spans the sequence-parallel peers).
        dp_group = getattr(engine, "seq_data_parallel_group", None) or getattr(engine, "data_parallel_group", None)
        self.dp_rank = dist.get_rank(group=dp_group) if self.world > 1 else 0
        self.names: Dict[int, str] = {id(p): n for n, p in engine.module.named_parameters() if p.requires_grad}
        local = [(n, _full_shape(p, self.tp_world)) for n, p in engine.module.named_parameters() if p.requires_grad]
        infos = self._global_param_list(local)
        #: where collectives run: DeepSpeed's accelerator device (NCCL needs it), as DeepSpeed's
        #: own offload norm all-reduces there. The statistics live with the gradient pieces: on
        #: the module's device, on the host with optimizer offload (each all-reduce then goes
        #: through a copy, as DeepSpeed's offload norm does)
        from deepspeed.accelerator import get_accelerator
        self._comm_device = torch.device(get_accelerator().current_device_name())
        device = self.adapter.stats_device(next((p.device for p in engine.module.parameters()), torch.device("cpu")))
        self.session = ShapingSession(shaper_from_spec(config.spec()), infos, config.granularity,
                                      config.block_pattern, device)
        #: Spike-aware step skipping (``gradient_shaping.skip``), None when off.
        self.skip: Optional[SpikeSkip] = SpikeSkip(config.skip, device) \
            if config.skip is not None and config.skip.enabled else None
        self.is_pipeline = _is_pipeline(engine)
        self._loss_sum: Optional[torch.Tensor] = None      # observe_loss() since the last step
        self._loss_n = 0
        self._warned_no_loss = False
        self.needs_param = "unit_param_sumsq" in self.session.shaper.needs
        # slice metadata built once, reused while the adapter's pieces stay the same
        self._slice_cache = SliceCache(self.session.layout, self._describe_piece)
        self.clip = float(engine.gradient_clipping() or 0.0)
        self.last_loss_scale = 1.0
        self.last_skipped = False
        #: Global gradient norm (before shaping, loss-scale-free) of the last step, a 0-d tensor,
        #: also on a skipped step; None before the first step.
        self.last_norm_before: Optional[torch.Tensor] = None
        #: Why the last step was skipped: () or names from megatron_shaping.spike_skip.REASONS.
        self.last_skip_reasons: Tuple[str, ...] = ()
        self.collectives = 0
        #: Steps whose skip decision DeepSpeed's own norm check took (see :meth:`_defers`).
        self.deferred_steps = 0
        #: Called as ``cb(shaping, record)`` after every optimizer-step boundary, ``record`` being
        #: the StepRecord or None for a skipped step (monitors, spike log).
        self.callbacks: List[Any] = []
        self._orig_take_model_step = engine._take_model_step
        engine._take_model_step = self._take_model_step
        inner_destroy = getattr(engine, "destroy", None)
        if inner_destroy is not None:
            adapter = self.adapter

            def destroy(*a, **k):
                adapter.close()             # hooks the adapter put on the model's parameters
                return inner_destroy(*a, **k)
            engine.destroy = destroy
        setattr(engine, ATTR, self)
        from .checkpointing import install_checkpoint_hooks
        install_checkpoint_hooks(self)      # shaper state in save_checkpoint / load_checkpoint
        if dist.get_rank() == 0 if self.world > 1 else True:
            logger.info("gradient shaping: %r, granularity %s, %d groups, path %s, DeepSpeed gradient_clipping=%s "
                        "(applied after shaping)%s", self.session.shaper, self.session.granularity,
                        self.session.layout.num_groups, self.adapter.name, self.clip,
                        f", step skipping {self.skip!r}" if self.skip is not None else "")
        from .monitor import install_monitor, install_update_size
        self.monitor = install_monitor(self)    # monitor events, spike log; None when off or rank != 0
        #: Parameter norms and update ratios of logged steps, on every rank; None when logging is off.
        self.update_size = install_update_size(self)

    # ------------------------------------------------------------------ layout
    def _global_param_list(self, local: List[Tuple[str, Tuple[int, ...]]]) -> List[ParamInfo]:
        """Parameters of the whole model: pipeline stages hold different parameters, so the
        names are gathered once; the order is stage-major, first appearance wins (tied weights)."""
        if self.world == 1:
            lists = [local]
        else:
            lists = [None] * self.world
            self.dist.all_gather_object(lists, local)
        seen: Dict[str, Tuple[int, ...]] = {}
        order: List[str] = []
        for lst in lists:
            for name, shape in lst:
                if name in seen:
                    if tuple(seen[name]) != tuple(shape):
                        raise ValueError(f"gradient_shaping: parameter {name!r} has shape {tuple(shape)} on one rank "
                                         f"and {tuple(seen[name])} on another")
                    continue
                seen[name] = tuple(shape)
                order.append(name)
        return [ParamInfo(n, seen[n]) for n in order]

    # ------------------------------------------------------------------ slices
    def _counted(self, p) -> bool:
        if getattr(p, "ds_pipe_replicated", False):
            return False                       # tied weight: the owning stage counts it
        if self.tp_rank > 0 and not _is_tp_sharded(p) and not self.adapter.partitioned_over_tp_peers(p):
            return False                       # TP-replicated (norm weights): TP rank 0 counts it
        if not self.adapter.sharded and self.dp_rank > 0:
            return False                       # replicated over data parallelism
        return True

    def _slice_set(self) -> Tuple[SliceSet, list]:
        self._track_update = self.update_size is not None and self.update_size.due(self.engine.global_steps)
        pieces = list(self.adapter.pieces(self.needs_param or self._track_update))
        reduce = self._all_reduce if self.world > 1 else None
        self._step_loss = None
        if self.skip is not None and self.skip.needs_loss:
            reduce = self._fold_loss(reduce)
        ss = self._slice_cache.slice_set(pieces, reduce)
        ss.loss_scale = self.adapter.backward_scale()
        return ss, pieces

    def _describe_piece(self, p, offset: int) -> Tuple[int, bool, int, int]:
        """(group, counted, row_len, unit_base) of a gradient piece of parameter p."""
        g = self.session.grouping
        name = self.names[id(p)]
        shape = _local_shape(p)
        rows = shape[0] if len(shape) >= 2 else 1
        numel = 1
        for d in shape:
            numel *= d
        row_len = numel // rows if len(shape) >= 2 else 0
        unit_base = g.unit_base[name]
        if row_len and self.tp_world > 1 and _is_tp_sharded(p) and _partition_dim(p) == 0:
            unit_base += self.tp_rank * rows     # column-parallel: this rank holds a block of rows
        return g.group(name), self._counted(p), row_len, unit_base

    def _all_reduce(self, vec: torch.Tensor) -> None:
        # One collective for all groups; every rank of the job takes part because statistics
        # may span ZeRO partitions, TP shards and pipeline stages at once.
        if vec.device != self._comm_device:
            buf = vec.to(self._comm_device)
            self.dist.all_reduce(buf)
            vec.copy_(buf)
        else:
            self.dist.all_reduce(vec)
        self.collectives += 1

    # ------------------------------------------------------------------ the loss (skip rule)
    def observe_loss(self, loss) -> None:
        """Hand in the training loss for the spike rule's ``loss_z`` test: call it after each
        ``engine.backward(loss)`` (or once per optimizer step); the step's loss is the mean of
        what was observed since the last optimizer step, averaged over the ranks that observed
        one. No host sync; a no-op unless ``gradient_shaping.skip.loss_z`` is set, so trainers
        may call it unconditionally. Under pipeline parallelism the loss is read from the last
        stage automatically and this raises."""
        if self.is_pipeline:
            raise RuntimeError("gradient_shaping.observe_loss: on a pipeline engine the loss of the step is read "
                               "from the last stage automatically; do not call observe_loss")
        if self.skip is None or not self.skip.needs_loss or loss is None:
            return
        x = (loss if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))).detach()
        x = x.to(device=self.session.layout.device, dtype=torch.float64).reshape(-1)[0]
        self._loss_sum = x if self._loss_sum is None else self._loss_sum + x
        self._loss_n += 1

    def _local_step_loss(self) -> Optional[torch.Tensor]:
        """This rank's loss of the step (0-d float64), None when it has none."""
        if self.is_pipeline:
            # PipelineEngine (0.19.8) sums the detached micro-batch losses of the last stage in
            # ``total_loss`` during the schedule; the optimizer step is the schedule's last
            # instruction, and train_batch divides by the accumulation steps only afterwards.
            total = getattr(self.engine, "total_loss", None)
            if not self.engine.is_last_stage() or total is None:
                return None
            if isinstance(total, (list, tuple)):
                total = total[0]
            return total.detach().to(device=self.session.layout.device, dtype=torch.float64).reshape(-1)[0] \
                / float(self.engine.gradient_accumulation_steps())
        if self._loss_n == 0:
            return None
        return self._loss_sum / self._loss_n

    def _fold_loss(self, reduce):
        """Wrap ``reduce`` so that its first call of the step also sums (loss, 1) over the ranks
        that have a loss: two more entries in the statistics vector, no extra collective."""
        local = self._local_step_loss()
        dev = self.session.layout.device
        extra = torch.zeros(2, dtype=torch.float64, device=dev) if local is None else \
            torch.stack([local, torch.ones((), dtype=torch.float64, device=dev)])
        self._loss_sum, self._loss_n = None, 0
        self._step_loss = extra
        if reduce is None:
            return None
        state = {"first": True}

        def folded(vec: torch.Tensor) -> None:
            if not state["first"]:
                return reduce(vec)
            state["first"] = False
            n = vec.numel()
            both = torch.cat([vec, extra.to(vec)])
            reduce(both)
            vec.copy_(both[:n])
            self._step_loss = both[n:]
        return folded

    def _gate(self, stats) -> Optional[torch.Tensor]:
        """Called by the session with the reduced statistics of the incoming gradient."""
        gn = stats.sumsq.sum().sqrt()
        self.last_norm_before = gn
        if self.skip is None:
            return None
        loss = None
        if self._step_loss is not None:
            total, count = self._step_loss[0], self._step_loss[1]
            # mean over the ranks with a loss; count 0 (nobody observed one) is flagged NO_LOSS
            return self.skip.decide(gn, total / count.clamp_min(1.0), has_loss=count > 0)
        return self.skip.decide(gn, loss)

    # ------------------------------------------------------------------ the hook
    @marked(HOOK)
    @torch.no_grad()
    def shape(self) -> bool:
        """Shape the reduced gradient in place; False when the step must be skipped."""
        ss, pieces = self._slice_set()
        self.last_loss_scale = ss.loss_scale
        record = self.session.step(ss, self._gate, defer=self._defers())
        if self.session.pending_veto is not None:
            # decided by DeepSpeed's own check of the norm we hand it (_take_model_step resolves)
            self.deferred_steps += 1
            self.adapter.after_shaping(pieces)
            return True
        code = self.session.last_code
        if self.skip is not None:
            self.skip.commit(code)
            if code & NO_LOSS and not self._warned_no_loss and self.engine.global_steps >= self.skip.min_history:
                self._warned_no_loss = True
                logger.warning("gradient_shaping.skip.loss_z is set but no loss reached the rule: call "
                               "engine.gradient_shaping.observe_loss(loss) after each backward")
        if record is not None:
            self.adapter.after_shaping(pieces)
            if self._track_update:
                self.update_size.before(ss.slices)      # parameters before the optimizer step
        self._ended(record)
        return record is not None

    def _ended(self, record) -> None:
        """The step's outcome known (``record`` None: skipped): the last-step fields, then the
        callbacks."""
        self.last_skipped = record is None
        self.last_skip_reasons = reasons(self.session.last_code) if record is None else ()
        for cb in self.callbacks:
            cb(self, record)

    def _defers(self) -> bool:
        """Whether this step's skip decision may be left to DeepSpeed's own validity check of
        the global norm (no host read in the hook): the adapter's optimizer makes that check,
        nothing here needs the decision before the optimizer step (no spike rule, no monitor,
        no update-size logging), and a non-finite gradient is skipped, not an error. fp16 keeps
        its loss scaler's overflow path. The answer depends only on the config and the
        optimizer DeepSpeed built, so it is the same on every rank (a vetoed step then takes
        the same path, with the same collectives, everywhere); callbacks of a deferred step
        run after the optimizer step, with the resolved record."""
        cfg = self.config
        return (self.adapter.skips_invalid_norm() and self.skip is None and self.update_size is None
                and not (cfg.log_interval > 0 or cfg.spike_log) and cfg.nonfinite == "skip"
                and not self.engine.fp16_enabled())

    def _resolve(self) -> None:
        """End a deferred step: DeepSpeed skipped it (``optimizer.overflow``, a host flag) iff
        the norm we handed it was invalid, i.e. iff the shaping step was vetoed."""
        skipped = self.adapter.step_was_skipped()
        record = self.session.resolve(skipped)
        if record is None:
            self._warn_skipped(self.engine.global_steps - 1)     # DeepSpeed has counted the step
        self._ended(record)

    def _take_model_step(self, lr_kwargs=None):
        self.adapter.begin_step()
        ok = self.shape()
        if not ok:
            if not self.session.last_code & NONFINITE:
                return self._skip(lr_kwargs)            # a spike: finite, so no loss scaler would skip it
            if not self._loss_scaler_skips():
                if self.config.nonfinite == "error":
                    raise FloatingPointError(f"gradient_shaping: non-finite gradient at step "
                                             f"{self.engine.global_steps} (gradient_shaping.nonfinite = 'error')")
                return self._skip(lr_kwargs)
        try:
            with self.adapter.unscale_guard(self.last_loss_scale):
                out = self._orig_take_model_step(lr_kwargs)
        finally:
            if self.session.pending_veto is not None:
                self._resolve()
        if self.update_size is not None:
            self.update_size.after()        # logged steps: the update the optimizer just applied
        return out

    def _loss_scaler_skips(self) -> bool:
        """fp16 with a loss scaler: DeepSpeed's own overflow check skips the step."""
        return bool(self.engine.fp16_enabled())

    def _skip(self, lr_kwargs):
        """Run DeepSpeed's step bookkeeping with the optimizer update replaced by a skip
        (:meth:`Adapter.skipping`): counted as a skipped step, LR schedule left alone."""
        self._warn_skipped(self.engine.global_steps)
        with self.adapter.skipping():
            return self._orig_take_model_step(lr_kwargs)

    def _warn_skipped(self, step: int) -> None:
        logger.warning("gradient_shaping: step %d skipped: %s", step, self._skip_message())

    def _skip_message(self) -> str:
        code = self.session.last_code
        if code & NONFINITE or self.skip is None:
            return "non-finite gradient"
        v = {k: float(t) for k, t in self.skip.last.items()}     # a skipped step only: host reads are fine
        parts = []
        if "grad_norm_z" in self.last_skip_reasons:
            parts.append(f"grad norm {v['grad_norm']:.4g} > mean {v['grad_norm_mean']:.4g} + {self.skip.grad_norm_z:g} "
                         f"x std {v['grad_norm_std']:.4g} of the last {self.skip.last_history['grad_norm']} steps")
        if "max_grad_norm" in self.last_skip_reasons:
            parts.append(f"grad norm {v['grad_norm']:.4g} > max_grad_norm {self.skip.max_grad_norm:g}")
        if "loss_z" in self.last_skip_reasons:
            parts.append(f"loss {v['loss']:.5g} > mean {v['loss_mean']:.5g} + {self.skip.loss_z:g} x std "
                         f"{v['loss_std']:.4g} of the last {self.skip.last_history['loss']} steps")
        return "spike (" + "; ".join(parts) + ")"

    @property
    def slice_rebuilds(self) -> int:
        """Steps on which the slice metadata was built (the adapter's pieces changed)."""
        return self._slice_cache.rebuilds

    @property
    def storage_changes(self) -> int:
        """Steps on which a gradient piece's storage had moved since the step before."""
        return self._slice_cache.storage_changes

    @property
    def spike_skips(self) -> int:
        """Steps skipped by the spike rule so far (restored from checkpoints); included in
        ``session.skipped``, which counts every skipped step."""
        return 0 if self.skip is None else self.skip.skips

    # ------------------------------------------------------------------ logging
    def log_dict(self) -> Dict[str, float]:
        """The shaping figures of the last optimizer step as plain Python floats, for a trainer's
        own logger (Megatron-DeepSpeed's ``training_log``, a HF ``TrainerCallback``'s ``logs``).

        ``shaping/grad_norm_before``  global L2 norm of the (loss-scale-free) gradient before shaping
        ``shaping/grad_norm_after``   ... after shaping, before DeepSpeed's own ``gradient_clipping``
        ``shaping/shaped_fraction``   fraction of statistics groups whose factor differs from 1
        ``shaping/step_skipped``      1.0 when the last step was skipped, else 0.0
        ``shaping/skipped_steps``     steps skipped so far (non-finite gradient and spike skips)
        ``shaping/nonfinite_skips``   ... of which for a non-finite gradient
        ``shaping/spike_skips``       ... of which by the spike rule (``gradient_shaping.skip``)
        ``shaping/loss_scale``        loss scale the last step's backward used (1 without fp16)

        Every rank returns the same values (they come from globally reduced statistics). Per-step
        values are NaN before the first step, right after a checkpoint load, and, except
        ``grad_norm_before``, on a skipped step (no update was applied). Counters are cumulative
        over the run, restored from checkpoints. Reads a few numbers from the device: call it
        when logging, not every step if the host sync matters."""
        rec = self.session.last
        before = after = frac = NAN
        if rec is not None:
            before, after = torch.stack([rec.stats_before.sumsq.sum(), rec.stats_after.sumsq.sum()]).sqrt().tolist()
            frac = _shaped_fraction(rec.factor)
        elif self.last_skipped and self.last_norm_before is not None:
            before = float(self.last_norm_before)
        skipped = int(self.session.skipped)
        spike = int(self.spike_skips)
        return {f"{LOG_PREFIX}grad_norm_before": float(before), f"{LOG_PREFIX}grad_norm_after": float(after),
                f"{LOG_PREFIX}shaped_fraction": float(frac),
                f"{LOG_PREFIX}step_skipped": 1.0 if self.last_skipped else 0.0,
                f"{LOG_PREFIX}skipped_steps": float(skipped),
                f"{LOG_PREFIX}nonfinite_skips": float(skipped - spike),
                f"{LOG_PREFIX}spike_skips": float(spike),
                f"{LOG_PREFIX}loss_scale": float(self.last_loss_scale)}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The session's state dict plus, with spike skipping on, its windows under ``"skip"``."""
        sd = self.session.state_dict()
        if self.skip is not None:
            sd[SKIP_KEY] = self.skip.state_dict()
        return sd

    def load_state_dict(self, sd: Dict[str, Any], source: str = "state_dict") -> None:
        if self.skip is not None and sd.get(SKIP_KEY) is not None:
            SpikeSkip.check_state(sd[SKIP_KEY], source)
        self.session.load_state_dict(sd, source)
        if self.skip is not None:
            self.skip.load_state_dict(sd.get(SKIP_KEY), source)


def attach(engine, config: Optional[Dict[str, Any]] = None) -> Optional[DeepSpeedShaping]:
    """Attach shaping to ``engine`` from ``config`` (a ``gradient_shaping`` section or a whole
    DeepSpeed config dict) or, by default, from the engine's own config. Returns None when the
    config has no (enabled) section."""
    if getattr(engine, ATTR, None) is not None:
        raise RuntimeError("gradient shaping is already attached to this engine")
    if config is None:
        param_dict = config_dict(engine)
    elif GRADIENT_SHAPING in config:
        param_dict = config
    else:
        param_dict = {GRADIENT_SHAPING: config}
    cfg = get_gradient_shaping_config(param_dict)
    if cfg is None:
        return None
    try:
        return DeepSpeedShaping(engine, cfg)
    except UnsupportedPath as e:
        raise RuntimeError(str(e)) from None


def initialize(*args, **kwargs):
    """``deepspeed.initialize`` plus :func:`attach` when the config has a gradient_shaping
    section. Same arguments and return values as ``deepspeed.initialize``; the config is found
    as DeepSpeed finds it (``config``/``config_params`` as dict, path or base64, positional or
    keyword, ``args.deepspeed_config``)."""
    from .patch import original_initialize, shaped_initialize   # unpatched: attach once after patch_deepspeed()
    return shaped_initialize(original_initialize(), args, kwargs)
