"""GradientShaper end to end on a tiny model: the single-process API users call."""
import math

import pytest
import torch

from megatron_shaping import GradientShaper
from megatron_shaping.shapers.norm_clip import NormClip


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 8)
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)) for _ in range(2))
        self.head = torch.nn.Linear(8, 11, bias=False)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def backward(model, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 11, (4, 6), generator=g)
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(1, 1).flatten())
    (loss * scale).backward()


def norms(model, groups):
    out = {}
    for n, p in model.named_parameters():
        out[groups(n)] = out.get(groups(n), 0.0) + float(p.grad.double().square().sum())
    return {k: math.sqrt(v) for k, v in out.items()}


def block_of(name):
    return ".".join(name.split(".")[:2]) if name.startswith("layers.") else name


@pytest.mark.parametrize("granularity, groups", [("tensor", lambda n: n), ("block", block_of),
                                                 ("global", lambda n: "global")])
def test_norm_clip_at_each_granularity(granularity, groups):
    torch.manual_seed(0)
    model = TinyLM()
    gs = GradientShaper(model.named_parameters(), "norm_clip", {"max_norm": 0.05}, granularity=granularity)
    assert list(gs.session.layout.names) == list(dict.fromkeys(groups(n) for n, _ in model.named_parameters()))
    backward(model, 0)
    before = norms(model, groups)
    rec = gs.apply_()
    after = norms(model, groups)
    for k in before:
        expected = before[k] * min(1.0, 0.05 / (before[k] + 1e-6))
        assert after[k] == pytest.approx(expected, rel=1e-5), k
    assert rec.factor.shape == (len(before),)


def test_training_loop_with_gradient_stabilizer():
    torch.manual_seed(0)
    model = TinyLM()
    gs = GradientShaper(model.named_parameters(), "gradient_stabilizer")
    losses = []
    for step in range(20):
        backward(model, step % 3)
        rec = gs.apply_()
        assert rec is not None
        with torch.no_grad():   # plain SGD by hand: torch.optim's first step imports torch._dynamo (~5 s)
            for p in model.parameters():
                p.add_(p.grad, alpha=-0.5)
            x = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0))
            losses.append(float(torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(1, 1).flatten())))
    assert losses[-1] < losses[0]
    assert gs.session.steps == 20


def test_chain_spec_dict_and_loss_scale():
    torch.manual_seed(0)
    model = TinyLM()
    spec = {"type": "chain", "shapers": [{"type": "agc", "params": {"clipping": 0.05}},
                                         {"type": "norm_clip", "params": {"max_norm": 0.1}}]}
    gs = GradientShaper(model.named_parameters(), spec)
    assert [m.name for m in gs.shaper.shapers] == ["agc", "norm_clip"]
    backward(model, 1, scale=512.0)                           # grads carry a loss scale
    gs.apply_(loss_scale=512.0)
    total = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
    assert total / 512.0 <= 0.1 * (1 + 1e-6)                  # clipped on the true norm, scale kept


def test_spec_errors_are_clear():
    model = TinyLM()
    with pytest.raises(ValueError, match="unknown key"):
        GradientShaper(model.named_parameters(), {"type": "chain", "shapers": [{"type": "agc", "params": {"c": 1}}]})
    with pytest.raises(ValueError, match="max_norm"):
        GradientShaper(model.named_parameters(), "norm_clip", {"max_norm": -1})


def test_overflow_skips_and_state_dict_resumes():
    torch.manual_seed(0)
    model = TinyLM()
    gs = GradientShaper(model.named_parameters(), "zclip", {"warmup_steps": 2, "max_grad_norm": None})
    for step in range(3):
        backward(model, step)
        gs.apply_()
    sd = gs.state_dict()
    backward(model, 5)
    model.head.weight.grad[0, 0] = float("inf")
    assert gs.apply_() is None and gs.session.skipped == 1
    resumed = GradientShaper(model.named_parameters(), "zclip", {"warmup_steps": 2, "max_grad_norm": None})
    resumed.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state[0], gs.state[0]))


def test_shaper_instance_and_frozen_params():
    model = TinyLM()
    model.embed.weight.requires_grad_(False)
    gs = GradientShaper(model.named_parameters(), NormClip(1.0))
    assert "embed.weight" not in gs.session.grouping.group_of
    backward(model, 0)
    assert gs.apply_() is not None


@pytest.mark.parametrize("method, params", [("entrywise_shrink", {"threshold": 1.0}),
                                            ("spamp", {"alpha_min": 0.5}),
                                            ("agc", {"clipping": 1e-3, "unitwise": False})])
def test_one_shaper_instance_in_two_sessions(method, params):
    """init() keeps layout facts (element counts, AGC's unit map) on the instance; a second
    GradientShaper built with the same instance must not change what the first one computes.
    Reference: the same model shaped by a session with a fresh instance."""
    from megatron_shaping.shapers import build_shaper
    ref_model, model = TinyLM(), TinyLM()
    model.load_state_dict(ref_model.state_dict())
    shared = build_shaper(method, params)
    gs = GradientShaper(model.named_parameters(), shared)
    other = torch.nn.Linear(300, 200)          # another layout (60200 elements, 200 rows)
    GradientShaper(other.named_parameters(), shared)
    ref = GradientShaper(ref_model.named_parameters(), build_shaper(method, params))
    shaped = False
    for seed in range(3):       # SPAMP shapes from its second step (its threshold is the previous)
        backward(model, seed)
        backward(ref_model, seed)
        before = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert gs.apply_() is not None and ref.apply_() is not None
        for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
            assert torch.equal(p.grad, q.grad), (seed, n)
        shaped |= any(not torch.equal(before[n], p.grad) for n, p in model.named_parameters())
    assert shaped       # power: the shaping changed the gradient


@pytest.mark.parametrize("method, params", [("norm_clip", {"max_norm": 0.1}), ("agc", {"clipping": 1e-3}),
                                            ("value_clip", {"clip_value": 0.01})])
def test_transposed_parameter(method, params):
    """A parameter stored transposed (its gradient non-contiguous, which view(-1) refuses): shaped
    as the same values stored row-major are, rows being the tensor's rows (AGC's units)."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(4, 6, generator=gen)
    gw = torch.randn(6, 4, generator=gen)
    pt = torch.nn.Parameter(base.t())                 # shape (6, 4), strides (1, 6)
    pc = torch.nn.Parameter(base.t().contiguous())
    assert not pt.is_contiguous()
    pt.grad, pc.grad = gw.t().contiguous().t(), gw.clone()   # same values, column-major vs row-major
    assert not pt.grad.is_contiguous()
    GradientShaper([("w", pt)], method, params).apply_()
    GradientShaper([("w", pc)], method, params).apply_()
    assert torch.equal(pt.grad, pc.grad)
    assert not torch.equal(pc.grad, gw)                      # power: the shaper acted
