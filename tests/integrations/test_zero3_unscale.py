"""ZeRO-3's unscale_and_clip_grads (DeepSpeed 0.19.8) multiplies the whole fp32 partition by
1 / loss_scale even when that is 1 and nothing clips (stages 1/2 return early). A shaped step
skips that multiply by 1 (Zero3Adapter._unscale_guard): the trained parameters must be equal,
bit for bit, to a run that keeps it, and with DeepSpeed clipping on the multiply must still run."""
import pytest
import torch

from megatron_shaping.integrations.deepspeed import adapters

STEPS = 3


def _run(clip: float, keep_multiply: bool, monkeypatch):
    import megatron_shaping
    if keep_multiply:
        monkeypatch.setattr(adapters.Zero3Adapter, "_unscale_guard", adapters._ZeroAdapter._unscale_guard)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    init = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    cfg = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": clip,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
           "zero_optimization": {"stage": 3},
           "gradient_shaping": {"type": "norm_clip", "params": {"max_norm": 0.01}}}
    engine = megatron_shaping.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]
    assert isinstance(engine.gradient_shaping.adapter, adapters.Zero3Adapter)
    calls = []
    orig = engine.optimizer.unscale_and_clip_grads
    engine.optimizer.unscale_and_clip_grads = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(4, 16, generator=gen)
        engine.backward(engine(x).square().mean())
        engine.step()
    del engine.optimizer.unscale_and_clip_grads
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        params = torch.cat([p.detach().flatten().clone() for p in engine.module.parameters()])
    engine.destroy()
    return params, len(calls), init


def test_zero3_shaped_step_skips_the_multiply_by_one(one_rank, monkeypatch):
    skipped, n_skipped, init = _run(0.0, False, monkeypatch)
    with monkeypatch.context() as mp:
        kept, n_kept, _ = _run(0.0, True, mp)
    assert n_skipped == 0 and n_kept >= STEPS       # the control really runs DeepSpeed's multiply
    assert skipped.shape == init.shape and not torch.equal(skipped, init)     # it trained
    assert torch.equal(skipped, kept)


def test_zero3_with_deepspeed_clipping_keeps_the_multiply(one_rank, monkeypatch):
    _, n, _ = _run(0.05, False, monkeypatch)
    assert n >= STEPS
