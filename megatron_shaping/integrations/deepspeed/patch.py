"""Shaping for code that calls ``deepspeed.initialize`` itself: ``patch_deepspeed()``.

The Hugging Face Trainer (through Accelerate's ``Accelerator._prepare_deepspeed``, which reads
``deepspeed.initialize`` at call time), Megatron-DeepSpeed (``setup_model_and_optimizer`` in
``megatron/training.py``) and most training scripts build the engine themselves. After
:func:`patch_deepspeed`, every ``deepspeed.initialize`` call reads the DeepSpeed config it was
given, in whichever form DeepSpeed accepts it (``config=`` or ``config_params=`` as a dict, a
JSON/HJSON path or base64, or ``args.deepspeed_config`` / ``args.deepscale_config``), validates
the ``gradient_shaping`` section *before* DeepSpeed builds the engine, and attaches the shaper to
the new engine before ``deepspeed.initialize`` returns, so before the caller can load a
checkpoint (the Trainer loads one right after building the engine when resuming).

* Names bound before patching (``from deepspeed import initialize`` in a module imported
  earlier) are rebound too: module globals that hold the original function are switched to
  the patched one, and switched back by :func:`unpatch_deepspeed`. References kept elsewhere
  (a local variable, a dict, a default argument) are not found; patch before such code runs.
* :func:`megatron_shaping.initialize` calls the original ``deepspeed.initialize``
  (:func:`original_initialize`), so it attaches once, patched or not; an engine that already
  has a shaper is left alone.
* Idempotent; a config without the section (or with ``"enabled": false``) builds a plain
  engine, exactly as unpatched DeepSpeed does.
"""
from __future__ import annotations

import functools
import logging
import sys
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

from .config import GRADIENT_SHAPING, get_gradient_shaping_config

logger = logging.getLogger("megatron_shaping")

_lock = threading.RLock()
_original: Optional[Callable] = None       # deepspeed.initialize as found by the first patch
_wrapper: Optional[Callable] = None        # the patched function (created once)
_active = False
_rebound: List[Tuple[Any, str]] = []       # (module, global name) switched to the wrapper
#: module -> weakref(engine), for front ends that only see the module (HF callbacks).
_engines: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


#: ``deepspeed.initialize``'s parameters in positional order (DeepSpeed 0.19.8; a test checks it).
INITIALIZE_PARAMS = ("args", "model", "optimizer", "model_parameters", "training_data", "lr_scheduler",
                     "distributed_port", "mpu", "dist_init_required", "collate_fn", "config", "mesh_param",
                     "config_params")


def original_initialize() -> Callable:
    """``deepspeed.initialize`` as DeepSpeed defines it, patched or not."""
    import deepspeed
    return _original if _original is not None else deepspeed.initialize


def is_deepspeed_patched() -> bool:
    """True between :func:`patch_deepspeed` and :func:`unpatch_deepspeed`."""
    return _active


def config_of_call(args: tuple, kwargs: dict) -> Optional[Dict[str, Any]]:
    """The DeepSpeed config dict a ``deepspeed.initialize(*args, **kwargs)`` call will use,
    resolved as DeepSpeed 0.19.8 does (``config``, then ``config_params``, then
    ``args.deepspeed_config`` / ``args.deepscale_config``; a string is a path or base64);
    None when the call names no config (DeepSpeed then stops with its own message)."""
    if len(args) > len(INITIALIZE_PARAMS):
        return None                            # DeepSpeed will report the bad call itself
    a = dict(zip(INITIALIZE_PARAMS, args))
    a.update(kwargs)
    config = a.get("config")
    if config is None:
        config = a.get("config_params")
    ds_args = a.get("args")
    if config is None and ds_args is not None:
        config = getattr(ds_args, "deepspeed_config", None) or getattr(ds_args, "deepscale_config", None)
    if config is None or isinstance(config, dict):
        return config
    if isinstance(config, str):
        from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config
        return load_ds_config(config)          # DeepSpeed's own reader: same file, same error
    return None


def _engine_of(out) -> Any:
    return out[0] if isinstance(out, tuple) else out


def register_engine(engine) -> None:
    """Remember ``engine`` under its module, for :func:`engine_for_module`."""
    module = getattr(engine, "module", None)
    if module is not None:
        try:
            _engines[module] = weakref.ref(engine)
        except TypeError:
            pass


def engine_for_module(module) -> Any:
    """The engine built around ``module`` by a patched ``deepspeed.initialize`` (None if none,
    or if it is gone)."""
    ref = _engines.get(module) if module is not None else None
    return ref() if ref is not None else None


