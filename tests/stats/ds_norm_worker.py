"""Run under the ``deepspeed`` launcher: DeepSpeed's global norm replaced by the shaping
statistics vs DeepSpeed computing it itself (``Adapter.replace_norm``), same steps.

Per scenario two engines are built from the same model and fed the same batches; one keeps
DeepSpeed's own norm pass (``replace_norm = False``), the other takes the norm from the hook.
Recorded per step: ``engine.get_global_grad_norm()`` of both, how often DeepSpeed's own norm
function ran in each, the norm *before* shaping (what a wrong replacement would report), and
at the end the parameters of both. Rank 0 writes one JSON line per scenario.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from megatron_shaping.shutdown import exit_process
from tests.distributed import runner

IN, OUT = 13, 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(IN, 11)
        self.n = nn.Parameter(torch.ones(11))
        self.b = nn.Linear(11, 7)
        self.head = nn.Linear(7, OUT)

    def forward(self, x, y):
        h = torch.tanh(self.a(x)) * self.n
        h = torch.tanh(self.b(h))
        return torch.nn.functional.mse_loss(self.head(h).float(), y.float())


def make_model():
    torch.manual_seed(0)
    m = Net()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def batch(step, rank, dtype):
    """Targets growing with the step: gradient norms rise, so SPAMP shapes after its first step
    whatever the number of processes."""
    g = torch.Generator().manual_seed(1000 + 10 * step + rank)
    return torch.randn(4, IN, generator=g).to(dtype), torch.randn(4, OUT, generator=g) * (1 + step)


def ds_config(sc):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
           "zero_optimization": {"stage": sc["stage"]}, "zero_allow_untested_optimizer": True,
           "zero_force_ds_cpu_optimizer": False, "gradient_clipping": sc.get("clip", 0.0),
           "gradient_shaping": sc["shaping"]}
    z = cfg["zero_optimization"]
    if sc["stage"] == 3:
        z["stage3_param_persistence_threshold"] = 0
        z["sub_group_size"] = 100
    if sc["stage"] in (1, 2):
        z["reduce_bucket_size"] = 64
        z["allgather_bucket_size"] = 64
    if sc.get("offload"):
        z["offload_optimizer"] = {"device": "cpu"}
    if sc["dtype"] == "bf16":
        cfg["bf16"] = {"enabled": True}
        if sc.get("grad_accum_fp32"):
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    elif sc["dtype"] == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1, "hysteresis": 1,
                       "min_loss_scale": 1}
    return cfg


class OneGroupMpu:
    """An mpu whose data-parallel groups have one rank each and whose other dimension spans the
    job: ``"sp"``, DeepSpeed's Ulysses sequence parallelism (gradients are then reduced over the
    sequence-data-parallel group, the job, so on the replicated paths, ZeRO-0, each rank holds
    the whole gradient although its data-parallel rank is 0); ``"tp"``, tensor parallelism with
    no parameter actually split (every parameter is TP-replicated: counted on TP rank 0 unless
    its ZeRO-3 partition spans the TP peers, as zero.Init over all ranks makes it)."""

    def __init__(self, kind: str):
        import torch.distributed as dist
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        singles = [dist.new_group([r]) for r in range(self.world)]      # collective: every rank makes each
        self.single = singles[self.rank]
        self.all = dist.new_group(list(range(self.world)))
        self.tp = kind == "tp"
        if not self.tp:
            self.get_sequence_parallel_rank = lambda: self.rank
            self.get_sequence_parallel_world_size = lambda: self.world
            self.get_sequence_parallel_group = lambda: self.all
            self.get_sequence_data_parallel_rank = lambda: self.rank
            self.get_sequence_data_parallel_world_size = lambda: self.world
            self.get_sequence_data_parallel_group = lambda: self.all

    def get_model_parallel_rank(self):
        return self.rank if self.tp else 0

    def get_model_parallel_world_size(self):
        return self.world if self.tp else 1

    def get_model_parallel_group(self):
        return self.all if self.tp else self.single

    def get_data_parallel_rank(self):
        return 0

    def get_data_parallel_world_size(self):
        return 1

    def get_data_parallel_group(self):
        return self.single


def full_params(engine):
    import deepspeed
    params = list(engine.module.parameters())
    if hasattr(params[0], "ds_id"):
        with deepspeed.zero.GatheredParameters(params):
            return torch.cat([p.detach().double().reshape(-1).clone() for p in params])
    return torch.cat([p.detach().double().reshape(-1).clone() for p in params])


class NormCalls:
    """Counts calls of DeepSpeed's own global-norm functions on this engine's path."""

    def __init__(self, engine):
        import deepspeed.runtime.utils as du
        from deepspeed.runtime import bf16_optimizer as bo
        from deepspeed.runtime.fp16 import fused_optimizer as fo
        from deepspeed.runtime.fp16 import unfused_optimizer as uo
        self.n = 0
        targets = [(engine.optimizer, "scaled_global_norm"), (engine.optimizer, "_get_norm_groups")]
        for obj, name in targets:
            if hasattr(obj, name):
                setattr(obj, name, self._wrap(getattr(obj, name)))
        self.engine = engine
        self.mods = [(bo, "get_global_norm_of_tensors"), (fo, "get_flattened_grad_norm"), (uo, "get_weight_norm"),
                     (du, "clip_grad_norm_")]

    def _wrap(self, fn):
        def counted(*a, **k):
            self.n += 1
            return fn(*a, **k)
        return counted

    def __enter__(self):
        import deepspeed.runtime.engine as de
        self.saved = [(m, a, getattr(m, a)) for m, a in self.mods] + [(de, "clip_grad_norm_", de.clip_grad_norm_)]
        for m, a, f in self.saved:
            setattr(m, a, self._wrap(f))
        return self

    def __exit__(self, *exc):
        for m, a, f in self.saved:
            setattr(m, a, f)


def run(sc, rank):
    import megatron_shaping
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[sc["dtype"]]
    ref = make_model()
    engines = []
    mpu = OneGroupMpu(sc["mpu"]) if sc.get("mpu") else None
    for replace in (False, True):
        model = copy.deepcopy(ref)
        if sc.get("zero_init_all"):
            # partitioned over all ranks before the engine (and the mpu's data-parallel groups)
            import deepspeed
            deepspeed.zero.Init(module=model, data_parallel_group=mpu.all, config_dict_or_path=ds_config(sc))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        engine, _, _, _ = megatron_shaping.initialize(model=model, optimizer=opt, config=ds_config(sc), mpu=mpu)
        engine.gradient_shaping.adapter.replace_norm = replace
        engines.append((engine, NormCalls(engine)))
    out = {"name": sc["name"], "path": engines[0][0].gradient_shaping.adapter.name,
           "norm_ds": [], "norm_ours": [], "norm_before": [], "calls_ds": 0, "calls_ours": 0}
    for step in range(sc.get("steps", 4)):
        for i, (engine, calls) in enumerate(engines):
            x, y = batch(step, rank, dtype)
            loss = engine(x.to(engine.device), y.to(engine.device))
            engine.backward(loss)
            with calls:
                engine.step()
            n = engine.get_global_grad_norm()
            n = None if n is None else float(n)
            if i == 0:
                out["norm_ds"].append(n)
                out["calls_ds"] = calls.n
            else:
                out["norm_ours"].append(n)
                out["calls_ours"] = calls.n
                last = engine.gradient_shaping.session.last
                out["norm_before"].append(None if last is None else float(last.stats_before.sumsq.sum().sqrt()))
    out["replaced"] = engines[1][0].gradient_shaping.adapter.norms_replaced
    out["replaced_off"] = engines[0][0].gradient_shaping.adapter.norms_replaced
    pa, pb = full_params(engines[0][0]).cpu(), full_params(engines[1][0]).cpu()
    out["params"] = float(((pa - pb).abs() / pa.abs().clamp_min(1e-6)).max())
    out["moved"] = float((pa - full_params_of(ref)).abs().max())
    return out


def full_params_of(model):
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def main():
    # tools/gpu_check.sh runs this worker on GPUs with NCCL (MS_DIST_BACKEND, see runner.init_distributed)
    w = runner.start(fake_fp16=True, quiet=True)
    # every rank's figures: a replacement right on rank 0 only (a rank-local norm) must show
    w.write_lines([{"name": sc["name"], "world": w.world, "ranks": w.gather(dict(r, rank=w.rank))}
                   for sc, r in w.each(lambda sc: run(sc, w.rank))])


if __name__ == "__main__":
    main()
    exit_process()      # not through finalization: megatron_shaping/shutdown.py
