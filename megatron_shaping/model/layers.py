"""LLaMA building blocks on megatron-core tensor-parallel layers.

Activations are batch-first, ``[batch, seq, hidden]``; between layers they are replicated over
the TP group (no sequence parallelism), so pipeline stages pass plain full-hidden tensors.
Every weight is initialised from a generator seeded by its *logical* name (``key``), on the
full tensor, before megatron splits it: the whole model is identical for every TP/PP layout.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (ColumnParallelLinear, VocabParallelEmbedding,
                                           vocab_parallel_cross_entropy)

from . import fp8 as fp8_mod
from .config import LlamaConfig
from .tp_utils import _tp_size, mark_tp_replicated, seeded_normal_init


def parallel_config(cfg: LlamaConfig, tp: int, backend: Optional[str]) -> ModelParallelConfig:
    """CPU initialisation is what makes init TP-invariant (megatron builds the full master
    weight and splits it) and also what lets the layers run without CUDA."""
    common = dict(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                  perform_initialization=True, params_dtype=torch.float32,
                  sequence_parallel=False, gradient_accumulation_fusion=False)
    if backend == "te":
        from megatron.core.transformer import TransformerConfig
        return TransformerConfig(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                                 num_attention_heads=cfg.num_attention_heads, fp8="hybrid", **common)
    return ModelParallelConfig(**common)


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w (Zhang & Sennrich 2019), computed in fp32.
    The weight is replicated over TP (marked ``tensor_model_parallel=False``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = mark_tp_replicated(torch.nn.Parameter(torch.ones(hidden_size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables (Su et al. 2021) built on the activations' device, so the same code runs on
    CPU and GPU (megatron-core's RoPE assumes CUDA). Computed in fp32, cast at the end."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, heads, s, d]; rotate-half convention (as the Hugging Face LLaMA)."""
    d = x.shape[-1] // 2
    rotated = torch.cat((-x[..., d:], x[..., :d]), dim=-1)
    return x * cos + rotated * sin


class Attention(torch.nn.Module):
    """Causal self-attention with optional grouped-query attention (Ainslie et al. 2023).
    Q, K and V are separate column-parallel projections so that each shards by whole heads
    (a fused QKV would need a strided split to keep heads together)."""

    def __init__(self, cfg: LlamaConfig, layer: int, mp_config, seed: int, backend):
        super().__init__()
        tp = mp_config.tensor_model_parallel_size
        self.heads = cfg.num_attention_heads // tp
        self.kv_heads = cfg.num_query_groups // tp
        self.head_dim = cfg.head_dim
        self.theta = cfg.rope_theta
        col, row = fp8_mod.linear_classes(backend)
        h, kv = cfg.hidden_size, cfg.num_query_groups * cfg.head_dim
        out_std = cfg.init_std / math.sqrt(2.0 * cfg.num_layers)   # GPT-2/Megatron scaled init
        key = f"layers.{layer}.attn"

        def colp(n_out, name):
            return col(h, n_out, config=mp_config, init_method=seeded_normal_init(f"{key}.{name}.weight", seed, cfg.init_std),
                       bias=False, gather_output=False, skip_bias_add=False, is_expert=False)

        self.q_proj = colp(h, "q_proj")
        self.k_proj = colp(kv, "k_proj")
        self.v_proj = colp(kv, "v_proj")
        self.o_proj = row(h, h, config=mp_config, init_method=seeded_normal_init(f"{key}.o_proj.weight", seed, out_std),
                          bias=False, input_is_parallel=True, skip_bias_add=False, is_expert=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x)[0].view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x)[0].view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x)[0].view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(s, self.head_dim, self.theta, x.device, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_heads != self.heads:
            # TP shards q heads and kv groups contiguously, so local q head i still maps to
            # local kv group i // (heads / kv_heads).
            rep = self.heads // self.kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self.o_proj(o)[0]


class SwiGLU(torch.nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020); gate/up column-parallel, down row-parallel."""

    def __init__(self, cfg: LlamaConfig, layer: int, mp_config, seed: int, backend):
        super().__init__()
        col, row = fp8_mod.linear_classes(backend)
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        key = f"layers.{layer}.mlp"
        out_std = cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
        self.gate_proj = col(h, f, config=mp_config, init_method=seeded_normal_init(f"{key}.gate_proj.weight", seed, cfg.init_std),
                             bias=False, gather_output=False, skip_bias_add=False, is_expert=False)
        self.up_proj = col(h, f, config=mp_config, init_method=seeded_normal_init(f"{key}.up_proj.weight", seed, cfg.init_std),
                           bias=False, gather_output=False, skip_bias_add=False, is_expert=False)
        self.down_proj = row(f, h, config=mp_config, init_method=seeded_normal_init(f"{key}.down_proj.weight", seed, out_std),
                             bias=False, input_is_parallel=True, skip_bias_add=False, is_expert=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)[0]) * self.up_proj(x)[0])[0]


class TransformerLayer(torch.nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig, layer: int, mp_config, seed: int, backend=None):
        super().__init__()
        self.backend = backend
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, layer, mp_config, seed, backend)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, layer, mp_config, seed, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fp8_mod.fp8_autocast(self.backend):
            x = x + self.attn(self.attn_norm(x))
            return x + self.mlp(self.mlp_norm(x))


class Embedding(torch.nn.Module):
    """Vocab-parallel token embedding. It also computes the tied LM head's logits
    (:meth:`logits`), so a pipeline's TiedLayerSpec can share this one module on the first and
    last stage. The head is kept out of FP8, as FP8 recipes keep the first and last layers."""

    def __init__(self, cfg: LlamaConfig, mp_config, seed: int):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(
            cfg.padded_vocab_size, cfg.hidden_size, config=mp_config,
            init_method=seeded_normal_init("embedding.word_embeddings.weight", seed, cfg.init_std))
        # Weight-less projector: the forward takes the embedding weight as its weight.
        self._tied_head = ColumnParallelLinear(cfg.hidden_size, cfg.padded_vocab_size, config=mp_config,
                                               init_method=None, bias=False, gather_output=False,
                                               skip_weight_param_allocation=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(tokens)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocab-sharded logits ``[b, s, padded_vocab / tp]``."""
        return self._tied_head(hidden, weight=self.word_embeddings.weight)[0]


class OutputLayer(torch.nn.Module):
    """Untied LM head: vocab-sharded logits."""

    def __init__(self, cfg: LlamaConfig, mp_config, seed: int):
        super().__init__()
        self.output = ColumnParallelLinear(cfg.hidden_size, cfg.padded_vocab_size, config=mp_config,
                                           init_method=seeded_normal_init("output.weight", seed, cfg.init_std),
                                           bias=False, gather_output=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(hidden)[0]


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean next-token cross entropy over unmasked tokens, from vocab-sharded logits.
    Computed in fp32 whatever the training precision."""
    per_token = vocab_parallel_cross_entropy(logits.float(), labels)
    if loss_mask is None:
        return per_token.mean()
    loss_mask = loss_mask.to(per_token.dtype)
    return (per_token * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits (for generation and tests)."""
    if _tp_size() == 1:
        return logits
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    return gather_from_tensor_model_parallel_region(logits)
