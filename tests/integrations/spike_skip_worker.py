"""Run under the ``deepspeed`` launcher (2 ranks): spike-aware step skipping on real engines.

Per scenario (ZeRO 1, 2, 3, ZeRO-2/3 with CPU offload and a 2-stage pipeline), the same deterministic run with injected
loss spikes (targets x SPIKE1 at step 7, x SPIKE2 at step 9):

* ``on``: skipping on; around each spike step a snapshot of this rank's parameters, optimizer
  state and shaper state; a checkpoint after step 8; the rolling window at the save;
* ``nospike``: the same run with the first spike's step left out (steps 0-6, 8): after a skip
  the next step must be the one that would have followed without the spike's batch;
* ``resumed``: a fresh engine loads that checkpoint and runs step 9;
* ``off``: no ``skip`` sub-section (the control: what the spike does when not skipped);
  with ZeRO-2 it also saves a checkpoint without a window, and
* ``old_ckpt`` (ZeRO-2): a skipping engine loads that window-less checkpoint and runs step 9.

Writes ``<out>/<scenario>/rank<r>.json``; tests/integrations/test_spike_skip.py checks them.
"""
from __future__ import annotations

import hashlib
import os

import torch
import torch.nn as nn

from tests.distributed import runner
from tests.monitor.monitor_worker import IN, OUT, batch, make_model
from megatron_shaping.shutdown import exit_process

STEPS = 10
SPIKES = {7: 50.0, 9: 500.0}      # the first spike enters the window (as in OLMo-core): the second must be larger
SAVE_AFTER = 8                   # checkpoint after step index 8 (global_steps 9)
CHECK = (7, 9)                   # snapshot around these steps
MB = 2
LR = 1e-2


def _tensors(obj, prefix=""):
    """Every tensor in a nested state (dicts, lists), keyed by path."""
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().clone()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
    return out


def _local_params(engine):
    """This rank's parameter values (ZeRO-3: its partition, without the tail padding)."""
    out = {}
    for n, p in engine.module.named_parameters():
        if hasattr(p, "ds_tensor"):
            import deepspeed.comm as dist
            start = dist.get_rank(group=p.ds_process_group) * p.partition_numel()
            valid = max(0, min(p.partition_numel(), p.ds_numel - start))
            out[n] = p.ds_tensor.detach()[:valid].clone()
        else:
            out[n] = p.detach().clone()
    return out


def snapshot(engine):
    from megatron_shaping.checkpoint import state_digest
    sd = engine.gradient_shaping.session.state_dict()
    # the shaper's state proper: every member's fields and the count of shaping steps (not the
    # skipped-step counter, which a skip increments by design)
    return {"params": _local_params(engine), "opt": _tensors(engine.optimizer.state_dict()),
            "shaper": state_digest({"members": sd["members"], "steps": sd["steps"]})}


def compare(a, b):
    """(names of what differs, largest parameter change)."""
    diff = [f"param:{k}" for k in a["params"] if not torch.equal(a["params"][k], b["params"][k])]
    diff += [f"opt:{k}" for k in a["opt"] if k not in b["opt"] or not torch.equal(a["opt"][k], b["opt"][k])]
    if a["shaper"] != b["shaper"]:
        diff.append("shaper")
    change = max(float((a["params"][k].double() - b["params"][k].double()).abs().max()) if a["params"][k].numel()
                 else 0.0 for k in a["params"])
    return diff, change


def params_digest(engine):
    h = hashlib.sha256()
    for k, t in sorted(_local_params(engine).items()):
        h.update(k.encode())
        h.update(t.float().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _config(sc, skip):
    shaping = {"type": "spamp", "params": {"alpha_min": 0.7}}
    if skip:
        shaping["skip"] = dict(sc["skip"])
    cfg = {"train_micro_batch_size_per_gpu": MB, "gradient_accumulation_steps": sc.get("gas", 1),
           "steps_per_print": 10 ** 9, "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
           "gradient_clipping": 0.0, "gradient_shaping": shaping}
    if sc.get("dtype") == "fp16":
        # dynamic loss scale that grows every 2 good steps: a skip must not touch it
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 2, "loss_scale_window": 2, "hysteresis": 1,
                       "min_loss_scale": 1}
    if sc.get("stage") is not None:
        cfg["zero_optimization"] = {"stage": sc["stage"]}
        if sc.get("offload"):
            cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if sc["stage"] == 3:
            cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return cfg


def _pipe_layers():
    return [nn.Linear(IN, 11), nn.Tanh(), nn.Linear(11, 7), nn.Tanh(), nn.Linear(7, OUT)]


def build(sc, skip, world):
    import megatron_shaping
    if sc.get("pipeline"):
        from deepspeed.pipe import PipelineModule
        torch.manual_seed(0)
        model = PipelineModule(layers=_pipe_layers(), num_stages=world, loss_fn=torch.nn.functional.mse_loss,
                               partition_method="uniform")
    else:
        model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    engine, _, _, _ = megatron_shaping.initialize(model=model, optimizer=opt, config=_config(sc, skip))
    return engine


