"""Start-up refusals (issue 10, item 9): NVMe offload, MoE layers, the Muon path, DeepSpeed's
``torch_autocast``, SuperOffload, ZenFlow, ``gradient_allreduce_op: "sum"`` and sparse embeddings each stop ``megatron_shaping.initialize`` / ``attach`` with a message that
names the feature, before any training step.

In-process, one rank (gloo, world 1) on DeepSpeed's CPU accelerator: DeepSpeed builds these
engines without a launch, except NVMe offload, whose async_io op cannot be built on this CPU
machine (DeepSpeed stops with "Unable to JIT load the async_io op"). For NVMe the test builds
a real ZeRO-3 engine with CPU offload and sets the two attributes DeepSpeed's ZeRO-3 optimizer
derives from an ``nvme`` device (``swap_optimizer`` for offload_optimizer,
``params_in_nvme_and_cpu`` for offload_param; deepspeed/runtime/zero/stage3.py), which are what
the refusal reads. Each refusal has a control: the same engine without the feature starts.
"""
from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("deepspeed")

import megatron_shaping  # noqa: E402

SECTION = {"type": "norm_clip", "params": {"max_norm": 1.0}}


def config(stage=0, optimizer="AdamW", shaping=True, **extra):
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0,
           "optimizer": {"type": optimizer, "params": {"lr": 1e-3}}, "zero_optimization": {"stage": stage}}
    if optimizer == "AdamW":
        cfg["optimizer"]["params"]["torch_adam"] = True
    if shaping:
        cfg["gradient_shaping"] = SECTION
    cfg.update(extra)
    return cfg


def two_linears():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))


def start(model, cfg):
    return megatron_shaping.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]


def refused(message):
    return pytest.raises(RuntimeError, match="^" + re.escape(message) + "$")


def moe_model():
    from deepspeed.moe.layer import MoE

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = MoE(hidden_size=4, expert=torch.nn.Linear(4, 4), num_experts=2, k=1)

        def forward(self, x):
            return self.moe(x)[0]

    torch.manual_seed(0)
    return Net()


@pytest.mark.parametrize("stage", [0, 2])
def test_moe_layers_are_refused(one_rank, stage):
    with refused("gradient_shaping does not support MoE layers yet (expert-parallel gradients would need "
                 "their own reduction group)"):
        start(moe_model(), config(stage))
    assert start(moe_model(), config(stage, shaping=False)).has_moe_layers   # control: DeepSpeed builds it


@pytest.mark.parametrize("stage, zero_opt", [(0, "MuonWithAuxAdam"), (1, "DeepSpeedZeroOptimizer"),
                                             (2, "DeepSpeedZeroOptimizer"), (3, "DeepSpeedZeroOptimizer_Stage3")])
def test_muon_is_refused(one_rank, stage, zero_opt):
    cfg = config(stage, optimizer="Muon")
    if stage == 3:
        cfg["zero_optimization"]["reduce_scatter"] = False   # DeepSpeed: Muon and reduce scatter cannot be combined
    with refused(f"gradient_shaping does not support the Muon optimizer path of {zero_opt}"):
        start(two_linears(), cfg)
    control = dict(cfg, optimizer=config()["optimizer"])
    assert start(two_linears(), control).gradient_shaping is not None


@pytest.mark.parametrize("stage, dtype", [(0, "torch.float16"), (0, "torch.bfloat16"), (2, "torch.bfloat16")])
def test_torch_autocast_is_refused(one_rank, stage, dtype):
    autocast = {"torch_autocast": {"enabled": True, "dtype": dtype}}
    with refused("gradient_shaping does not support DeepSpeed's torch_autocast mode"):
        start(two_linears(), config(stage, **autocast))
    assert start(two_linears(), config(stage)).gradient_shaping is not None


