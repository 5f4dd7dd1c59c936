"""FP8 for the transformer-layer linears: simulated on any device, Transformer Engine on GPU.

Simulation reproduces the numerics of FP8 training recipes (Micikevicius et al. 2022, "FP8
Formats for Deep Learning"; Transformer Engine's HYBRID format) without FP8 GEMMs: a linear's
input and weight are quantised to E4M3 and back in forward, the output gradient to E5M2 and
back in backward, each with a per-tensor scale ``fp8_max / amax`` (current scaling). The GEMMs
then run in the working precision on the quantised values, which is what an FP8 GEMM with
higher-precision accumulation computes. Gradient shaping sees the resulting noisier gradients.

Under tensor parallelism a shard's amax is all-reduced (MAX) over the TP group, so the scale
is that of the whole tensor and TP=1 and TP=2 quantise identically.

With Transformer Engine and CUDA, ``fp8_backend="te"`` (or "auto") uses TE's linears under
``te.fp8_autocast`` instead (see :func:`fp8_autocast`): a different recipe (delayed scaling from
a 16-step amax history, not each tensor's current amax), so "auto" on a GPU machine with TE
does not reproduce the simulation's numbers. This path needs a GPU; the CPU tests check only
the arguments it hands TE.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2


def _amax(x: torch.Tensor, group) -> torch.Tensor:
    amax = x.detach().abs().amax().float()
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=group)
    return amax


def quantize_dequantize(x: torch.Tensor, fp8_dtype: torch.dtype, group=None) -> torch.Tensor:
    """Round ``x`` to ``fp8_dtype`` with a per-tensor amax scale and return it in x's dtype.
    An all-zero tensor stays zero (scale 1). A tiny amax (below fp8_max / fp32 max, ~1e-34)
    gets the scale capped at fp32's largest value, not inf (which made the zeros 0 * inf =
    NaN). A tensor with an inf or NaN is returned as it is: quantising it would saturate an inf
    to fp8_max (hiding the overflow from the checks after backward) or spread NaN over every
    element."""
    fmax = torch.finfo(fp8_dtype).max
    amax = _amax(x, group)
    finite = torch.isfinite(amax)
    scale = (fmax / amax).clamp(max=torch.finfo(torch.float32).max)
    scale = torch.where((amax > 0) & finite, scale, torch.ones_like(amax))
    q = (x.float() * scale).clamp(-fmax, fmax).to(fp8_dtype)
    return torch.where(finite, (q.float() / scale).to(x.dtype), x)


class _CastForward(torch.autograd.Function):
    """E4M3 round trip in forward, straight-through gradient (as FP8 recipes do for weights and
    activations: the gradient w.r.t. the unquantised tensor is the gradient w.r.t. the quantised)."""

    @staticmethod
    def forward(ctx, x, group):
        return quantize_dequantize(x, E4M3, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CastBackward(torch.autograd.Function):
    """Identity in forward; E5M2 round trip of the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return quantize_dequantize(grad, E5M2, ctx.group), None


def cast_forward_e4m3(x: torch.Tensor, group=None) -> torch.Tensor:
    return _CastForward.apply(x, group)


def cast_grad_e5m2(x: torch.Tensor, group=None) -> torch.Tensor:
    return _CastBackward.apply(x, group)


class SimFp8ColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear with simulated FP8: the input is replicated over TP, the weight and
    output are sharded (amax reduced over TP)."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        tp = self.tp_group
        out = super()._forward_impl(cast_forward_e4m3(input), cast_forward_e4m3(weight, tp), *args, **kwargs)
        return cast_grad_e5m2(out, tp)


class SimFp8RowParallelLinear(RowParallelLinear):
    """RowParallelLinear with simulated FP8: input and weight are sharded; the output gradient
    (of the partial sum, before the TP all-reduce) is replicated over TP."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        tp = self.tp_group
        out = super()._forward_impl(cast_forward_e4m3(input, tp), cast_forward_e4m3(weight, tp), *args, **kwargs)
        return cast_grad_e5m2(out)


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a CUDA-less install failing at import
        return False
    return torch.cuda.is_available()


def resolve_backend(fp8: bool, backend: str) -> Optional[str]:
    """None (FP8 off), "sim" or "te". "auto" takes TE when it is importable with CUDA."""
    if not fp8:
        return None
    if backend == "auto":
        return "te" if te_available() else "sim"
    if backend == "te" and not te_available():
        raise RuntimeError("fp8_backend='te' needs transformer_engine and a CUDA device; "
                           "use fp8_backend='sim' to simulate FP8 on CPU")
    return backend


def linear_classes(backend: Optional[str]):
    """(column, row) linear classes for the transformer layers."""
    if backend == "sim":
        return SimFp8ColumnParallelLinear, SimFp8RowParallelLinear
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear
        return TEColumnParallelLinear, TERowParallelLinear
    return ColumnParallelLinear, RowParallelLinear


def amax_group():
    """The group TE reduces amaxes over: megatron-core's amax reduction group (tensor x data
    parallel, one pipeline stage) once model parallelism is initialised, else None (TE's
    default, the whole job: right for a single stage). Every layer exits its own autocast, so
    with the whole job as the group, pipeline stages running different layers (or forward
    against backward under 1F1B) would pair their reductions wrongly or hang; Megatron passes
    this group too."""
    from megatron.core import parallel_state as ps
    return ps.get_amax_reduction_group() if ps.model_parallel_is_initialized() else None


def fp8_autocast(backend: Optional[str]):
    """The context the model's forward runs in: TE's fp8_autocast (delayed scaling, HYBRID
    format: E4M3 forward, E5M2 backward; amaxes reduced over :func:`amax_group`) for the TE
    backend, a no-op otherwise."""
    if backend != "te":
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling, Format
    recipe = DelayedScaling(fp8_format=Format.HYBRID, amax_history_len=16, amax_compute_algo="max")
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=amax_group())