def one_step(engine, sc, step, world, rank):
    """One optimizer step on the global batch of ``step``; returns the step's loss on this rank
    (pipeline: the aggregated loss train_batch returns)."""
    sh = engine.gradient_shaping
    gas = sc.get("gas", 1)
    x, y = batch(step, MB * gas * world, SPIKES)
    if sc.get("dtype") == "fp16":
        x, y = x.half(), y.half()
    if sc.get("pipeline"):
        micro = [(x[m * MB:(m + 1) * MB], y[m * MB:(m + 1) * MB]) for m in range(gas)]
        return float(engine.train_batch(iter(micro)))
    losses = []
    for m in range(gas):
        i = (m * world + rank) * MB
        loss = torch.nn.functional.mse_loss(engine(x[i:i + MB]), y[i:i + MB])
        engine.backward(loss)
        sh.observe_loss(loss)
        engine.step()
        losses.append(float(loss))
    return sum(losses) / gas


def run(engine, sc, steps, world, rank, rows, ckpt=None):
    sh = engine.gradient_shaping
    for step in steps:
        snap = snapshot(engine) if step in CHECK else None
        scale = _loss_scale(engine)
        coll = sh.collectives
        loss = one_step(engine, sc, step, world, rank)
        row = {"step": step, "code": sh.session.last_code, "reasons": list(sh.last_skip_reasons),
               "collectives": sh.collectives - coll, "ds_skipped": int(engine.skipped_steps),
               "global_steps": int(engine.global_steps), "log": sh.log_dict(), "loss": loss,
               "ds_norm": _ds_norm(engine),
               "params": params_digest(engine), "loss_scale": [scale, _loss_scale(engine)]}
        if sh.skip is not None and sh.skip.last:
            row["rule_loss"] = float(sh.skip.last["loss"])
            row["rule_grad_norm"] = float(sh.skip.last["grad_norm"])
        if snap is not None:
            row["diff"], row["change"] = compare(snap, snapshot(engine))
        rows.append(row)
        if ckpt is not None and step == SAVE_AFTER:
            engine.save_checkpoint(ckpt["dir"], tag="t")
            ckpt["window"] = _window(sh)


def _ds_norm(engine):
    """engine.get_global_grad_norm() as a float (None when DeepSpeed reports none)."""
    v = engine.get_global_grad_norm()
    return None if v is None else float(v)


def _loss_scale(engine):
    return float(getattr(engine.optimizer, "loss_scale", 1.0))


def _window(sh):
    if sh.skip is None:
        return None
    sd = sh.skip.state_dict()
    return {"grad_norms": None if sd["grad_norms"] is None else sd["grad_norms"].tolist(),
            "losses": None if sd["losses"] is None else sd["losses"].tolist(), "skips": sd["skips"]}


def scenario(sc, world, rank, out_dir):
    res = {}
    ck_on = {"dir": os.path.join(out_dir, "ckpt_on")}
    eng = build(sc, True, world)
    rows = []
    run(eng, sc, range(STEPS), world, rank, rows, ck_on)
    res["on"] = {"rows": rows, "window_at_save": ck_on["window"]}
    eng.destroy()

    # the reference for the step after a skip: the same run without the first spike's batch
    eng = build(sc, True, world)
    res["nospike"] = {"rows": []}
    run(eng, sc, [s for s in range(SAVE_AFTER + 1) if s != CHECK[0]], world, rank, res["nospike"]["rows"])
    eng.destroy()

    eng = build(sc, True, world)
    eng.load_checkpoint(ck_on["dir"], tag="t")
    res["resumed"] = {"window_after_load": _window(eng.gradient_shaping), "rows": []}
    run(eng, sc, [SAVE_AFTER + 1], world, rank, res["resumed"]["rows"])
    eng.destroy()

    ck_off = {"dir": os.path.join(out_dir, "ckpt_off")} if sc.get("old_ckpt") else None
    eng = build(sc, False, world)
    rows = []
    run(eng, sc, range(SAVE_AFTER + 1), world, rank, rows, ck_off)
    res["off"] = {"rows": rows}
    eng.destroy()

    if ck_off is not None:
        eng = build(sc, True, world)
        eng.load_checkpoint(ck_off["dir"], tag="t")
        res["old_ckpt"] = {"window_after_load": _window(eng.gradient_shaping), "rows": []}
        run(eng, sc, [SAVE_AFTER + 1], world, rank, res["old_ckpt"]["rows"])
        eng.destroy()
    return res


def main():
    w = runner.start(fake_fp16=True)
    for sc, res in w.each(lambda sc: scenario(sc, w.world, w.rank, w.scenario_dir(sc))):
        w.write_json(os.path.join(w.scenario_dir(sc), f"rank{w.rank}.json"), res, every_rank=True)
        w.barrier()


if __name__ == "__main__":
    main()
    exit_process()      # not through finalization: megatron_shaping/shutdown.py
