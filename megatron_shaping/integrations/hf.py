"""Hugging Face Trainer / Accelerate glue.

The Trainer builds the DeepSpeed engine itself (``Accelerator._prepare_deepspeed`` calls
``deepspeed.initialize`` with the config dict of ``TrainingArguments(deepspeed=...)``, the
``gradient_shaping`` section included) and, when resuming, loads the checkpoint right after.
:func:`megatron_shaping.patch_deepspeed` attaches the shaper inside that call, so the shaper
state is saved with every Trainer checkpoint and restored by ``resume_from_checkpoint``.

:class:`ShapingCallback` adds the shaping figures of
:meth:`~megatron_shaping.integrations.deepspeed.engine.DeepSpeedShaping.log_dict`
(``shaping/grad_norm_before``, ``shaping/grad_norm_after``, ``shaping/shaped_fraction``,
``shaping/skipped_steps``, ...) to the Trainer's training logs: ``trainer.state.log_history`` and
every ``report_to`` logger (TensorBoard, W&B, ...) when it is installed with
:func:`add_shaping_callback`, which puts it ahead of the loggers. The figures are those of the
last optimizer step before the log, like the Trainer's own ``grad_norm``, which under DeepSpeed
is the norm of the *shaped* gradient (taken from the hook's statistics: DeepSpeed's own norm
pass is replaced).

    import megatron_shaping
    from megatron_shaping.integrations.hf import add_shaping_callback

    megatron_shaping.patch_deepspeed()          # before trainer.train()
    trainer = Trainer(model=model, args=TrainingArguments(..., deepspeed="ds_config.json"), ...)
    add_shaping_callback(trainer)
    trainer.train()

:class:`ObserveLossMixin` feeds the training loss to the spike rule's ``loss_z`` test.

Imports ``transformers`` (not deepspeed) at module import; nothing else in the package does
(``ShapingCallback(patch=True)``, the default, imports deepspeed to patch it).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional

import torch
from transformers import TrainerCallback

logger = logging.getLogger("megatron_shaping")


def _shaping_of(engine) -> Any:
    return getattr(engine, "gradient_shaping", None) if engine is not None else None


def _config_has_section(args) -> bool:
    cfg = getattr(getattr(args, "hf_deepspeed_config", None), "config", None)
    return isinstance(cfg, dict) and "gradient_shaping" in cfg and \
        (cfg["gradient_shaping"] or {}).get("enabled", True) is not False


class ShapingCallback(TrainerCallback):
    """Put the shaping figures into the Trainer's training logs (``on_log``).

    ``engine``: the DeepSpeed engine; by default the one a patched ``deepspeed.initialize``
    (or ``megatron_shaping.initialize``) built around the Trainer's model. ``patch``: call
    :func:`megatron_shaping.patch_deepspeed` now (idempotent), so that constructing the
    callback before ``trainer.train()`` is enough to get the shaper attached. Logs that are not
    training-step logs (evaluation, the final summary) are left alone.
    """

    def __init__(self, engine=None, patch: bool = True):
        self.engine = engine
        if patch:
            from .deepspeed.patch import patch_deepspeed
            patch_deepspeed()

    def shaping(self, model=None):
        """The engine's ``DeepSpeedShaping`` (None when no shaper is attached)."""
        if self.engine is not None:
            return _shaping_of(self.engine)
        from .deepspeed.patch import engine_for_module
        return _shaping_of(engine_for_module(model))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.shaping(model) is None and _config_has_section(args):
            logger.warning("megatron_shaping: the DeepSpeed config has a gradient_shaping section but no shaper is "
                           "attached to the Trainer's engine: call megatron_shaping.patch_deepspeed() before "
                           "trainer.train() (the engine is built inside train())")

    def on_log(self, args, state, control, logs: Optional[Dict[str, Any]] = None, model=None, **kwargs):
        if logs is None or not ("loss" in logs or "grad_norm" in logs):
            return
        gs = self.shaping(model)
        if gs is None:
            return
        figures = gs.log_dict()
        logs.update(figures)
        # Trainer.log appends a copy of ``logs`` to log_history before calling on_log.
        hist = state.log_history
        if hist and hist[-1].get("step") == state.global_step and _same(hist[-1].get("loss"), logs.get("loss")):
            hist[-1].update(figures)


class ObserveLossMixin:
    """Feed the Trainer's training loss to the spike rule's ``loss_z`` test.

    The Trainer computes the loss inside ``training_step`` and hands it to no callback, so the
    rule (``gradient_shaping.skip.loss_z``) would see no loss (it warns once and tests the
    gradient norm only). Mix this in ahead of the Trainer class::

        class MyTrainer(ObserveLossMixin, Trainer):
            ...

    Every training micro-batch's loss goes to ``engine.gradient_shaping.observe_loss`` from
    ``compute_loss``, before its backward (the optimizer step runs inside the boundary
    micro-batch's backward, and the rule must judge it with its own loss). The rule takes the
    mean over the step's micro-batches and the data-parallel ranks, so each is fed on the scale
    of the step's loss: where ``compute_loss`` returns a micro-batch's *share* of the step's
    loss (normalised by the step's token count ``num_items_in_batch``, the Trainer's
    ``loss_is_scaled_for_ga`` rule), the share times the step's number of micro-batches
    (``current_gradient_accumulation_steps``: fewer on the last step of an epoch when the
    accumulation steps do not divide it); a micro-batch's own mean loss as it is. No host sync.
    Losses computed for evaluation (model in eval mode or no grad) are not fed; without a shaper
    attached nothing happens."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = super().compute_loss(model, inputs, *args, **kwargs)
        # (a DeepSpeed engine's train()/eval() switch its module only: read the module's mode)
        if getattr(model, "module", model).training and torch.is_grad_enabled():
            shaping = _shaping_of(getattr(self, "model_wrapped", None))
            if shaping is None:
                from .deepspeed.patch import engine_for_module
                shaping = _shaping_of(engine_for_module(model))
            if shaping is not None:
                loss = (out[0] if isinstance(out, tuple) else out).detach()
                items = kwargs.get("num_items_in_batch", args[1] if len(args) > 1 else None)
                if self._loss_is_share(items):
                    loss = loss * int(getattr(self, "current_gradient_accumulation_steps", None) or 1)
                shaping.observe_loss(loss)
        return out

    def _loss_is_share(self, num_items_in_batch) -> bool:
        """transformers' own test (``Trainer.training_step``) of whether the loss is already
        normalised over the whole step (it divides by the accumulation steps otherwise)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def add_shaping_callback(trainer, engine=None, patch: bool = True) -> ShapingCallback:
    """Install a :class:`ShapingCallback` on ``trainer`` *ahead of* its ``report_to`` loggers
    (``Trainer(callbacks=[...])`` would put it after them, and they would log without the
    figures). Replaces a ShapingCallback already installed. Returns the callback."""
    handler = trainer.callback_handler
    handler.callbacks = [c for c in handler.callbacks if not isinstance(c, ShapingCallback)]
    cb = ShapingCallback(engine=engine, patch=patch)
    handler.callbacks.insert(0, cb)
    return cb


__all__ = ["ObserveLossMixin", "ShapingCallback", "add_shaping_callback"]