@pytest.mark.parametrize("attribute", ["swap_optimizer", "params_in_nvme_and_cpu"])
def test_nvme_offload_is_refused(one_rank, attribute):
    cfg = config(3, shaping=False)
    cfg["zero_optimization"].update(offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})
    engine = start(two_linears(), cfg)
    assert getattr(engine.optimizer, attribute) is False
    setattr(engine.optimizer, attribute, True)        # what an "nvme" device sets (stage3.py)
    with refused("gradient_shaping does not support ZeRO-3 NVMe offload (optimizer or parameters); "
                 "use offload to 'cpu' or no offload"):
        megatron_shaping.attach(engine, SECTION)
    setattr(engine.optimizer, attribute, False)       # control: the same engine with CPU offload attaches
    assert megatron_shaping.attach(engine, SECTION) is not None


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_summed_gradients_are_refused(one_rank, stage):
    """``gradient_allreduce_op: "sum"`` leaves DeepSpeed's reduced gradient summed over the
    data-parallel ranks (world-size times the mean one process sees): absolute thresholds would
    act differently, silently."""
    with refused('gradient_shaping does not support "gradient_allreduce_op": "sum" (the gradient is then the sum '
                 'over data-parallel ranks, not their mean); use "mean" (the default)'):
        start(two_linears(), config(stage, gradient_allreduce_op="sum"))
    assert start(two_linears(), config(stage, gradient_allreduce_op="mean")).gradient_shaping is not None


@pytest.mark.parametrize("name, stage", [("SuperOffloadOptimizer_Stage3", 3), ("ZenFlowZeroOptimizer", 2)])
def test_optimizers_that_step_outside_the_hook_are_refused(one_rank, name, stage):
    """SuperOffload (ZeRO-3) and ZenFlow (ZeRO-1/2) subclass the supported ZeRO optimizers but
    update parameters outside the optimizer step the hook runs in. Their engines need CPU Adam
    ops not built here: a real engine of the parent class gets a subclass of that name, which is
    what the refusal reads (control: the parent class attaches)."""
    cfg = config(stage, shaping=False)
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    engine = start(two_linears(), cfg)
    parent = type(engine.optimizer)
    engine.optimizer.__class__ = type(name, (parent,), {})
    with refused(f"gradient_shaping does not support {name} (offload_optimizer.super_offload / "
                 "zero_optimization.zenflow): it updates parameters from unshaped gradients outside the "
                 "optimizer step the shaper runs in"):
        megatron_shaping.attach(engine, SECTION)
    engine.optimizer.__class__ = parent
    assert megatron_shaping.attach(engine, SECTION) is not None


def test_sparse_embeddings_are_refused(one_rank):
    """nn.Embedding(sparse=True) hands a sparse gradient (ZeRO-0), which the statistics cannot
    view: refused at start-up, not a NotImplementedError at the first step."""
    def net(sparse):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(8, 4, sparse=sparse), torch.nn.Linear(4, 4))

    with refused("gradient_shaping does not support sparse gradients (Embedding(sparse=True)): build the "
                 "embedding with sparse=False"):
        start(net(True), config(0))
    assert start(net(False), config(0)).gradient_shaping is not None


def test_zero3_zenflow_flag_is_refused(one_rank):
    """ZeRO-3 ZenFlow keeps the stage-3 class and sets ``optimizer.zenflow`` (and the engine's
    ``zenflow``): refused by the flag (control: the flag off attaches)."""
    cfg = config(3, shaping=False)
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    engine = start(two_linears(), cfg)
    engine.optimizer.zenflow = True
    with refused("gradient_shaping does not support ZenFlow (DeepSpeedZeroOptimizer_Stage3) "
                 "(offload_optimizer.super_offload / zero_optimization.zenflow): it updates parameters from "
                 "unshaped gradients outside the optimizer step the shaper runs in"):
        megatron_shaping.attach(engine, SECTION)
    engine.optimizer.zenflow = False
    assert megatron_shaping.attach(engine, SECTION) is not None
