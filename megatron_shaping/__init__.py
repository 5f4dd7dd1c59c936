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
    return _init(*args, **kwargs)


def attach(engine, *args, **kwargs):
    """Attach gradient shaping to an engine built by ``deepspeed.initialize``."""
    from .integrations.deepspeed import attach as _attach
    return _attach(engine, *args, **kwargs)


__all__ = ["GradientShaper", "ShapingSession", "build_shaper", "chain", "initialize", "attach", "shaper_from_spec"]
