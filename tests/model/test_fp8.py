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
