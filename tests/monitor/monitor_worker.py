"""Run under the ``deepspeed`` launcher (2 ranks): small DeepSpeed runs with ``csv_monitor`` and
the shaping monitor on, next to the unsharded single-process reference
(``megatron_shaping.GradientShaper`` on the whole batch, as tests/distributed/ds_worker.py).

Writes, per scenario, ``<out>/<name>/ref.json`` (rank 0: reference per-layer statistics per step,
the sample count after each step, the monitor's summary and wiring) and
``<out>/<name>/records_rank<r>.json`` (every rank: the StepRecord it saw, as exact floats), which
test_monitor_deepspeed.py compares with the CSV files DeepSpeed's csv_monitor wrote.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn

from tests.distributed import runner
from megatron_shaping.shutdown import exit_process

IN, OUT = 13, 3


class Net(nn.Module):
    """280 parameters in 7 tensors of awkward sizes: tensors straddle the 2-rank ZeRO partitions.
    (280 = a multiple of 2 * world: DeepSpeed adds no partition padding.)"""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(IN, 11)
        self.inp_norm = nn.Parameter(torch.ones(11))
        self.mid = nn.Linear(11, 7)
        self.mid_norm = nn.Parameter(torch.ones(7))
        self.head = nn.Linear(7, OUT)

    def forward(self, x):
        x = torch.tanh(self.inp(x)) * self.inp_norm
        return self.head(torch.tanh(self.mid(x)) * self.mid_norm)


def make_model(seed=0):
    torch.manual_seed(seed)
    return Net()


def batch(step, n, spike=None):
    """Deterministic batch of step ``step``; ``spike[step]`` multiplies the targets (a loss spike)."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(n, IN, generator=g), torch.randn(n, OUT, generator=g)
    if spike and step in spike:
        y = y * spike[step]
    return x, y


def _floats(t):
    return [float(x) for x in t.double().tolist()]


def _record(rec):
    if rec is None:
        return None
    return {"sumsq_before": _floats(rec.stats_before.sumsq), "sumsq_after": _floats(rec.stats_after.sumsq),
            "factor": _floats(rec.factor)}


def _ls(ls):
    return {k: _floats(v) for k, v in ls._asdict().items()}


def _config(sc, out_dir, world):
    cfg = {
        "train_micro_batch_size_per_gpu": sc.get("micro", 2),
        "gradient_accumulation_steps": sc.get("gas", 1),
        "steps_per_print": 10 ** 9,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": 0.0,     # DeepSpeed's default is 1.0: it would clip after shaping
        "csv_monitor": {"enabled": True, "output_path": out_dir, "job_name": "csv"},
        "gradient_shaping": dict(sc["shaping"]),
    }
    if sc.get("stage") is not None:
        cfg["zero_optimization"] = {"stage": sc["stage"]}
        if sc["stage"] == 3:
            cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if sc["shaping"].get("spike_log"):
        cfg["gradient_shaping"]["spike_log"] = os.path.join(out_dir, sc["shaping"]["spike_log"])
    return cfg


def _update_size(grouping, named, before, num_groups):
    """Reference update sizes of one step: per group, the parameter norm after the step and
    ||w_after - w_before|| / ||w_before||, plus the global values (float64 sums, one process)."""
    sums = [[0.0, 0.0, 0.0] for _ in range(num_groups)]
    for n, p in named:
        g = grouping.group(n)
        w, w0 = p.detach().double(), before[n].double()
        sums[g][0] += float(w.square().sum())
        sums[g][1] += float((p.detach() - before[n]).double().square().sum())
        sums[g][2] += float(w0.square().sum())
    tot = [sum(s[i] for s in sums) for i in range(3)]
    return {"param_norm": [s[0] ** 0.5 for s in sums],
            "update_ratio": [(s[1] / s[2]) ** 0.5 if s[2] > 0 else float("nan") for s in sums],
            "global_param_norm": tot[0] ** 0.5, "global_update_ratio": (tot[1] / tot[2]) ** 0.5}


def _local(engine):
    return [n for n, p in engine.module.named_parameters()]


def _wiring(engine):
    shaping = engine.gradient_shaping
    return {"monitor": shaping.monitor is not None, "callbacks": len(shaping.callbacks),
            # unwrapped: the engine's step is the shaping hook itself
            "step_wrapped": getattr(engine._take_model_step, "__self__", None) is not shaping,
            # the update-size statistics run on every rank (sums over shards), or nowhere
            "update_size": shaping.update_size is not None}