def shaped_initialize(original: Callable, args: tuple, kwargs: dict):
    """``original(*args, **kwargs)`` (an unpatched ``deepspeed.initialize``) with the shaper of
    the call's ``gradient_shaping`` section validated before the engine is built and attached
    before it is returned. Used by :func:`megatron_shaping.initialize` and the patch alike."""
    config = config_of_call(args, kwargs)
    section = None
    if isinstance(config, dict) and GRADIENT_SHAPING in config:
        # Validate before DeepSpeed spends time building the engine.
        section = get_gradient_shaping_config(config)
    out = original(*args, **kwargs)
    engine = _engine_of(out)
    if section is not None and getattr(engine, "gradient_shaping", None) is None:
        from .adapters import has_optimizer
        if has_optimizer(engine):
            from .engine import attach
            gs = attach(engine, {GRADIENT_SHAPING: config[GRADIENT_SHAPING]})
            _warn_implicit_clipping(config, gs)
        else:
            # the same config also builds engines without an optimizer (evaluation, reference
            # and teacher models): nothing to shape there, and no reason to fail
            logger.info("gradient_shaping: engine built without an optimizer (evaluation or a reference "
                        "model): not attached")
    register_engine(engine)
    return out


def _warn_implicit_clipping(config: dict, gs) -> None:
    """DeepSpeed clips at its default (1.0 in 0.19.8) when the config has no
    ``gradient_clipping``: the shaped gradient is then clipped too, which a user who added a
    shaper in place of clipping rarely means. Said once per engine, on rank 0."""
    if gs is None or "gradient_clipping" in config or not gs.clip > 0.0:
        return
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.warning("gradient_shaping: the DeepSpeed config sets no gradient_clipping, so DeepSpeed clips the "
                       "shaped gradient at its default %g after shaping; set \"gradient_clipping\": 0.0 for the "
                       "method alone (or the clipping you want)", gs.clip)


def _make_wrapper(original: Callable) -> Callable:
    @functools.wraps(original)
    def initialize(*args, **kwargs):
        if not _active:
            return original(*args, **kwargs)
        return shaped_initialize(original, args, kwargs)

    initialize.__megatron_shaping_patch__ = True
    return initialize


def _module_globals():
    for name, mod in list(sys.modules.items()):
        if mod is None or name == "deepspeed" or name.startswith("megatron_shaping"):
            continue
        try:
            d = vars(mod)
        except TypeError:
            continue
        yield mod, d


def patch_deepspeed(rebind_imported: bool = True) -> None:
    """Make ``deepspeed.initialize`` attach the shaper configured in the ``gradient_shaping``
    section of the DeepSpeed config it receives. ``rebind_imported``: also switch module
    globals that already hold the original function (``from deepspeed import initialize``).
    Calling it again changes nothing."""
    global _original, _wrapper, _active
    import deepspeed
    with _lock:
        if _active:
            return
        current = deepspeed.initialize
        if _original is None:
            _original = current
            _wrapper = _make_wrapper(current)
        elif current is not _original and current is not _wrapper:
            # Someone replaced deepspeed.initialize after our last unpatch: wrap theirs.
            _original = current
            _wrapper = _make_wrapper(current)
        deepspeed.initialize = _wrapper
        _active = True
        _rebound.clear()
        if rebind_imported:
            for mod, d in _module_globals():
                for key, value in list(d.items()):
                    if value is _original:
                        try:
                            setattr(mod, key, _wrapper)
                        except (AttributeError, TypeError):
                            continue
                        _rebound.append((mod, key))
        logger.info("megatron_shaping: deepspeed.initialize patched (gradient_shaping section honoured%s)",
                    f"; {len(_rebound)} earlier import(s) rebound" if _rebound else "")


def unpatch_deepspeed() -> None:
    """Undo :func:`patch_deepspeed`: ``deepspeed.initialize`` and the rebound names are the
    original function again. Engines already built keep their shaper. Safe to call unpatched."""
    global _active
    import deepspeed
    with _lock:
        if not _active:
            return
        _active = False                         # a wrapper still referenced somewhere passes through
        if deepspeed.initialize is _wrapper:
            deepspeed.initialize = _original
        else:
            logger.warning("megatron_shaping: deepspeed.initialize was replaced by someone else after "
                           "patch_deepspeed(); left as it is (our wrapper inside it now passes through)")
        for mod, key in _rebound:
            if getattr(mod, key, None) is _wrapper:
                setattr(mod, key, _original)
        _rebound.clear()
