"""megatron_shaping.profiling: the hook's named regions reach an installed recorder, nested and
in order (one statistics pass and one application for norm_clip, inside the whole hook under
DeepSpeed), and nothing reaches a recorder once it is uninstalled."""
from __future__ import annotations

import contextlib

import pytest
import torch

from megatron_shaping import profiling
from megatron_shaping.profiling import APPLY, HOOK, STATS
from megatron_shaping.torch_api import GradientShaper

MAX_NORM = 1e-3


class Log:
    """A recorder that writes down entries and exits."""

    def __init__(self):
        self.events = []

    @contextlib.contextmanager
    def region(self, name):
        self.events.append(("enter", name))
        try:
            yield
        finally:
            self.events.append(("exit", name))


def two_linears():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))


def with_grads(model):
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def grad_norm(model):
    return float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()])))


def test_a_plain_pytorch_step_reports_one_stats_pass_then_one_apply():
    model = with_grads(two_linears())
    shaper = GradientShaper(model.named_parameters(), "norm_clip", {"max_norm": MAX_NORM})
    log = Log()
    with profiling.recording(log):
        shaper.apply_()
    assert log.events == [("enter", STATS), ("exit", STATS), ("enter", APPLY), ("exit", APPLY)]
    assert grad_norm(model) == pytest.approx(MAX_NORM, rel=1e-6)     # the step did shape


def test_nothing_is_recorded_after_the_recorder_is_uninstalled():
    model = with_grads(two_linears())
    shaper = GradientShaper(model.named_parameters(), "norm_clip", {"max_norm": MAX_NORM})
    outer, inner = Log(), Log()
    with profiling.recording(outer):
        with profiling.recording(inner):
            shaper.apply_()
        shaper.apply_()                      # the outer recorder is back
    with_grads(model)
    shaper.apply_()                          # none installed
    assert len(inner.events) == 4 and len(outer.events) == 4
    assert profiling.install(None) is None
    assert grad_norm(model) == pytest.approx(MAX_NORM, rel=1e-6)


def test_the_deepspeed_hook_wraps_its_stats_pass_and_apply(one_rank):
    import megatron_shaping
    model = two_linears()
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "zero_optimization": {"stage": 0},
           "gradient_shaping": {"type": "norm_clip", "params": {"max_norm": MAX_NORM}}}
    engine = megatron_shaping.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]
    engine.backward(engine(torch.randn(2, 4)).square().sum())
    log = Log()
    with profiling.recording(log):
        engine.step()
    assert log.events == [("enter", HOOK), ("enter", STATS), ("exit", STATS), ("enter", APPLY), ("exit", APPLY),
                          ("exit", HOOK)]
    assert engine.gradient_shaping.session.steps == 1
