"""The LLaMA as a ``deepspeed.pipe.PipelineModule``.

Same layer list as :class:`~.llama.LlamaModel` (hence the same parameter names). With tied
embeddings the embedding is a ``TiedLayerSpec`` on the first stage and again, as the LM head,
on the last; DeepSpeed all-reduces the tied weight's gradient between those stages and marks the
copy on the non-owner stage with ``ds_pipe_replicated=True``.

Batches for ``engine.train_batch``/``eval_batch`` are ``(tokens, (labels, loss_mask))``: the
first stage reads the tokens, the last stage the labels and mask.
"""
from __future__ import annotations

from typing import Tuple

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from .config import LlamaConfig
from .layers import lm_loss
from .llama import TIED_WEIGHT_ATTR, layer_defs


def pipeline_loss(logits: torch.Tensor, labels_and_mask: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    labels, loss_mask = labels_and_mask
    return lm_loss(logits, labels, loss_mask)


def build_pipeline_model(cfg: LlamaConfig, topology, seed: int = 1234,
                         activation_checkpoint_interval: int = 0) -> PipelineModule:
    """Stages are balanced by transformer-layer count (``type:TransformerLayer``); partitioning
    by parameter count would put the large embedding stage out of balance."""
    tp = topology.get_dim("model")
    specs = []
    for d in layer_defs(cfg, tp, seed):
        if d.tied_key is not None:
            specs.append(TiedLayerSpec(d.tied_key, d.cls, *d.args, forward_fn=d.forward_fn,
                                       tied_weight_attr=[TIED_WEIGHT_ATTR]))
        else:
            specs.append(LayerSpec(d.cls, *d.args))
    return PipelineModule(layers=specs, topology=topology, loss_fn=pipeline_loss,
                          partition_method="type:TransformerLayer",
                          activation_checkpoint_interval=activation_checkpoint_interval)
