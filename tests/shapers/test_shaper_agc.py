import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_shaping.shapers.agc import AGC
from shaper_testlib import Driver, shape_once


def reference_agc(w: torch.Tensor, g: torch.Tensor, clipping: float, eps: float, unitwise: bool = True):
    """Brock et al. 2021 eq. 3, written directly: per output row (dim 0) of a matrix, the whole
    tensor for a vector: G <- clipping * max(||W||, eps) / ||G|| * G if ||G|| / max(||W||, eps) > clipping."""
    w, g = w.double(), g.double()
    rows_w = w.reshape(w.shape[0], -1) if (w.dim() >= 2 and unitwise) else w.reshape(1, -1)
    rows_g = g.reshape(rows_w.shape)
    out = rows_g.clone()
    for i in range(rows_w.shape[0]):
        wn = max(float(rows_w[i].norm()), eps)
        gn = float(rows_g[i].norm())
        if gn / wn > clipping:
            out[i] = rows_g[i] * (clipping * wn / gn)
    return out.reshape(g.shape)


def test_hand_values_unitwise():
    # weight rows: ||(3, 4)|| = 5, ||(0, 0)|| = 0 -> eps = 1e-3
    # grad row 0: ||(0.06, 0.08)|| = 0.1 > 0.01 * 5 = 0.05 -> x 0.5 -> (0.03, 0.04)
    # grad row 1: ||(3e-5, 4e-5)|| = 5e-5 > 0.01 * 1e-3 = 1e-5 -> x 0.2 -> (6e-6, 8e-6)
    # bias (one unit): ||w|| = 1, ||g|| = 0.02 > 0.01 -> x 0.5; small bias grad 0.005 < 0.01: unchanged
    values = {"w": torch.tensor([[3.0, 4.0], [0.0, 0.0]]), "b": torch.tensor([1.0, 0.0]),
              "c": torch.tensor([1.0, 0.0])}
    grads = {"w": torch.tensor([[0.06, 0.08], [3e-5, 4e-5]]), "b": torch.tensor([0.02, 0.0]),
             "c": torch.tensor([0.005, 0.0])}
    out = shape_once(AGC(), grads, values)
    assert torch.allclose(out["w"], torch.tensor([[0.03, 0.04], [6e-6, 8e-6]]), rtol=1e-6, atol=0)
    assert torch.allclose(out["b"], torch.tensor([0.01, 0.0]), rtol=1e-6)
    assert torch.equal(out["c"], grads["c"])


def test_hand_values_per_tensor():
    # unitwise=False: ||W|| = 5 (row 1 is zero), ||G||^2 = 0.0036 + 0.0064 + 9e-10 + 1.6e-9 = 0.0100000025
    # -> factor 0.05 / sqrt(0.0100000025) on the whole tensor
    values = {"w": torch.tensor([[3.0, 4.0], [0.0, 0.0]])}
    grads = {"w": torch.tensor([[0.06, 0.08], [3e-5, 4e-5]])}
    out = shape_once(AGC(unitwise=False), grads, values)
    assert torch.allclose(out["w"], grads["w"] * (0.05 / math.sqrt(0.0100000025)), rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 5), cols=st.integers(1, 6),
       clipping=st.sampled_from([1e-3, 0.01, 0.1, 1.0]), gscale=st.sampled_from([1e-4, 1e-2, 1.0, 1e3]),
       unitwise=st.booleans())
def test_matches_reference(seed, rows, cols, clipping, gscale, unitwise):
    gen = torch.Generator().manual_seed(seed)
    values = {"w": torch.randn(rows, cols, generator=gen), "b": torch.randn(rows, generator=gen) * 0.01,
              "z": torch.zeros(rows, cols)}
    grads = {k: torch.randn(v.shape, generator=gen) * gscale for k, v in values.items()}
    out = shape_once(AGC(clipping, 1e-3, unitwise), grads, values)
    for k in values:
        ref = reference_agc(values[k], grads[k], clipping, 1e-3, unitwise)
        assert torch.allclose(out[k].double(), ref, rtol=1e-5, atol=1e-12), k


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), clipping=st.sampled_from([1e-3, 0.01, 0.1]))
def test_keeps_row_directions(seed, clipping):
    gen = torch.Generator().manual_seed(seed)
    w, g = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    out = shape_once(AGC(clipping), {"w": g}, {"w": w}, dtype=torch.float64)["w"]
    cos = torch.nn.functional.cosine_similarity(out.double(), g.double(), dim=1)
    assert bool((cos > 1 - 1e-12).all())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), unitwise=st.booleans())
def test_infinite_clipping_changes_nothing(seed, unitwise):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(3, 5, generator=gen) * 1e6
    assert torch.equal(shape_once(AGC(math.inf, unitwise=unitwise), {"w": g}, {"w": torch.zeros(3, 5)})["w"], g)


def test_block_granularity_unitwise_false_sums_the_block():
    # two tensors in one block: ||W|| = sqrt(3^2 + 4^2 + 12^2) = 13,
    # ||G|| = sqrt(1^2 + 1^2 + 1^2) = sqrt(3) > 0.1 * 13 = 1.3 -> factor 1.3 / sqrt(3)
    values = {"layers.0.a": torch.tensor([[3.0, 4.0]]), "layers.0.b": torch.tensor([12.0])}
    grads = {"layers.0.a": torch.tensor([[1.0, 1.0]]), "layers.0.b": torch.tensor([1.0])}
    d = Driver(AGC(0.1, unitwise=False), {k: v.shape for k, v in values.items()}, values, granularity="block")
    _, out = d.step(grads)
    f = 1.3 / math.sqrt(3)
    assert torch.allclose(out["layers.0.a"], torch.tensor([[f, f]]), rtol=1e-6)
    assert torch.allclose(out["layers.0.b"], torch.tensor([f]), rtol=1e-6)


@pytest.mark.parametrize("kw, name", [({"clipping": 0}, "clipping"), ({"eps": 0}, "eps"),
                                      ({"eps": math.inf}, "eps"), ({"unitwise": 1}, "unitwise")])
def test_rejects_bad_hparams(kw, name):
    with pytest.raises(ValueError, match=name):
        AGC(**kw)
