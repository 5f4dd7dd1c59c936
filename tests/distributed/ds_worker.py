"""Run under the ``deepspeed`` launcher: every scenario trains a small model with DeepSpeed and,
on every rank, the same model in one process with plain PyTorch and
``megatron_shaping.GradientShaper`` on the whole batch (the unsharded reference). Writes one
JSON line per scenario (rank 0) with the largest relative differences of per-layer statistics,
shaping factors and final parameters, which the pytest side checks against tolerances.

fp16 note: DeepSpeed's CPU accelerator reports no fp16 kernels and refuses fp16 configs. With
``--fake-fp16`` the worker makes the accelerator report fp16 support so that DeepSpeed's real
fp16 loss-scaler code paths run; the arithmetic is CPU fp16.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import traceback

import torch
import torch.nn as nn

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

IN, OUT = 13, 3


class Block(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.lin = nn.Linear(i, o)
        self.norm_w = nn.Parameter(torch.ones(o))

    def forward(self, x):
        return torch.tanh(self.lin(x)) * self.norm_w


class Net(nn.Module):
    """280 parameters in 8 tensors of awkward sizes: with 2 or 4 ranks, tensors straddle ZeRO
    partition boundaries. ``hidden=(11, 5)`` gives 253 parameters, which no world size divides
    (DeepSpeed then pads the last partition)."""

    def __init__(self, hidden=(11, 7)):
        super().__init__()
        self.layers = nn.ModuleList([Block(IN, hidden[0]), Block(hidden[0], hidden[1])])
        self.head = nn.Linear(hidden[1], OUT)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.head(x)


def make_model(seed=0, hidden=(11, 7)):
    torch.manual_seed(seed)
    m = Net(tuple(hidden))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def batch(step, n, spike=None):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, IN, generator=g)
    y = torch.randn(n, OUT, generator=g)
    if spike and step in spike:
        y = y * spike[step]       # a loss spike: gradients `spike` times larger
    return x, y


def rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max()) if a.numel() else 0.0


def full_params(engine):
    """The model's parameters as the next forward sees them (ZeRO-3: gathered)."""
    import deepspeed
    params = list(engine.module.parameters())
    ctx = deepspeed.zero.GatheredParameters(params) if hasattr(params[0], "ds_id") else _null()
    with ctx:
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def run_scenario(sc, world, rank):
    import deepspeed
    import megatron_shaping
    from megatron_shaping import GradientShaper

    steps = sc.get("steps", 4)
    gas = sc.get("gas", 1)
    mb = sc.get("micro", 2)
    lr = sc.get("lr", 0.05)
    spike = {int(k): v for k, v in (sc.get("spike") or {}).items()}
    cfg = {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": gas,
        "steps_per_print": 10 ** 9,
        "zero_optimization": {"stage": sc["stage"]},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": sc.get("clip", 0.0),
        "gradient_shaping": sc["shaping"],
    }
    z = cfg["zero_optimization"]
    if sc["stage"] == 3:
        z["stage3_param_persistence_threshold"] = 0
        z["sub_group_size"] = sc.get("sub_group_size", 100)
    if sc["stage"] in (1, 2) and not sc.get("default_buckets"):
        z["reduce_bucket_size"] = 64
        z["allgather_bucket_size"] = 64
        z["round_robin_gradients"] = bool(sc.get("round_robin", False))
    if sc.get("offload"):
        z["offload_optimizer"] = {"device": "cpu"}
    dtype = sc.get("dtype", "fp32")
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
        if sc.get("grad_accum_fp32"):
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}   # ZeRO-1 + this: BF16_Optimizer
    elif dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": sc.get("scale_power", 8),
                       "loss_scale_window": sc.get("scale_window", 1000), "hysteresis": 1, "min_loss_scale": 1}

    ref = make_model(hidden=sc.get("hidden", (11, 7)))
    model = copy.deepcopy(ref)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    engine, _, _, _ = megatron_shaping.initialize(model=model, optimizer=opt, config=cfg)
    shaping = engine.gradient_shaping
    if sc.get("disable_unscale_fix"):
        # Negative control: DeepSpeed's own unscale, to show the test sees the trap.
        import contextlib
        shaping.adapter.unscale_guard = lambda scale: contextlib.nullcontext()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
    spec = dict(sc["shaping"])
    members = spec["shapers"] if spec["type"] == "chain" else [{"type": spec["type"], "params": spec.get("params", {})}]
    if sc.get("clip", 0.0) > 0:
        # DeepSpeed's gradient_clipping runs after shaping, on the shaped gradient.
        members = members + [{"type": "norm_clip", "params": {"max_norm": sc["clip"]}, "granularity": "global"}]
    ref_spec = {"type": "chain", "shapers": members} if len(members) > 1 else members[0]
    ref_shaper = GradientShaper(ref.named_parameters(), ref_spec, granularity=spec.get("granularity"),
                                block_pattern=spec.get("block_pattern"))
    ddtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    res = {"name": sc["name"], "path": shaping.adapter.name, "stats": 0.0, "factor": 0.0, "params": 0.0,
           "skipped": [], "ref_skipped": [], "loss_scales": [], "collectives_per_step": []}
    for step in range(steps):
        x, y = batch(step, mb * gas * world, spike)
        # DeepSpeed: rank r takes micro-batches m*world + r
        c0 = shaping.collectives
        for m in range(gas):
            i = (m * world + rank) * mb
            out = engine(x[i:i + mb].to(ddtype))
            loss = torch.nn.functional.mse_loss(out.float(), y[i:i + mb])
            engine.backward(loss)
            engine.step()
        res["collectives_per_step"].append(shaping.collectives - c0)
        res["loss_scales"].append(shaping.last_loss_scale)
        # Reference: one process, the whole batch, fp32.
        ref_opt.zero_grad()
        for m in range(gas):
            for r in range(world):
                i = (m * world + r) * mb
                l = torch.nn.functional.mse_loss(ref(x[i:i + mb]), y[i:i + mb]) / (gas * world)
                l.backward()
        rec = ref_shaper.apply_()
        if rec is None:
            res["ref_skipped"].append(step)
        else:
            ref_opt.step()
        last = shaping.session.last
        if shaping.last_skipped or last is None:
            res["skipped"].append(step)
            continue
        res["active"] = max(res.get("active", 0.0), float((last.factor - 1).abs().max()))
        if rec is not None:
            res["stats"] = max(res["stats"], rel(last.stats_before.sumsq, rec.stats_before.sumsq))
            res["factor"] = max(res["factor"], rel(last.factor, rec.factor))
    dsp = full_params(engine)
    for n, p in ref.named_parameters():
        d = (dsp[n].double() - p.detach().double()).abs().max() / p.detach().double().abs().max().clamp_min(1e-12)
        res["params"] = max(res["params"], float(d))
    res["state_equal"] = _state_rel(shaping.state_dict(), ref_shaper.state_dict())
    res["global_steps"] = engine.global_steps
    res["skipped_steps"] = engine.skipped_steps
    engine.destroy() if hasattr(engine, "destroy") else None
    return res


def _state_rel(a, b):
    worst = 0.0
    for ma, mb_ in zip(a["members"], b["members"]):
        for k in ma["fields"]:
            worst = max(worst, rel(ma["fields"][k], mb_["fields"][k]))
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenarios", required=True, help="JSON file with a list of scenarios")
    ap.add_argument("--out", required=True)
    ap.add_argument("--fake-fp16", action="store_true")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    if args.fake_fp16:
        acc = get_accelerator()
        acc.is_fp16_supported = lambda: True
        acc.supported_dtypes = lambda: [torch.float, torch.bfloat16, torch.float16]
    deepspeed.init_distributed(dist_backend="gloo")
    import deepspeed.comm as dist
    world, rank = dist.get_world_size(), dist.get_rank()
    with open(args.scenarios) as f:
        scenarios = json.load(f)
    results = []
    for sc in scenarios:
        try:
            r = run_scenario(sc, world, rank)
        except Exception as e:  # report, keep going: one broken path must not hide the others
            r = {"name": sc["name"], "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
        r["world"] = world
        results.append(r)
        dist.barrier()
    if rank == 0:
        with open(args.out, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
