"""DeepSpeed integration: the only package of megatron-shaping that imports deepspeed."""
from .config import GradientShapingConfig, get_gradient_shaping_config
from .engine import DeepSpeedShaping, attach, initialize
from .patch import is_deepspeed_patched, patch_deepspeed, unpatch_deepspeed

__all__ = ["GradientShapingConfig", "get_gradient_shaping_config", "DeepSpeedShaping", "attach", "initialize",
           "patch_deepspeed", "unpatch_deepspeed", "is_deepspeed_patched"]
