"""A pure-scale step on ZeRO-1/2/3 leaves its skip decision to DeepSpeed's own check of the global
norm it is handed (``ShapingSession.step(defer=True)``, engine ``_defers``): a non-finite step is
then skipped by DeepSpeed's overflow path with parameters, optimizer state and shaper state
untouched, engine callbacks run after the optimizer step with the resolved record (None for the
skipped step), and with a monitor configured (a config question: the same answer on every rank)
nothing is deferred. The multi-rank overflow cells of the equivalence suite cover the sharded case."""
import pytest
import torch

STEPS = 3
BAD = 1          # the step with a non-finite gradient entry


def _run(stage: int, shaping: dict):
    import deepspeed
    import megatron_shaping
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    cfg = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
           "zero_optimization": {"stage": stage}, "gradient_shaping": shaping}
    engine = megatron_shaping.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]
    sh = engine.gradient_shaping
    # what Accelerate (and so the HF Trainer, which then leaves its own LR scheduler alone)
    # reads after each step: its wrapper checks for the flag once, when it wraps the optimizer
    from accelerate.utils.deepspeed import DeepSpeedOptimizerWrapper
    # (built without its __init__, which needs an Accelerator: the two fields it sets there)
    accelerate_view = object.__new__(DeepSpeedOptimizerWrapper)
    accelerate_view.optimizer = engine.optimizer
    accelerate_view.__has_overflow__ = hasattr(engine.optimizer, "overflow")
    skipped_seen = []
    seen = []
    sh.callbacks.append(lambda s, rec: seen.append((rec is None, engine.global_steps, s.session.pending_veto is None)))

    def snapshot():
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            params = torch.cat([p.detach().flatten().clone() for p in engine.module.parameters()])
        return params, [[t.clone() for t in st] for st in sh.session.state]

    gen = torch.Generator().manual_seed(1)
    before = None
    for step in range(STEPS):
        loss = engine(torch.randn(4, 8, generator=gen)).square().mean()
        hook = None
        if step == BAD:
            before = snapshot()
            # one non-finite entry in one tensor: the other groups' statistics stay finite, so
            # only the session's veto (not the shaper's own per-group mask) keeps their state
            bias = engine.module[2].bias
            hook = bias.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("inf")))
        engine.backward(loss)
        if hook is not None:
            hook.remove()
        engine.step()
        skipped_seen.append(accelerate_view.step_was_skipped)
        if step == BAD:
            after = snapshot()
            skipped_norm = engine.get_global_grad_norm()
    res = dict(seen=seen, deferred=sh.deferred_steps, skipped_steps=engine.skipped_steps, before=before, after=after,
               session_skipped=sh.session.skipped, steps=sh.session.steps, norm=skipped_norm,
               skipped_seen=skipped_seen)
    engine.destroy()
    return res


@pytest.mark.parametrize("stage", [1, 3])
def test_deferred_skip_through_deepspeeds_overflow_path(one_rank, stage):
    r = _run(stage, {"type": "gradient_stabilizer"})
    assert r["deferred"] == STEPS
    assert r["skipped_steps"] == 1 and r["session_skipped"] == 1 and r["steps"] == STEPS - 1
    (p0, s0), (p1, s1) = r["before"], r["after"]
    # (AdamW's momentum from the first step would move every parameter had the step run)
    assert torch.equal(p0, p1)
    assert all(torch.equal(a, b) for x, y in zip(s0, s1) for a, b in zip(x, y))
    assert r["norm"] == float("inf")             # DeepSpeed's own convention for a skipped overflow step
    # callbacks after the optimizer step (global_steps already counted it), decision resolved
    assert r["seen"] == [(step == BAD, step + 1, True) for step in range(STEPS)]
    assert r["skipped_seen"] == [step == BAD for step in range(STEPS)]


def test_monitor_configured_keeps_the_read(one_rank):
    r = _run(2, {"type": "gradient_stabilizer", "log_interval": 1})
    assert r["deferred"] == 0
    assert r["skipped_steps"] == 1 and r["session_skipped"] == 1
    # (not deferred: callbacks run inside the hook, before the optimizer step counted it)
    assert r["seen"] == [(step == BAD, step, True) for step in range(STEPS)]


@pytest.mark.parametrize("stage", [0, 2])
def test_a_step_the_hook_skips_reads_as_skipped_afterwards(one_rank, stage):
    """Not deferred (ZeRO-0's plain torch optimizer; a monitor on ZeRO-2): the hook skips the
    step itself. The overflow flag was restored (or removed) at the end of DeepSpeed's step, so
    Accelerate's step_was_skipped read False and a Trainer-owned LR scheduler advanced on a
    skipped step; the step after it reads False again."""
    r = _run(stage, {"type": "gradient_stabilizer", "log_interval": 1})
    assert r["deferred"] == 0 and r["skipped_steps"] == 1 and r["session_skipped"] == 1
    assert r["skipped_seen"] == [step == BAD for step in range(STEPS)]
