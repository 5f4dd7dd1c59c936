"""A parameter that gets no gradient on a step (an unused branch): DeepSpeed 0.19.8's ZeRO-1/2
with CPU offload and ZeRO-3 (with and without offload) keep the previous step's gradient of it in
their persistent buffers, where ZeRO-1/2 without offload hand a zero, as one process would see
it. The adapters zero such stale pieces before the statistics (adapters._ZeroAdapter).

In-process, one rank: a two-layer net whose second layer is used on step 1 only. Per step and
group, the statistics of every path equal those of ZeRO-2 without offload (the reference
DeepSpeed gets right), and the unused layer reads 0; without the zeroing, its groups read the
previous step's gradient again, as shaped (sum of squares 1.0 for b.weight, GradientStabilizer's
unit magnitude, against a tolerance of 1e-9 relative; seen failing that way on all three paths)."""
import pytest
import torch

pytest.importorskip("deepspeed")

import megatron_shaping  # noqa: E402

PATHS = {"zero2": (2, False), "zero2_offload": (2, True), "zero3": (3, False), "zero3_offload": (3, True)}
USE_B = (True, False, False, True)          # the second layer: used, unused twice, used again


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)

    def forward(self, x, use_b):
        return (self.b(self.a(x)) if use_b else self.a(x)).square().sum()


def run(stage, offload):
    torch.manual_seed(0)
    model = Net()
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0,
           "steps_per_print": 10 ** 9, "zero_force_ds_cpu_optimizer": False, "zero_optimization": zero,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
           "gradient_shaping": {"type": "gradient_stabilizer", "granularity": "tensor"}}
    engine = megatron_shaping.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]
    names = [p.name for p in engine.gradient_shaping.session.grouping.params]
    steps = []
    engine.gradient_shaping.callbacks.append(lambda s, r: steps.append(r.stats_before.sumsq.tolist()))
    for use_b in USE_B:
        engine.backward(engine(torch.ones(2, 4), use_b))
        engine.step()
    engine.destroy()
    return names, steps


@pytest.fixture(scope="module")
def runs(one_rank):
    return {k: run(*v) for k, v in PATHS.items()}


@pytest.mark.parametrize("path", [k for k in PATHS if k != "zero2"])
def test_unused_parameters_read_zero_on_every_path(runs, path):
    names, ref = runs["zero2"]
    got_names, got = runs[path]
    assert got_names == names == ["a.weight", "a.bias", "b.weight", "b.bias"]
    unused = [i for i, n in enumerate(names) if n.startswith("b.")]
    for step, (r, g) in enumerate(zip(ref, got)):
        for i, (x, y) in enumerate(zip(r, g)):
            assert abs(x - y) <= 1e-9 * max(abs(x), abs(y)), f"{path} step {step + 1} {names[i]}: {y} vs {x}"
        if not USE_B[step]:
            assert all(g[i] == 0.0 for i in unused), (path, step, g)
    # the layer has a gradient when it is used (the zeros above are not everywhere)
    assert min(ref[0][i] for i in unused) > 1.0 and min(got[3][i] for i in unused) > 1.0


def test_the_watch_is_removed_with_the_engine_and_spares_z3_leaf_parameters(one_rank):
    """engine.destroy() removes the gradient hooks (a rebuilt engine on the same model would
    otherwise add a set per engine); ZeRO-3 leaf-module parameters (DeepSpeed writes their
    gradient, zero where a rank routed nothing, every backward) are never zeroed."""
    from megatron_shaping.integrations.deepspeed.adapters import Zero3Adapter
    from megatron_shaping.stats.slices import Piece
    torch.manual_seed(0)
    model = Net()
    model.b.weight.ds_z3_leaf_module = model.b        # what set_z3_leaf_modules marks
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0,
           "steps_per_print": 10 ** 9, "zero_optimization": {"stage": 3},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
           "gradient_shaping": {"type": "norm_clip"}}
    engine = megatron_shaping.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]
    ad = engine.gradient_shaping.adapter
    assert isinstance(ad, Zero3Adapter) and len(ad._watch_handles) == 3          # b.weight is not watched
    engine.backward(engine(torch.ones(2, 4), False))
    ad.begin_step()
    g = torch.ones(3)
    ad._zero_if_stale(Piece(model.b.weight, g, 0, None))
    assert torch.equal(g, torch.ones(3))                                           # leaf: kept
    ad._zero_if_stale(Piece(model.b.bias, g, 0, None))
    assert torch.equal(g, torch.zeros(3))                                          # unused, watched: zeroed
    engine.destroy()
    assert ad._watch_handles == [] and ad._fresh is None
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
