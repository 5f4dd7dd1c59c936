"""Where each DeepSpeed optimizer path keeps the reduced gradient just before its step.

An adapter answers four questions for the shaping hook, which runs at the start of
``engine._take_model_step`` (the gradient-accumulation boundary, normal and pipeline engine):

* ``slices()``: the local gradient slices, keyed by parameter, each counted once over the
  reduction (see :mod:`megatron_shaping.stats.slices`);
* ``backward_scale()``: the loss scale the gradients carry *now*;
* how to make the optimizer unscale by that same value (``unscale_guard``): DeepSpeed 0.19.8
  divides by the *post-update* loss scale on a scale-growth step (ZeRO 1/2/3), and its
  ZeRO-0 fp16 path divides by a loss scale that backward never applied;
* ``skip_step()``: drop the update (non-finite gradient that no loss scaler catches);
* ``norm_guard(scale)``: DeepSpeed's own global-norm pass replaced by the norm the shaping
  statistics already hold (see :meth:`Adapter.norm_guard`).

Only this module knows DeepSpeed's private attributes (each use names the 0.19.8 attribute it
reads) and its optimizers' flags (``overflow``, :meth:`Adapter.skipping`); :mod:`.engine` and
:mod:`.monitor` only wrap ``engine._take_model_step``, DeepSpeed's per-step hook point.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ...stats.slices import Piece


class UnsupportedPath(RuntimeError):
    pass


class Adapter:
    #: True when the slices partition the data-parallel copies (ZeRO 1/2/3); False when every
    #: data-parallel rank holds the whole reduced gradient (then only DP rank 0 counts).
    sharded = False
    name = "adapter"

    def __init__(self, engine):
        self.engine = engine
        self.opt = engine.optimizer
        # Accelerate's DeepSpeedOptimizerWrapper reads ``optimizer.overflow`` after each step
        # (its step_was_skipped, which gates a Trainer-owned LR scheduler) only if the
        # attribute exists when it wraps the optimizer, i.e. right after initialize: give
        # the optimizers that lack it (a plain torch optimizer on ZeRO-0) the flag DeepSpeed's
        # own optimizers carry.
        if not hasattr(self.opt, "overflow"):
            self.opt.overflow = False
        self._skip_flag_left = False

    def pieces(self, with_param: bool) -> Iterator[Piece]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Undo what the adapter installed on the model (engine.destroy())."""

    def partitioned_over_tp_peers(self, p) -> bool:
        """Whether each tensor-parallel peer holds a different part of ``p``'s gradient (so a
        TP-replicated parameter is counted on every TP rank, not on TP rank 0 alone)."""
        return False

    def stats_device(self, module_device: torch.device) -> torch.device:
        """Where the gradient pieces live, and so where the statistics, the shaper state and
        the factors are kept: the module's device, except with optimizer offload (below)."""
        return module_device

    #: Replace DeepSpeed's global-norm pass by the shaping statistics (see :meth:`norm_guard`).
    #: False keeps DeepSpeed's own pass (the equivalence tests compare both).
    replace_norm = True
    #: Steps on which DeepSpeed's norm pass was replaced (for tests and the benchmark).
    norms_replaced = 0

    def skips_invalid_norm(self) -> bool:
        """True when DeepSpeed's step itself reads whether the global norm it is handed (ours,
        :meth:`norm_guard`) is finite and skips the step as an overflow when it is not: the
        shaping step's skip decision can then ride on that read (``ShapingSession.step(defer=
        True)``) instead of a host read of its own."""
        return False

    def backward_scale(self) -> float:
        return 1.0

    @contextlib.contextmanager
    def unscale_guard(self, scale: float):
        """Everything the optimizer step needs from us: unscale by ``scale`` and, when enabled,
        take the global norm from the shaping statistics instead of computing it again."""
        with self._unscale_guard(scale):
            norm = self.norm_after_shaping(scale) if self.replace_norm else None
            if norm is None:
                yield
                return
            with self.norm_guard(norm):
                yield

    @contextlib.contextmanager
    def _unscale_guard(self, scale: float):
        yield

    def norm_after_shaping(self, scale: float) -> Optional[torch.Tensor]:
        """The global L2 norm of the gradient as DeepSpeed holds it now, i.e. after shaping and
        times the loss scale backward applied (what DeepSpeed's own pass would compute), as a
        float32 0-d tensor on the statistics' device; None when this step has no shaping record
        (a non-finite gradient: DeepSpeed's own pass and overflow check run unchanged).

        Every element is counted exactly once over the whole job (ZeRO partitions, TP shards,
        pipeline stages, replicas excluded), the same set DeepSpeed's norm counts; the sum of
        squares is exact for pure-scale shapers (derived from the first pass) and recomputed
        after an elementwise map."""
        shaping = getattr(self.engine, "gradient_shaping", None)
        record = shaping.session.last if shaping is not None else None
        if record is None or record.stats_after.sumsq is None:
            return None
        norm = (record.stats_after.sumsq.sum().sqrt() * float(scale)).to(torch.float32)
        veto = shaping.session.pending_veto
        if veto is not None:        # a deferred decision: a veto makes DeepSpeed skip the step
            norm = torch.where(veto, torch.full_like(norm, math.inf), norm)
        return norm

    @contextlib.contextmanager
    def norm_guard(self, norm: torch.Tensor):
        """Make DeepSpeed's step use ``norm`` instead of its own global-norm pass (per path).
        The base class keeps DeepSpeed's pass."""
        yield

    def _replaced(self):
        self.norms_replaced += 1

    def after_shaping(self, pieces: List[Piece]) -> None:
        """Hook for caches DeepSpeed derived from the gradient before the step (offload norms)."""

    def skip_step(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @contextlib.contextmanager
    def skipping(self):
        """Inside the block, DeepSpeed's step skips the update: ``optimizer.step`` is replaced by
        :meth:`skip_step` and ``optimizer.overflow`` is set, so ``_take_model_step`` counts the
        step as skipped and leaves the LR schedule alone, as for an fp16 overflow. The flag
        stays set after the step, as DeepSpeed leaves it after an fp16 overflow, so that a
        caller asking afterwards (Accelerate's ``step_was_skipped``: the HF Trainer then does
        not step its own LR scheduler) sees the skip; :meth:`begin_step` clears it."""
        opt = self.opt
        with _patched_method(opt, "step", lambda orig: (lambda *a, **k: self.skip_step())):
            opt.overflow = True
            self._skip_flag_left = True
            yield

    def begin_step(self) -> None:
        """Before the next optimizer step (shaped or not): clear the flag a skip left set (a
        path whose DeepSpeed step does not set ``overflow`` itself would count it skipped)."""
        if self._skip_flag_left:
            self.opt.overflow = False
            self._skip_flag_left = False

    def step_was_skipped(self) -> bool:
        """After DeepSpeed's step: whether it skipped the update as an overflow
        (``optimizer.overflow``, a host flag every path sets)."""
        return bool(getattr(self.opt, "overflow", False))


def config_dict(engine) -> dict:
    """The DeepSpeed config dict the engine was built from (``{}`` when it keeps none)."""
    return getattr(engine._config, "_param_dict", None) or {}


@contextlib.contextmanager
def _swap_attr(obj, attr: str, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


@contextlib.contextmanager
def _patched_method(obj, name: str, make: Callable[[Callable], Callable]):
    """Replace a bound method on the instance for the duration of the block."""
    orig = getattr(obj, name)
    had_own = name in obj.__dict__
    setattr(obj, name, make(orig))
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, orig)
        else:
            delattr(obj, name)


def _whole_grads(params) -> Iterator[Piece]:
    for p in params:
        if p.grad is not None:
            yield Piece(p, p.grad.view(-1), 0, p.detach().view(-1))


# ------------------------------------------------------------------------------ ZeRO-0 paths
class PlainAdapter(Adapter):
    """ZeRO-0, fp32: a torch optimizer; every DP rank holds the all-reduced p.grad."""
    name = "plain"

    def pieces(self, with_param):
        return _whole_grads(self.engine.module.parameters())

    @contextlib.contextmanager
    def norm_guard(self, norm):
        """ZeRO-0 fp32 computes a norm only to clip (``engine.clip_fp32_gradients`` ->
        ``deepspeed.runtime.utils.clip_grad_norm_``, which also all-reduces it over data
        parallelism). Same rule with our norm: g *= min(1, max_norm / (norm + 1e-6)), the
        factor a float32 tensor multiplied into every gradient as there."""
        if not self.engine.gradient_clipping() > 0.0:
            yield
            return
        engine = self.engine

        def make(orig):
            def clip():
                self._replaced()
                max_norm = torch.tensor([float(engine.gradient_clipping())], device=norm.device)
                coef = torch.min(torch.ones_like(max_norm), max_norm / (norm.view(1) + 1e-6))
                for p in engine.module.parameters():
                    if p.grad is not None:
                        p.grad.data.mul_(coef.to(p.grad.device))
                return norm
            return clip

        with _patched_method(engine, "clip_fp32_gradients", make):
            yield

    def skip_step(self):
        self.engine.zero_grad()


class FP16Adapter(Adapter):
    """ZeRO-0 fp16 (and bf16, which 0.19.8 also routes here): FP16_Optimizer (fused) and
    FP16_UnfusedOptimizer keep 16-bit p.grad, all-reduced over data parallelism.

    DeepSpeed 0.19.8's engine.backward scales the loss only for ZeROOptimizer subclasses, and
    these are not: the gradients arrive unscaled while the optimizer still divides by
    ``loss_scale_config.cur_scale``. We report scale 1 and make the optimizer unscale by 1.
    """
    name = "fp16_optimizer"

    def pieces(self, with_param):
        return _whole_grads(p for group in self.opt.fp16_groups for p in group)

    def backward_scale(self):
        return 1.0

    @contextlib.contextmanager
    def _unscale_guard(self, scale):
        cfg = self.opt.loss_scale_config

        def make(orig):
            def unscale(*args, **kwargs):
                # The scale update already ran; unscale by what backward applied.
                with _swap_attr(cfg, "cur_scale", scale):
                    return orig(*args, **kwargs)
            return unscale

        with _patched_method(self.opt, "unscale_and_clip_grads", make):
            yield

    @contextlib.contextmanager
    def norm_guard(self, norm):
        """Both optimizers run their own overflow check first (it stays). FP16_Optimizer.step
        (not the legacy fused-Adam step) then takes its norm from ``get_flattened_grad_norm``
        of ``deepspeed.runtime.fp16.fused_optimizer``; FP16_UnfusedOptimizer.step (not the
        legacy fused-LAMB step) from ``get_weight_norm`` per group combined by
        ``get_global_norm`` (a Python float) of ``deepspeed.runtime.fp16.unfused_optimizer``."""
        from deepspeed.runtime.fp16 import fused_optimizer as fo
        from deepspeed.runtime.fp16 import unfused_optimizer as uo
        if isinstance(self.opt, fo.FP16_Optimizer) and not getattr(self.opt, "fused_adam_legacy", False):
            def flattened_norm(*args, **kwargs):
                self._replaced()
                return norm

            with _swap_attr(fo, "get_flattened_grad_norm", flattened_norm):
                yield
        elif isinstance(self.opt, uo.FP16_UnfusedOptimizer) and not getattr(self.opt, "fused_lamb_legacy", False):
            def weight_norm(*args, **kwargs):
                return 0.0                  # the per-group pass is not run

            def global_norm(*args, **kwargs):
                self._replaced()
                return float(norm)          # DeepSpeed's get_global_norm returns a float too

            with _swap_attr(uo, "get_weight_norm", weight_norm), _swap_attr(uo, "get_global_norm", global_norm):
                yield
        else:
            yield

    def skip_step(self):
        # As FP16_Optimizer's / FP16_UnfusedOptimizer's overflow branch (0.19.8), without the
        # loss-scale update: a skipped step reports an infinite norm.
        self.opt._global_grad_norm = float("inf")
        self.opt.zero_grad(set_to_none=True)


class BF16Adapter(Adapter):
    """BF16_Optimizer: fp32 gradient accumulators (``fp32_groups_gradients[i][j]``) for each
    bf16 param, all-reduced over data parallelism, so replicated on every DP rank."""
    name = "bf16"

    def pieces(self, with_param):
        opt = self.opt
        for i, group in enumerate(opt.bf16_groups):
            for j, p in enumerate(group):
                if not opt.fp32_groups_has_gradients[i][j]:
                    continue
                g = opt.fp32_groups_gradients[i][j]
                yield Piece(p, g.view(-1), 0, p.detach().view(-1))

    @contextlib.contextmanager
    def norm_guard(self, norm):
        """BF16_Optimizer.step takes its norm from ``get_global_norm_of_tensors`` of the module
        ``deepspeed.runtime.bf16_optimizer`` (no MoE: refused at attach) and clips with it."""
        from deepspeed.runtime import bf16_optimizer as bo

        def global_norm(*args, **kwargs):
            self._replaced()
            return norm

        with _swap_attr(bo, "get_global_norm_of_tensors", global_norm):
            yield

    def skip_step(self):
        # As BF16_Optimizer.step's invalid-norm branch (0.19.8).
        self.opt._global_grad_norm = float("inf")
        self.opt.clear_hp_grads()
        self.opt.clear_lp_grads()


# ------------------------------------------------------------------------------ ZeRO
class _ZeroAdapter(Adapter):
    """ZeRO 1/2/3 scale the loss in backward by ``optimizer.loss_scale`` and unscale in
    ``unscale_and_clip_grads`` by the same property, read again after the scale update: on a
    scale-growth step that is the new scale. We pin it to the scale backward used."""
    sharded = True

    def backward_scale(self):
        return float(self.opt.loss_scale)

    @contextlib.contextmanager
    def _unscale_guard(self, scale):
        def make(orig):
            def unscale(*args, **kwargs):
                with _swap_attr(self.opt, "loss_scale", scale):
                    return orig(*args, **kwargs)
            return unscale

        with _patched_method(self.opt, "unscale_and_clip_grads", make):
            yield

    def _returning(self, method: str, value):
        """For the block, the optimizer's ``method`` returns ``value`` (the norm the shaping
        statistics hold, in the form DeepSpeed's pass returns it) and counts the replacement."""
        def make(orig):
            def replaced(*args, **kwargs):
                self._replaced()
                return value
            return replaced

        return _patched_method(self.opt, method, make)

    def _offloaded(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    # A parameter that gets no gradient on a step (an unused branch, a layer skipped): ZeRO-1/2
    # with CPU offload and ZeRO-3 (with and without) leave the previous step's gradient of it in
    # their persistent buffers, and the optimizer steps on that (already shaped) copy again;
    # ZeRO-1/2 without offload hand a zero gradient, as one process would see it. So where the
    # buffers persist, every parameter's gradient accumulation is watched (a set of ids: one
    # Python call per parameter and backward) and the pieces of the unwatched are zeroed
    # before the statistics: the shaper, DeepSpeed's norm and its update then see the zero.
    def _stale_buffers(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _watch_gradients(self, groups) -> None:
        self._grad_seen, self._fresh, self._watch_handles, self._always_fresh = set(), None, [], set()
        if not self._stale_buffers():
            return
        seen = self._grad_seen

        def saw(p, seen=seen):          # holds the set only: no reference to the adapter or engine
            seen.add(id(p))

        for group in groups:
            for p in group:
                # ZeRO-3 leaf modules (MoE experts, set_z3_leaf_modules): DeepSpeed assigns a
                # zero .grad to the parameters a rank did not route to (no AccumulateGrad, so no
                # hook) and reduces them every backward: their partitions are never stale
                if p.requires_grad and not hasattr(p, "ds_z3_leaf_module"):
                    self._watch_handles.append(p.register_post_accumulate_grad_hook(saw))
                else:
                    self._always_fresh.add(id(p))

    def begin_step(self) -> None:
        super().begin_step()
        if self._watch_handles:
            self._fresh = set(self._grad_seen) | self._always_fresh
            self._grad_seen.clear()

    def _zero_if_stale(self, piece: Piece) -> Piece:
        if self._fresh is not None and id(piece.param) not in self._fresh:
            piece.grad.zero_()
        return piece

    def close(self) -> None:
        """Remove the gradient watch (engine.destroy(); a new engine on the same model adds its own)."""
        for h in self._watch_handles:
            h.remove()
        self._watch_handles, self._fresh = [], None

    def after_shaping(self, pieces):
        """With CPU offload DeepSpeed caches per-parameter norms of the (scaled) partition pieces
        in backward and reads them only for its global norm: refresh them unless that norm is
        replaced (:meth:`norm_guard`). (ZeRO-3's cached norm covers the whole partition; its zero
        tail padding adds nothing.)"""
        if not self._offloaded() or not pieces or self.replace_norm:
            return
        norms = torch._foreach_norm([pc.grad for pc in pieces], 2)
        for pc, n in zip(pieces, norms):
            self.opt.norm_for_param_grads[self.opt.get_param_id(pc.param)] = n.double()


# ------------------------------------------------------------------------------ ZeRO 1/2
class Zero12Adapter(_ZeroAdapter):
    """DeepSpeedZeroOptimizer (stage 1 and 2).

    Without offload the rank's partition is the list ``averaged_gradients[i]`` (zero pads
    marked ``_zero_padding``) aligned with ``params_in_partition[i]``; a parameter that
    straddles a partition boundary contributes only the elements inside it. With CPU offload
    the gradient is already in ``single_partition_of_fp32_groups[i].grad`` at ``dest_offset``,
    and DeepSpeed caches per-parameter norms (``norm_for_param_grads``) in backward that its
    overflow check and clipping read later: we refresh them after shaping. Positions come from
    ``grad_start_offset`` / ``grad_partition_insertion_offset`` (both paths).
    """
    name = "zero12"

    def skips_invalid_norm(self) -> bool:
        """DeepSpeedZeroOptimizer.step checks ``is_invalid_grad_norm(scaled_global_norm())``
        unless the gradient is bf16 without ``check_grad_overflow``, and only when it computes
        the norm at all (``compute_grad_norm``)."""
        opt = self.opt
        return self.replace_norm and bool(getattr(opt, "compute_grad_norm", False)) and (
            opt.dtype != torch.bfloat16 or bool(getattr(opt, "check_grad_overflow", False)))

    def __init__(self, engine):
        super().__init__(engine)
        #: group -> (its params_in_partition list, partition id, [(p, src, dest, n)] of the
        #: parameters with elements in the partition, their indices in the gradient list or None)
        self._plans: Dict[int, list] = {}
        self._watch_gradients(self.opt.bit16_groups if self._stale_buffers() else ())

    def _stale_buffers(self) -> bool:
        return bool(self.opt.cpu_offload)

    def _plan(self, i: int, partition_id: int, params) -> list:
        """Group i's parameter pieces in this rank's partition, kept: DeepSpeed fixes the
        partition layout (offsets, sizes) when it builds the optimizer."""
        hit = self._plans.get(i)
        if hit is None or hit[0] is not params or hit[1] != partition_id:
            rows = []
            for p in params:
                src, dest, n = self._position(i, partition_id, p)
                if n > 0:
                    rows.append((p, src, dest, n))
            hit = self._plans[i] = [params, partition_id, rows, None]
        return hit

    def _position(self, i: int, partition_id: int, p) -> Tuple[int, int, int]:
        """(source offset in p, destination offset in the partition, element count)."""
        opt = self.opt
        pid = opt.get_param_id(p)
        src = int(opt.grad_start_offset[i][partition_id][pid])
        dest = int(opt.grad_partition_insertion_offset[i][partition_id][pid])
        n = int(min(p.numel() - src, int(opt.partition_size[i]) - dest))
        return src, dest, n

    def pieces(self, with_param):
        import deepspeed.comm as dist
        opt = self.opt
        if opt.cpu_offload:
            self._wait_for_offload_copies()     # the device-to-host gradient copies in flight
        for i, params in enumerate(opt.params_in_partition):
            fp32 = opt.single_partition_of_fp32_groups[i]
            partition_id = dist.get_rank(group=opt.real_dp_process_group[i])
            if opt.cpu_offload:
                flat = fp32.grad.view(-1)
                for p, src, dest, n in self._plan(i, partition_id, params)[2]:
                    yield self._zero_if_stale(Piece(p, flat.narrow(0, dest, n), src, fp32.narrow(0, dest, n)))
                continue
            grads = opt.averaged_gradients.get(i) if isinstance(opt.averaged_gradients, dict) \
                else opt.averaged_gradients[i]
            if grads is None:
                continue
            plan = self._plan(i, partition_id, params)
            rows, index = plan[2], plan[3]
            if not self._index_holds(grads, rows, index):
                index = plan[3] = self._match(i, grads, rows)
            for (p, src, dest, n), k in zip(rows, index):
                yield Piece(p, grads[k].view(-1), src, fp32.narrow(0, dest, n) if with_param else None)

    @staticmethod
    def _offsets(grads) -> List[int]:
        """Where each piece of the gradient list starts in the partition (the list covers it
        contiguously)."""
        out, pos = [], 0
        for t in grads:
            out.append(pos)
            pos += t.numel()
        return out

    @staticmethod
    def _index_holds(grads, rows, index) -> bool:
        """Whether last step's positions in the gradient list still name pieces of the right
        size at the right offset, not pads (DeepSpeed rebuilds the list every step, the same
        way): what :meth:`_match` would find, without its search."""
        if index is None or len(grads) != index[-1]:
            return False
        offsets = Zero12Adapter._offsets(grads)
        for (_, _, dest, n), k in zip(rows, index):
            t = grads[k]
            if offsets[k] != dest or t.numel() != n or getattr(t, "_zero_padding", False):
                return False
        return True

    @staticmethod
    def _match(i: int, grads, rows) -> List[int]:
        """The position in ``grads`` of every row's gradient piece (then the list's length).

        The list covers the partition contiguously: parameter pieces at their insertion offsets,
        zero pads between and after them (DeepSpeed marks some pads with `_zero_padding`, not the
        tail pad of its unpadded path), so match by offset."""
        by_offset: Dict[int, List[int]] = {}
        for k, pos in enumerate(Zero12Adapter._offsets(grads)):
            by_offset.setdefault(pos, []).append(k)
        index = []
        for _, _, dest, n in rows:
            k = next((k for k in by_offset.get(dest, ()) if grads[k].numel() == n
                      and not getattr(grads[k], "_zero_padding", False)), None)
            if k is None:
                raise UnsupportedPath(f"ZeRO partition of group {i}: no gradient piece of {n} elements at "
                                      f"offset {dest}; this DeepSpeed layout is not supported")
            index.append(k)
        return index + [len(grads)]

    def _offloaded(self) -> bool:
        return bool(self.opt.cpu_offload)

    def stats_device(self, module_device):
        """With CPU offload the fp32 partition and its gradient are host tensors (DeepSpeed's own
        offload norm is a host tensor too)."""
        groups = self.opt.single_partition_of_fp32_groups
        return groups[0].device if self.opt.cpu_offload and groups else module_device

    def _wait_for_offload_copies(self) -> None:
        """With CPU offload, backward copies each gradient into the fp32 partition with a
        non-blocking copy that DeepSpeed waits for only at the top of its ``step``: wait before
        the hook reads or writes that buffer (nothing is pending on the CPU accelerator)."""
        wait = getattr(self.opt, "_wait_for_offload_copies", None)
        if wait is not None:
            wait()

    @contextlib.contextmanager
    def norm_guard(self, norm):
        """DeepSpeedZeroOptimizer.step computes ``scaled_global_norm()`` (with or without
        offload) unless ``compute_grad_norm`` is off, then checks it for inf/nan (overflow),
        stores it divided by the loss scale as ``_global_grad_norm`` and clips with it."""
        with self._returning("scaled_global_norm", norm):
            yield

    def skip_step(self):
        # Mirrors DeepSpeedZeroOptimizer.step (0.19.8) on an overflow: its opening (the micro-step
        # counter back to the start: with offload and gradient accumulation the next step's first
        # micro-batch would otherwise add the skipped step's accumulated CPU gradient; pending
        # offload copies waited for; the offload accumulation set cleared), then the overflow
        # branch (an infinite reported norm, gradients and buffers released), without the
        # loss-scale update.
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID
        opt = self.opt
        opt.micro_step_id = INITIAL_MICRO_STEP_ID
        self._wait_for_offload_copies()
        if opt.cpu_offload:
            opt._offload_accumulated_param_ids = set()
        opt._global_grad_norm = float("inf") if opt.compute_grad_norm else None
        opt.zero_grad(set_to_none=True)
        release = getattr(opt, "_release_preflattened_grad_buffers", None)
        if release is not None:
            release()
        if opt.cpu_offload:
            opt.reset_cpu_buffers()
        else:
            for k in list(opt.averaged_gradients.keys()):
                opt.averaged_gradients[k] = None
                opt.all_grad_tensors[k] = None


# ------------------------------------------------------------------------------ ZeRO 3
class Zero3Adapter(_ZeroAdapter):
    """DeepSpeedZeroOptimizer_Stage3.

    Without offload, ``averaged_gradients[sub_group]`` holds one flat gradient partition per
    parameter of ``fp16_groups[sub_group]`` (the ``ds_tensor`` layout: this rank's
    ``partition_numel()`` elements starting at rank * partition_numel(), the last rank's tail
    padded with zeros). With offload the partitions sit in
    ``fp32_partitioned_groups_flat[i].grad``.
    """
    name = "zero3"

    def skips_invalid_norm(self) -> bool:
        """DeepSpeedZeroOptimizer_Stage3.step checks ``is_invalid_grad_norm`` of the combined
        ``_get_norm_groups()`` on every step that did not overflow before."""
        return self.replace_norm

    def __init__(self, engine):
        super().__init__(engine)
        self._extents: Dict[int, tuple] = {}      # id(param) -> (param, extent), see _extent
        self._watch_gradients(self.opt.fp16_groups)

    def _stale_buffers(self) -> bool:
        return True

    def _rank(self, p):
        import deepspeed.comm as dist
        return dist.get_rank(group=p.ds_process_group)

    def partitioned_over_tp_peers(self, p) -> bool:
        """ZeRO-3 parameters partitioned over a group that contains the model-parallel peers
        (``deepspeed.zero.Init`` partitions over all ranks before AutoTP makes the data-parallel
        group): every rank holds a distinct partition, as DeepSpeed's own norm decides
        (``_grad_norm_counts_every_rank``, 0.19.8)."""
        decide = getattr(self.opt, "_grad_norm_counts_every_rank", None)
        return bool(decide([p], p.ds_process_group)) if decide is not None else False

    def pieces(self, with_param):
        opt = self.opt
        for i, group in enumerate(opt.fp16_groups):
            if opt.offload_optimizer:
                flat_grad = opt.fp32_partitioned_groups_flat[i].grad
                if flat_grad is None:
                    continue
                flat_grad = flat_grad.view(-1)
                flat_param = opt.fp32_partitioned_groups_flat[i].view(-1)
                off = 0
                for p in group:
                    n, start, valid = self._extent(p)
                    if valid:
                        yield self._zero_if_stale(Piece(p, flat_grad.narrow(0, off, valid), start,
                                                        flat_param.narrow(0, off, valid)))
                    off += n
                continue
            grads = opt.averaged_gradients.get(i) if isinstance(opt.averaged_gradients, dict) \
                else opt.averaged_gradients[i]
            if grads is None:
                continue
            flat_param = opt.fp32_partitioned_groups_flat[i].view(-1) if with_param else None
            off = 0
            for p, g in zip(group, grads):
                n, start, valid = self._extent(p)
                if valid:
                    g = g.view(-1)
                    yield self._zero_if_stale(Piece(p, g if valid == g.numel() else g[:valid], start,
                                                    None if flat_param is None else flat_param.narrow(0, off, valid)))
                off += n

    def _extent(self, p) -> Tuple[int, int, int]:
        """(partition_numel, flat start of this rank's partition, elements in it that are not the
        zero tail padding of the last partition), computed once per parameter: the rank in the
        parameter's process group and the partition sizes do not change between steps."""
        hit = self._extents.get(id(p))
        if hit is None or hit[0] is not p:
            n = p.partition_numel()
            start = self._rank(p) * n
            hit = self._extents[id(p)] = (p, n, start, max(0, min(n, p.ds_numel - start)))
        return hit[1:]

    def _offloaded(self) -> bool:
        return bool(self.opt.offload_optimizer)

    def stats_device(self, module_device):
        """With optimizer offload the fp32 partitions and their gradients are host tensors."""
        flat = self.opt.fp32_partitioned_groups_flat
        return flat[0].device if self.opt.offload_optimizer and flat else module_device

    @contextlib.contextmanager
    def _unscale_guard(self, scale):
        """Stage 3's ``unscale_and_clip_grads`` (0.19.8) multiplies the whole fp32 partition by
        1 / scale even when that is 1 and nothing clips; stages 1/2 return early in that case.
        The shaped step does the same (the multiply by 1 changes no value)."""
        if scale == 1.0 and not self.opt.clip_grad > 0.0:
            with _patched_method(self.opt, "unscale_and_clip_grads", lambda orig: lambda *a, **k: None):
                yield
            return
        with super()._unscale_guard(scale):
            yield

    @contextlib.contextmanager
    def norm_guard(self, norm):
        """DeepSpeedZeroOptimizer_Stage3.step combines ``_get_norm_groups()`` (per sub-group
        norms, with or without offload) into the global norm; one group with the whole norm
        combines to the same value."""
        with self._returning("_get_norm_groups", [norm]):
            yield

    def skip_step(self):
        # Mirrors DeepSpeedZeroOptimizer_Stage3.step (0.19.8) on an overflow: _pre_step (the
        # micro-step counter, the offload boundary set, the epilogue flag, the reduce buckets) and
        # the partitioning of all parameters, then the overflow clean-up (an infinite reported
        # norm, gradients released), without the loss-scale update.
        opt = self.opt
        opt._pre_step()
        opt._partition_all_parameters()
        opt._global_grad_norm = float("inf")
        opt.zero_grad(set_to_none=True)
        for k in list(opt.averaged_gradients.keys()):
            opt.averaged_gradients[k] = None
        if opt.offload_optimizer:
            for t in opt.fp32_partitioned_groups_flat:
                if t.grad is not None:
                    t.grad.zero_()
            opt.norm_for_param_grads = {}


def has_optimizer(engine) -> bool:
    """Whether DeepSpeed built an optimizer step to shape: False for an engine built without an
    optimizer (evaluation, a reference or teacher model: the HF Trainer's ``evaluate()`` before
    ``train()`` under ZeRO-3, TRL's reference models), which has ``optimizer`` None, ZeRO-3's
    parameter manager ``DeepSpeedZeRoOffload`` or a wrapper (BF16_Optimizer) around none or
    around DeepSpeed's ``DummyOptim`` placeholder."""
    from deepspeed.runtime.utils import DummyOptim
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    opt = engine.optimizer
    if opt is None or isinstance(opt, (DeepSpeedZeRoOffload, DummyOptim)):
        return False
    if "optimizer" in getattr(opt, "__dict__", {}):
        return opt.optimizer is not None and not isinstance(opt.optimizer, DummyOptim)
    return True


def select_adapter(engine) -> Adapter:
    """The adapter for the optimizer DeepSpeed built, or UnsupportedPath with the reason."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not has_optimizer(engine):
        raise UnsupportedPath("gradient_shaping: this engine was built without an optimizer (for evaluation or "
                              "as a reference model): there is no optimizer step to shape")
    opt = engine.optimizer
    if getattr(engine, "has_moe_layers", False) or getattr(opt, "has_moe_layers", False):
        raise UnsupportedPath("gradient_shaping does not support MoE layers yet (expert-parallel "
                              "gradients would need their own reduction group)")
    autocast = getattr(engine, "torch_autocast_enabled", None)
    if (autocast() if callable(autocast) else False) or getattr(engine, "torch_autocast_z0_gradscaler", None):
        raise UnsupportedPath("gradient_shaping does not support DeepSpeed's torch_autocast mode")
    # ZeRO-3 sets opt.use_muon; ZeRO-1/2 and the plain engine do not: test the (wrapped)
    # optimizer's class name as stage_1_and_2.py does ('muon' in ...__class__.__name__.lower()).
    inner = getattr(opt, "optimizer", opt)
    if getattr(opt, "use_muon", False) or "muon" in type(inner).__name__.lower():
        raise UnsupportedPath(f"gradient_shaping does not support the Muon optimizer path of {type(opt).__name__}")
    module = getattr(engine, "module", None)
    sparse = [type(m).__name__ for m in (module.modules() if isinstance(module, torch.nn.Module) else ())
              if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse]
    if sparse:
        raise UnsupportedPath(f"gradient_shaping does not support sparse gradients ({sparse[0]}(sparse=True)): "
                              "build the embedding with sparse=False")
    if getattr(engine, "gradient_average", True) is False:
        # gradient_allreduce_op "sum" (ZeRO 0-2): DeepSpeed leaves the reduced gradient summed,
        # world-size times the mean a single process sees; absolute thresholds would act otherwise
        raise UnsupportedPath("gradient_shaping does not support \"gradient_allreduce_op\": \"sum\" (the gradient is "
                              "then the sum over data-parallel ranks, not their mean); use \"mean\" (the default)")
    # Both subclass a supported ZeRO optimizer and update parameters outside the optimizer step
    # the hook runs in: SuperOffload steps CPU sub-groups during backward, ZenFlow steps selected
    # columns every iteration from unshaped gradients (test by name: they are optional modules).
    named = next((c.__name__ for c in type(opt).__mro__ if c.__name__.startswith(("SuperOffload", "ZenFlow"))), None)
    if named is None and (getattr(opt, "zenflow", False) is True or getattr(engine, "zenflow", False) is True):
        named = f"ZenFlow ({type(opt).__name__})"     # ZeRO-3 ZenFlow: the stage-3 class with a flag
    if named is not None:
        raise UnsupportedPath(f"gradient_shaping does not support {named} (offload_optimizer.super_offload "
                              "/ zero_optimization.zenflow): it updates parameters from unshaped gradients "
                              "outside the optimizer step the shaper runs in")
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        if getattr(opt, "swap_optimizer", False) or getattr(opt, "params_in_nvme_and_cpu", False):
            raise UnsupportedPath("gradient_shaping does not support ZeRO-3 NVMe offload (optimizer or parameters); "
                                  "use offload to 'cpu' or no offload")
        return Zero3Adapter(engine)
    if isinstance(opt, DeepSpeedZeroOptimizer):
        return Zero12Adapter(engine)
    if isinstance(opt, BF16_Optimizer):
        return BF16Adapter(engine)
    if isinstance(opt, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        return FP16Adapter(engine)
    if isinstance(opt, torch.optim.Optimizer) and not engine.zero_optimization():
        if engine.fp16_enabled() or engine.bfloat16_enabled():
            raise UnsupportedPath(f"gradient_shaping: unexpected optimizer {type(opt).__name__} with fp16/bf16")
        return PlainAdapter(engine)
    raise UnsupportedPath(f"gradient_shaping does not support the optimizer path {type(opt).__name__}")
