import pytest
import torch

from megatron_shaping.model import LlamaConfig, LlamaModel
from megatron_shaping.model.fp8 import E4M3, E5M2, cast_grad_e5m2, quantize_dequantize, resolve_backend


def test_quantize_dequantize_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * 3.0
    for dtype, rel in ((E4M3, 2 ** -3), (E5M2, 2 ** -2)):
        y = quantize_dequantize(x, dtype)
        assert y.dtype == x.dtype and not torch.equal(x, y)
        # amax scaling maps the largest value exactly onto the format's max
        assert torch.isclose(y.abs().max(), x.abs().max())
        # relative rounding error bounded by half an ulp of the 3-bit (2-bit) mantissa
        big = x.abs() > x.abs().max() * 1e-2
        assert ((y[big] - x[big]).abs() / x[big].abs()).max() <= rel / 2 + 1e-6
        assert torch.equal(quantize_dequantize(y, dtype), y)     # idempotent
    assert torch.equal(quantize_dequantize(torch.zeros(4), E4M3), torch.zeros(4))
    assert quantize_dequantize(x.bfloat16(), E4M3).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_tiny_and_non_finite_tensors(dtype):
    # amax below fp8_max / fp32_max: the scale fmax / amax overflowed to inf and the zeros
    # came back as 0 * inf = NaN; now capped: zeros stay zero, the rest finite and signed
    x = torch.tensor([1e-37, 0.0, -5e-38, 0.0])
    y = quantize_dequantize(x, dtype)
    assert torch.isfinite(y).all() and y[1] == 0 and y[3] == 0 and y[0] > 0 and y[2] < 0
    # one inf (or NaN): NaN everywhere before; now the tensor passes through as it is, so the
    # overflow stays visible as an inf (not saturated to fp8_max)
    x = torch.tensor([1.0, float("inf"), -2.0])
    assert torch.equal(quantize_dequantize(x, dtype), x)
    x = torch.tensor([1.0, float("nan"), -2.0])
    y = quantize_dequantize(x, dtype)
    assert y.isnan().tolist() == [False, True, False] and y[0] == 1.0 and y[2] == -2.0


def test_grad_cast_only_in_backward():
    x = torch.randn(64, requires_grad=True)
    y = cast_grad_e5m2(x)
    assert torch.equal(y, x)
    g = torch.randn(64) * 1e-3
    y.backward(g)
    assert torch.equal(x.grad, quantize_dequantize(g, E5M2)) and not torch.equal(x.grad, g)


def test_backend_resolution():
    assert resolve_backend(False, "auto") is None
    assert resolve_backend(True, "sim") == "sim"
    if not torch.cuda.is_available():
        assert resolve_backend(True, "auto") == "sim"
        with pytest.raises(RuntimeError, match="transformer_engine"):
            resolve_backend(True, "te")


def test_te_autocast_reduces_amax_over_megatrons_group_not_the_job(single_rank, monkeypatch):
    # TE needs a GPU: a stand-in module records what fp8_autocast is handed. Without fp8_group
    # TE reduces over the whole job on every layer's exit: pipeline stages would pair their
    # reductions wrongly (or hang).
    import sys
    import types
    from megatron.core import parallel_state as ps
    from megatron_shaping.model import fp8
    seen = {}
    te = types.ModuleType("transformer_engine")
    te.pytorch = types.ModuleType("transformer_engine.pytorch")
    te.pytorch.fp8_autocast = lambda **kw: seen.update(kw) or "ctx"
    te.common = types.ModuleType("transformer_engine.common")
    te.common.recipe = types.ModuleType("transformer_engine.common.recipe")
    te.common.recipe.DelayedScaling = lambda **kw: ("recipe", kw["fp8_format"])
    te.common.recipe.Format = types.SimpleNamespace(HYBRID="hybrid")
    for name, mod in (("transformer_engine", te), ("transformer_engine.pytorch", te.pytorch),
                      ("transformer_engine.common", te.common), ("transformer_engine.common.recipe", te.common.recipe)):
        monkeypatch.setitem(sys.modules, name, mod)
    assert fp8.fp8_autocast("te") == "ctx"
    assert seen["fp8_group"] is ps.get_amax_reduction_group() and seen["fp8_group"] is not None
    assert seen["fp8_recipe"] == ("recipe", "hybrid") and seen["enabled"] is True


def _train(fp8: bool, steps=25):
    cfg = LlamaConfig(hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=128,
                      vocab_size=200, seq_length=32, tie_embeddings=True, fp8=fp8, fp8_backend="sim")
    model = LlamaModel(cfg, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    text = torch.randint(0, 50, (8, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model(text[:, :-1], text[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_fp8_sim_trains_and_differs_slightly(single_rank):
    ref, fp8 = _train(False), _train(True)
    assert fp8[-1] < fp8[0] - 1.0, fp8           # it trains
    assert fp8 != ref                            # FP8 rounding changes the numbers
    assert abs(fp8[0] - ref[0]) < 0.02           # but only slightly at the same weights
    assert abs(fp8[-1] - ref[-1]) < 0.1 * ref[-1]
