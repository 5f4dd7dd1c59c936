"""megatron-shaping: adaptive gradient shaping for DeepSpeed / Megatron pretraining.

``import megatron_shaping`` does not import deepspeed; ``initialize`` and ``attach`` load the
DeepSpeed integration on first use.
"""
from .core import ShapingSession, shaper_from_spec
from .shapers import build_shaper, chain
from .torch_api import GradientShaper

__version__ = "0.1.0"


def initialize(*args, **kwargs):
    """Drop-in for ``deepspeed.initialize`` that attaches the shaper configured in the
    ``"gradient_shaping"`` section of the DeepSpeed config."""
    from .integrations.deepspeed import initialize as _init
    from .integrations.deepspeed.patch import register_engine
    out = _init(*args, **kwargs)
    register_engine(out[0])
    return out


def attach(engine, *args, **kwargs):
    """Attach gradient shaping to an engine built by ``deepspeed.initialize``."""
    from .integrations.deepspeed import attach as _attach
    return _attach(engine, *args, **kwargs)


def patch_deepspeed(rebind_imported: bool = True) -> None:
    """Make every ``deepspeed.initialize`` call attach the shaper configured in the
    ``"gradient_shaping"`` section of the config it receives (for code that builds the engine
    itself: HF Trainer / Accelerate, Megatron-DeepSpeed). Idempotent; see
    :mod:`megatron_shaping.integrations.deepspeed.patch`."""
    from .integrations.deepspeed.patch import patch_deepspeed as _patch
    _patch(rebind_imported=rebind_imported)


def unpatch_deepspeed() -> None:
    """Undo :func:`patch_deepspeed` (engines already built keep their shaper)."""
    from .integrations.deepspeed.patch import unpatch_deepspeed as _unpatch
    _unpatch()


__all__ = ["GradientShaper", "ShapingSession", "build_shaper", "chain", "initialize", "attach", "shaper_from_spec",
           "patch_deepspeed", "unpatch_deepspeed"]
