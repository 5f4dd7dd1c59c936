"""LLaMA on megatron-core tensor-parallel layers, plain or as a DeepSpeed pipeline.

``megatron_shaping.model.pipeline`` and ``.parallel`` import deepspeed; the rest needs only
megatron-core and torch.
"""
from .config import LlamaConfig, available_presets, load_preset
from .llama import BLOCK_PATTERN, LlamaModel, layer_defs
from .tp_utils import full_shape, gather_full_tensor, is_tp_duplicate, is_tp_sharded

__all__ = ["LlamaConfig", "LlamaModel", "BLOCK_PATTERN", "available_presets", "load_preset", "layer_defs",
           "full_shape", "gather_full_tensor", "is_tp_duplicate", "is_tp_sharded"]
