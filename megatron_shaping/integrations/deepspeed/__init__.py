"""DeepSpeed integration: the only package of megatron-shaping that imports deepspeed."""
from .config import GradientShapingConfig, get_gradient_shaping_config
from .engine import DeepSpeedShaping, attach, initialize

__all__ = ["GradientShapingConfig", "get_gradient_shaping_config", "DeepSpeedShaping", "attach", "initialize"]
