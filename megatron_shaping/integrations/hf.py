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

Imports ``transformers`` (not deepspeed) at module import; nothing else in the package does.
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

    Every training micro-batch's loss (as ``compute_loss`` returns it, i.e. as backpropagated)
    goes to ``engine.gradient_shaping.observe_loss`` (no host sync; the rule takes the step's
    mean over micro-batches and data-parallel ranks). With gradient accumulation and the
    Trainer's token-count normalisation each micro-batch's loss is its share of the step's, so
    the rule sees the step's loss divided by the accumulation steps: a constant factor, which
    its z-score does not see. Losses computed for evaluation (model in
    eval mode or no grad) are not fed; without a shaper attached nothing happens."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = super().compute_loss(model, inputs, *args, **kwargs)
        # (a DeepSpeed engine's train()/eval() switch its module only: read the module's mode)
        if getattr(model, "module", model).training and torch.is_grad_enabled():
            shaping = _shaping_of(getattr(self, "model_wrapped", None))
            if shaping is None:
                from .deepspeed.patch import engine_for_module
                shaping = _shaping_of(engine_for_module(model))
            if shaping is not None:
                loss = out[0] if isinstance(out, tuple) else out
                shaping.observe_loss(loss.detach())
        return out


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