def run_data_parallel(sc, world, rank, out_dir):
    import megatron_shaping
    from megatron_shaping import GradientShaper
    from megatron_shaping.monitoring import layer_stats

    steps, gas, mb, lr = sc.get("steps", 5), sc.get("gas", 1), sc.get("micro", 2), 0.05
    spike = {int(k): v for k, v in (sc.get("spike") or {}).items()}
    ref = make_model()
    model = copy.deepcopy(ref)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    engine, _, _, _ = megatron_shaping.initialize(model=model, optimizer=opt, config=_config(sc, out_dir, world))
    shaping = engine.gradient_shaping
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
    spec = {k: v for k, v in sc["shaping"].items() if k in ("type", "params", "shapers")}
    ref_shaper = GradientShaper(ref.named_parameters(), spec, granularity=sc["shaping"].get("granularity"))
    wiring, local = _wiring(engine), _local(engine)
    res = {"names": list(shaping.session.layout.names), "wiring": wiring, "steps": []}
    records = []
    for step in range(steps):
        x, y = batch(step, mb * gas * world, spike)
        losses = []
        for m in range(gas):
            i = (m * world + rank) * mb
            loss = torch.nn.functional.mse_loss(engine(x[i:i + mb]), y[i:i + mb])
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        records.append(_record(shaping.session.last if not shaping.last_skipped else None))
        if rank == 0:   # what a launcher does (the non-pipeline engine writes no loss tag itself)
            engine.monitor.write_events([("Train/Samples/train_loss", sum(losses) / gas, engine.global_samples)])
        ref_opt.zero_grad()
        for m in range(gas):
            for r in range(world):
                i = (m * world + r) * mb
                (torch.nn.functional.mse_loss(ref(x[i:i + mb]), y[i:i + mb]) / (gas * world)).backward()
        prev = ref_shaper.state
        rec = ref_shaper.apply_()
        row = {"samples": int(engine.global_samples), "global_steps": int(engine.global_steps),
               "skipped": rec is None, "loss_scale": float(shaping.last_loss_scale)}
        if rec is not None:
            before = {n: p.detach().clone() for n, p in ref.named_parameters()}
            ref_opt.step()
            row["ls"] = _ls(layer_stats(ref_shaper.shaper, prev, ref_shaper.state, rec))
            row["upd"] = _update_size(ref_shaper.session.grouping, list(ref.named_parameters()), before,
                                      len(res["names"]))
        res["steps"].append(row)
    res["summary"] = shaping.monitor.summary() if shaping.monitor is not None else None
    engine.destroy()
    return res, {"records": records, "wiring": wiring, "local_params": local}


# ------------------------------------------------------------------ pipeline (2 stages)

def _pipe_layers():
    return [nn.Linear(IN, 11), nn.Tanh(), nn.Linear(11, 7), nn.Tanh(), nn.Linear(7, OUT)]


def run_pipeline(sc, world, rank, out_dir):
    import megatron_shaping
    from deepspeed.pipe import PipelineModule
    from megatron_shaping import GradientShaper
    from megatron_shaping.monitoring import layer_stats

    steps, gas, mb, lr = sc.get("steps", 4), sc["gas"], sc.get("micro", 2), 0.05
    torch.manual_seed(0)
    ref = nn.Sequential(*_pipe_layers())
    pipe = PipelineModule(layers=_pipe_layers(), num_stages=world, loss_fn=torch.nn.functional.mse_loss,
                          partition_method="uniform")
    with torch.no_grad():
        full = dict(ref.named_parameters())
        for n, p in pipe.named_parameters():
            p.copy_(full[n])
    opt = torch.optim.SGD(pipe.parameters(), lr=lr, momentum=0.9)
    engine, _, _, _ = megatron_shaping.initialize(model=pipe, optimizer=opt, config=_config(sc, out_dir, world))
    shaping = engine.gradient_shaping
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
    ref_shaper = GradientShaper(ref.named_parameters(), {"type": sc["shaping"]["type"],
                                                          "params": sc["shaping"].get("params", {})})
    wiring, local = _wiring(engine), _local(engine)
    res = {"names": list(shaping.session.layout.names), "wiring": wiring, "steps": []}
    records = []
    for step in range(steps):
        x, y = batch(step, mb * gas)
        micro = [(x[m * mb:(m + 1) * mb], y[m * mb:(m + 1) * mb]) for m in range(gas)]
        engine.train_batch(iter(micro))
        records.append(_record(shaping.session.last))
        ref_opt.zero_grad()
        for xm, ym in micro:
            (torch.nn.functional.mse_loss(ref(xm), ym) / gas).backward()
        prev = ref_shaper.state
        rec = ref_shaper.apply_()
        before = {n: p.detach().clone() for n, p in ref.named_parameters()}
        ref_opt.step()
        res["steps"].append({"samples": int(engine.global_samples), "global_steps": int(engine.global_steps),
                             "skipped": False, "loss_scale": 1.0,
                             "ls": _ls(layer_stats(ref_shaper.shaper, prev, ref_shaper.state, rec)),
                             "upd": _update_size(ref_shaper.session.grouping, list(ref.named_parameters()), before,
                                                 len(res["names"]))})
    res["summary"] = shaping.monitor.summary() if shaping.monitor is not None else None
    engine.destroy()
    return res, {"records": records, "wiring": wiring, "local_params": local}


def scenario(sc, world, rank, out_dir):
    run = run_pipeline if sc.get("pipeline") else run_data_parallel
    res, records = run(sc, world, rank, out_dir)
    return {"ref": res, "records": records}


def main():
    w = runner.start()
    for sc, r in w.each(lambda sc: scenario(sc, w.world, w.rank, w.scenario_dir(sc))):
        res, records = r.get("ref", r), r.get("records", r)       # a scenario that raised: its error
        w.write_json(os.path.join(w.scenario_dir(sc), f"records_rank{w.rank}.json"), records, every_rank=True)
        w.write_json(os.path.join(w.scenario_dir(sc), "ref.json"), dict(res, world=w.world))
        w.barrier()


if __name__ == "__main__":
    main()
    exit_process()      # not through finalization: megatron_shaping/shutdown.py
