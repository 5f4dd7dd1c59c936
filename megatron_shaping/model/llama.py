"""The LLaMA as an ordered list of layers: one definition for both the plain module and the
DeepSpeed pipeline (:mod:`.pipeline`).

Parameter names are the same in both forms, and for every TP/PP layout: a layer is registered
under its index in the list, as ``deepspeed.pipe.PipelineModule`` does (``"3.attn.q_proj.weight"``),
and tied embeddings under ``tied_modules.embed`` (``"tied_modules.embed.word_embeddings.weight"``).
So shaper state keyed by parameter name carries over between PP=1 and PP>1, and a block of the
model is everything under one leading index (:data:`BLOCK_PATTERN`).

Layer indices: 0 embedding, 1..L transformer layers, L+1 final norm, L+2 LM head (the tied
head has no parameters of its own).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional

import torch

from . import fp8 as fp8_mod
from .config import LlamaConfig
from .layers import Embedding, OutputLayer, RMSNorm, TransformerLayer, lm_loss, parallel_config
from .tp_utils import _tp_size

#: granularity="block" pattern for these names: one group per layer index (and the tied
#: embedding on its own).
BLOCK_PATTERN = r"^(\d+|tied_modules\.\w+)\."
TIED_KEY = "embed"
TIED_WEIGHT_ATTR = "word_embeddings.weight"


def tied_logits(embedding: Embedding, hidden: torch.Tensor) -> torch.Tensor:
    return embedding.logits(hidden)


@dataclass
class LayerDef:
    cls: type
    args: tuple
    tied_key: Optional[str] = None
    forward_fn: Optional[Callable] = None

    def build(self) -> torch.nn.Module:
        return self.cls(*self.args)


def layer_defs(cfg: LlamaConfig, tp: Optional[int] = None, seed: int = 1234) -> List[LayerDef]:
    tp = _tp_size() if tp is None else tp
    cfg.check_tensor_parallel(tp)
    backend = fp8_mod.resolve_backend(cfg.fp8, cfg.fp8_backend)
    mp = parallel_config(cfg, tp, backend)
    tied = TIED_KEY if cfg.tie_embeddings else None
    defs = [LayerDef(Embedding, (cfg, mp, seed), tied_key=tied)]
    defs += [LayerDef(TransformerLayer, (cfg, i, mp, seed, backend)) for i in range(cfg.num_layers)]
    defs.append(LayerDef(RMSNorm, (cfg.hidden_size, cfg.norm_eps)))
    if cfg.tie_embeddings:
        defs.append(LayerDef(Embedding, (cfg, mp, seed), tied_key=TIED_KEY, forward_fn=tied_logits))
    else:
        defs.append(LayerDef(OutputLayer, (cfg, mp, seed)))
    return defs


class LlamaModel(torch.nn.Module):
    """The whole model on one pipeline stage (TP-sharded by megatron-core when TP > 1).

    ``forward(tokens)`` returns vocab-sharded logits; ``forward(tokens, labels, loss_mask)``
    returns the mean loss over unmasked tokens (the form ``engine(batch)`` uses).
    """

    def __init__(self, cfg: LlamaConfig, tp: Optional[int] = None, seed: int = 1234):
        super().__init__()
        self.config = cfg
        self.tied_modules = torch.nn.ModuleDict()
        self._funcs: List[Callable] = []
        for idx, d in enumerate(layer_defs(cfg, tp, seed)):
            if d.tied_key is not None:
                if d.tied_key not in self.tied_modules:
                    self.tied_modules[d.tied_key] = d.build()
                mod = self.tied_modules[d.tied_key]
                self._funcs.append(partial(d.forward_fn, mod) if d.forward_fn else mod)
            else:
                mod = d.build()
                self.add_module(str(idx), mod)
                self._funcs.append(mod)

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = tokens
        for f in self._funcs:
            x = f(x)
        if labels is None:
            return x
        return lm_loss(x, labels, loss_mask)
