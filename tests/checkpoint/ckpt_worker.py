"""Checkpoint scenarios, run under the ``deepspeed`` launcher (one launch runs a list of jobs).

Each job is a dict with a ``kind``:

``reference``  train steps [0, N+M) from scratch without saving; store losses, parameters and
               shaper state in ``ref`` (a .pt file) for a later ``resume`` to compare with.
``save``       train [0, N), ``engine.save_checkpoint(dir, tag)``, then go on to N+M and compare
               with ``ref`` bit for bit (saving must not change the run).
``resume``     build a fresh engine (new processes: another launch), ``load_checkpoint``, check the
               loaded shaper state equals the saved file, train [N, N+M), compare with ``ref``:
               ``exact`` (torch.equal) or to ``tol`` (another world size / ZeRO stage).
``torch_ref``  the unsharded single-process reference (plain PyTorch, AdamW, GradientShaper).
``load_error`` load a bad checkpoint: record the exception (class, message) or that it loaded.
``nonfinite``  NaN/inf gradient steps without a loss scaler: skipped and counted, training goes on.
``fuzz``       gradients of zeros, denormals, 1e30, NaN and inf through a DeepSpeed engine.
``train_save`` (faults) resume if ``latest`` exists, train to ``steps`` saving every ``every``
               steps; ``kill`` makes one rank SIGKILL itself mid-training or mid-save.

Rank 0 appends one JSON line per job to ``--out``.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback

import torch

from tests.distributed import nets, runner
from megatron_shaping.shutdown import exit_process

IN, OUT = nets.IN, nets.OUT
GLOBAL_BATCH = 8


def make_model(extra_layer=False):
    """nets.Net: 8 tensors of awkward sizes (280 parameters) that straddle ZeRO partition boundaries."""
    return nets.make_model(hidden=(11, 7, 7) if extra_layer else (11, 7))


def batch(step, n=GLOBAL_BATCH):
    return nets.batch(step, n)


def grad_factor(job, step):
    """Multiplier of the loss at ``step`` (fuzz and non-finite jobs): 0, 1e-40, 1e30, nan, inf."""
    f = (job.get("factors") or {}).get(str(step))
    return None if f is None else float(f)


# ----------------------------------------------------------------------------------- engines
def ds_config(job, world):
    mb = job.get("micro", 2)
    gas = GLOBAL_BATCH // (mb * world)
    stage = job.get("stage", 1)
    z = {"stage": stage}
    if stage == 3:
        z["stage3_param_persistence_threshold"] = 0
        z["sub_group_size"] = job.get("sub_group_size", 100)
    if stage in (1, 2):
        z["reduce_bucket_size"] = 64
        z["allgather_bucket_size"] = 64
    cfg = {"train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": gas,
           "steps_per_print": 10 ** 9, "zero_optimization": z, "zero_allow_untested_optimizer": True,
           "zero_force_ds_cpu_optimizer": False, "gradient_clipping": 0.0,
           "checkpoint": {"load_universal": bool(job.get("universal", False))}}
    if job.get("dtype") == "bf16":
        cfg["bf16"] = {"enabled": True}
    if job.get("shaping") is not None:
        cfg["gradient_shaping"] = dict(job["shaping"])
    return cfg


def llama_cfg():
    from megatron_shaping.model import LlamaConfig
    return LlamaConfig(hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=64, vocab_size=100, seq_length=8, tie_embeddings=True)


def build_llama(job, world):
    """LLaMA on megatron-core TP layers (``tp``), as a DeepSpeed pipeline when ``pp`` > 1; ZeRO-1."""
    import megatron_shaping
    from megatron_shaping.model import LlamaModel
    from megatron_shaping.model.parallel import init_parallel
    tp, pp = job.get("tp", 1), job.get("pp", 1)
    ctx = init_parallel(tp=tp, pp=pp)
    mb = job.get("micro", 2)
    cfg = {"train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": GLOBAL_BATCH // (mb * ctx.dp),
           "steps_per_print": 10 ** 9, "gradient_clipping": 0.0, "zero_optimization": {"stage": job.get("stage", 1)},
           "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
           "gradient_shaping": dict(job["shaping"])}
    if pp > 1:
        from megatron_shaping.model.pipeline import build_pipeline_model
        module = build_pipeline_model(llama_cfg(), ctx.topology, seed=1234)
    else:
        module = LlamaModel(llama_cfg(), seed=1234)
    opt = torch.optim.AdamW(module.parameters(), lr=job.get("lr", 0.01), weight_decay=0.01)
    engine, _, _, _ = megatron_shaping.initialize(model=module, optimizer=opt, config=cfg,
                                                  mpu=None if pp > 1 else ctx.mpu)
    engine._test_ctx = ctx
    return engine


def train_llama(engine, job, start, end):
    import deepspeed.comm as dist
    ctx = engine._test_ctx
    dp_rank = ctx.mpu.get_data_parallel_rank()
    mb, gas = job.get("micro", 2), engine.gradient_accumulation_steps()
    cfg = llama_cfg()
    losses = []
    for step in range(start, end):
        g = torch.Generator().manual_seed(100 + step)
        text = torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, cfg.seq_length + 1), generator=g)
        tokens, labels, mask = text[:, :-1].contiguous(), text[:, 1:].contiguous(), torch.ones(GLOBAL_BATCH,
                                                                                               cfg.seq_length)
        micro = []
        for m in range(gas):
            i = (m * ctx.dp + dp_rank) * mb
            micro.append((tokens[i:i + mb], (labels[i:i + mb], mask[i:i + mb])))
        if ctx.pp > 1:
            loss = engine.train_batch(iter(micro))
        else:
            loss = torch.zeros(())
            for t, (lab, msk) in micro:
                lo = engine(t, lab, msk)
                engine.backward(lo)
                engine.step()
                loss += lo.detach() / gas
            dist.all_reduce(loss, group=ctx.mpu.get_data_parallel_group())
            loss = loss / ctx.dp
        losses.append(float(loss))
    return losses


def build(job, world):
    import megatron_shaping
    if job.get("model") == "llama":
        return build_llama(job, world)
    from deepspeed.utils import groups
    if groups.mpu is not None:
        # A LLaMA job left DeepSpeed's module-level TP/PP groups behind (test-only reset: the
        # groups themselves stay alive).
        groups._release_process_group_references(None)
    model = make_model(job.get("extra_layer", False))
    opt = torch.optim.AdamW(model.parameters(), lr=job.get("lr", 0.01), weight_decay=0.01)
    engine, _, _, _ = megatron_shaping.initialize(model=model, optimizer=opt, config=ds_config(job, world))
    return engine


def train(engine, job, world, rank, start, end, on_step=None):
    """Steps [start, end); returns the per-step global mean loss (all-reduced)."""
    import deepspeed.comm as dist
    if job.get("model") == "llama":
        return train_llama(engine, job, start, end)
    mb = job.get("micro", 2)
    gas = engine.gradient_accumulation_steps()
    dtype = torch.bfloat16 if job.get("dtype") == "bf16" else torch.float32
    losses = []
    for step in range(start, end):
        x, y = batch(step)
        f = grad_factor(job, step)
        total = torch.zeros(())
        for m in range(gas):
            i = (m * world + rank) * mb
            out = engine(x[i:i + mb].to(dtype))
            loss = torch.nn.functional.mse_loss(out.float(), y[i:i + mb])
            if f is not None:
                loss = loss * f
            total += loss.detach()
            engine.backward(loss)
            if on_step is not None:
                on_step(step, m)
            engine.step()
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total) / (gas * world))
    return losses


def full_params(engine):
    """The parameters as the next forward sees them: ZeRO-3 gathered; with TP/PP, this rank's
    own shards and stage (each rank compares its own with its own reference)."""
    import deepspeed
    params = list(engine.module.parameters())
    if hasattr(params[0], "ds_id"):
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def state_of(engine):
    return engine.gradient_shaping.state_dict()


def states_equal(a, b):
    if [m["type"] for m in a["members"]] != [m["type"] for m in b["members"]] or a["groups"] != b["groups"]:
        return False
    for ma, mb in zip(a["members"], b["members"]):
        for k in ma["fields"]:
            if not torch.equal(ma["fields"][k], mb["fields"][k]):
                return False
    return a["steps"] == b["steps"] and a["skipped"] == b["skipped"]


def states_rel(a, b):
    worst = 0.0
    for ma, mb in zip(a["members"], b["members"]):
        for k in ma["fields"]:
            x, y = ma["fields"][k].double(), mb["fields"][k].double()
            worst = max(worst, float(((x - y).abs() / y.abs().clamp_min(1e-12)).max()) if x.numel() else 0.0)
    return worst


def params_rel(a, b):
    return max(float((a[n].double() - b[n].double()).abs().max() / b[n].double().abs().max().clamp_min(1e-12))
               for n in b)


def compare(res, losses, params, state, ref, prefix=""):
    """Fill ``res`` with exact and relative comparisons against a stored reference."""
    tail = ref["losses"][-len(losses):]
    res[prefix + "losses_equal"] = losses == tail
    res[prefix + "loss_rel"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, tail))
    res[prefix + "params_equal"] = all(torch.equal(params[n], ref["params"][n]) for n in ref["params"])
    res[prefix + "params_rel"] = params_rel(params, ref["params"])
    if state is not None and ref.get("state") is not None:
        res[prefix + "state_equal"] = states_equal(state, ref["state"])
        res[prefix + "state_rel"] = states_rel(state, ref["state"])


def all_ranks(flag: bool, world: int) -> bool:
    import deepspeed.comm as dist
    t = torch.tensor([0 if flag else 1])
    if world > 1:
        dist.all_reduce(t)
    return int(t) == 0


# ----------------------------------------------------------------------------------- jobs
def load_ref(job, rank):
    """A DeepSpeed reference run stores one file per rank; the single-process one, one file."""
    per_rank = f"{job['ref']}.rank{rank}"
    return torch.load(per_rank if os.path.exists(per_rank) else job["ref"], weights_only=False)


def job_reference(job, world, rank):
    engine = build(job, world)
    losses = train(engine, job, world, rank, 0, job["n"] + job["m"])
    out = {"losses": losses, "params": full_params(engine),
           "state": state_of(engine) if job.get("shaping") else None}
    torch.save(out, f"{job['ref']}.rank{rank}")     # per rank: TP shards and pipeline stages differ
    return {"global_steps": engine.global_steps}


def job_torch_ref(job, world, rank):
    """Single process, whole batch, plain AdamW (+ GradientShaper when shaping)."""
    from megatron_shaping import GradientShaper
    model = make_model(job.get("extra_layer", False))
    opt = torch.optim.AdamW(model.parameters(), lr=job.get("lr", 0.01), weight_decay=0.01)
    spec = job["shaping"]
    shaper = GradientShaper(model.named_parameters(), spec, granularity=spec.get("granularity"),
                            block_pattern=spec.get("block_pattern"))
    losses = []
    for step in range(job["n"] + job["m"]):
        x, y = batch(step)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        losses.append(float(loss))
        if shaper.apply_() is not None:
            opt.step()
    out = {"losses": losses, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
           "state": shaper.state_dict()}
    if rank == 0:
        torch.save(out, job["ref"])
    return {}


def job_save(job, world, rank):
    """Train N steps and save. With ``m``, go on to N+M in the same processes: that
    uninterrupted continuation is stored as the reference of the later resume (``ref``), and
    compared with a run that never saved (``pure_ref``) when given: saving changes nothing."""
    engine = build(job, world)
    losses = train(engine, job, world, rank, 0, job["n"])
    saved_state = state_of(engine) if job.get("shaping") else None
    engine.save_checkpoint(job["dir"], tag=job.get("tag"))
    res = {"global_steps": engine.global_steps}
    if saved_state is not None:
        from megatron_shaping.checkpoint import STATE_FILE, read_state_file
        tag = job.get("tag") or f"global_step{job['n']}"
        on_disk = read_state_file(os.path.join(job["dir"], tag, STATE_FILE))
        res["file_matches_state"] = all_ranks(states_equal(on_disk["state"], saved_state), world)
        res["meta"] = on_disk["meta"]
    if job.get("m"):
        losses += train(engine, job, world, rank, job["n"], job["n"] + job["m"])
        out = {"losses": losses, "params": full_params(engine), "state": state_of(engine) if saved_state else None}
        torch.save(out, f"{job['ref']}.rank{rank}")
        if job.get("pure_ref"):
            compare(res, losses, out["params"], out["state"], load_ref(dict(job, ref=job["pure_ref"]), rank))
            for k in ("losses_equal", "params_equal", "state_equal"):
                res[k] = all_ranks(res[k], world)
    return res


def job_resume(job, world, rank):
    from megatron_shaping.checkpoint import STATE_FILE, read_state_file
    engine = build(job, world)
    path, _ = engine.load_checkpoint(job["dir"], tag=job.get("tag"))
    res = {"load_path": path, "global_steps_after_load": engine.global_steps}
    ck = engine.gradient_shaping.checkpointing
    on_disk = read_state_file(ck.last_load["path"])
    res["loaded_state_equal_file"] = all_ranks(states_equal(state_of(engine), on_disk["state"]), world)
    if job.get("negative_control"):
        # What a resume without the shaper state would do: the comparison must notice.
        sess = engine.gradient_shaping.session
        sess.state = sess.shaper.init(sess.layout)
    losses = train(engine, job, world, rank, job["n"], job["n"] + job["m"])
    ref = load_ref(job, rank)
    compare(res, losses, full_params(engine), state_of(engine), ref)
    if job.get("debug"):
        res["losses"], res["ref_losses"] = losses, ref["losses"]
    for k in ("losses_equal", "params_equal", "state_equal"):
        res[k] = all_ranks(res[k], world)
    res["skipped"] = engine.gradient_shaping.session.skipped
    return res


def job_load_error(job, world, rank):
    import logging
    engine = build(job, world)
    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    h = Grab(level=logging.WARNING)
    logging.getLogger("megatron_shaping").addHandler(h)
    res = {}
    try:
        kw = dict(job.get("load_kwargs") or {})
        if job.get("allow_fresh_arg"):
            kw["allow_fresh_state"] = True
        from megatron_shaping.integrations.deepspeed.checkpointing import load_checkpoint
        path, _ = load_checkpoint(engine, job["dir"], tag=job.get("tag"), **kw)
        res["loaded"] = path is not None
        res["last_load"] = {k: v for k, v in engine.gradient_shaping.checkpointing.last_load.items() if k != "meta"}
        res["global_steps"] = engine.global_steps
        res["steps"] = engine.gradient_shaping.session.steps
        if job.get("then_train"):
            train(engine, job, world, rank, engine.global_steps, engine.global_steps + 2)
            res["trained_to"] = engine.global_steps
    except Exception as e:
        res["error_type"] = type(e).__name__
        res["error"] = str(e)
    finally:
        logging.getLogger("megatron_shaping").removeHandler(h)
    res["warnings"] = [r for r in records if "gradient_shaping" in r]
    return res


def job_nonfinite(job, world, rank):
    engine = build(job, world)
    sess = engine.gradient_shaping.session
    res = {"states_untouched": True, "params_untouched": True}
    bad = {int(k) for k, v in job["factors"].items() if v != v or abs(v) == float("inf")}
    try:
        for step in range(job["steps"]):
            before_state, before_params = state_of(engine), full_params(engine)
            train(engine, job, world, rank, step, step + 1)
            if step in bad:
                res["states_untouched"] &= states_equal(state_of(engine), before_state) or \
                    _equal_but_counter(state_of(engine), before_state)
                res["params_untouched"] &= all(torch.equal(a, before_params[n]) for n, a in full_params(engine).items())
    except Exception as e:
        res["error_type"] = type(e).__name__
        res["error"] = str(e)
        res["at_step"] = engine.global_steps
        return res
    p = full_params(engine)
    res.update(skipped_steps=engine.skipped_steps, session_skipped=sess.skipped, session_steps=sess.steps,
               global_steps=engine.global_steps, params_finite=all(bool(torch.isfinite(t).all()) for t in p.values()),
               state_finite=_finite(state_of(engine)))
    res["moved_after_skip"] = not all(torch.equal(a, before_params[n]) for n, a in p.items())
    return res


def _equal_but_counter(a, b):
    """Shaper state equal except the ``skipped`` counter."""
    a, b = dict(a), dict(b)
    a.pop("skipped"), b.pop("skipped")
    a["skipped"] = b["skipped"] = 0
    return states_equal(a, b)


def _finite(sd):
    from megatron_shaping.checkpoint import state_is_finite
    return state_is_finite(sd)


def job_fuzz(job, world, rank):
    engine = build(job, world)
    res = {"state_always_finite": True}
    for step in range(job["steps"]):
        train(engine, job, world, rank, step, step + 1)
        res["state_always_finite"] &= _finite(state_of(engine))
    p = full_params(engine)
    sess = engine.gradient_shaping.session
    res.update(params_finite=all(bool(torch.isfinite(t).all()) for t in p.values()), skipped=sess.skipped,
               steps=sess.steps, global_steps=engine.global_steps)
    return res


def job_train_save(job, world, rank):
    """Fault drill: resume from ``latest`` if present, train to ``steps`` saving every ``every``.
    ``kill = {"rank": r, "step": s, "when": "train" | "save"}`` makes rank r SIGKILL itself in
    the middle of step s's backward, or in the middle of writing its ZeRO shard at the save of
    step s (after a partial write)."""
    import deepspeed.comm as dist
    engine = build(job, world)
    start = 0
    res = {}
    if os.path.isfile(os.path.join(job["dir"], "latest")):
        path, _ = engine.load_checkpoint(job["dir"])
        start = engine.global_steps
        res["resumed_from"] = os.path.basename(path) if path else None
    res["start"] = start
    kill = job.get("kill") or {}
    me = kill.get("rank") == rank

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if me and kill.get("when") == "save":
        ce = engine.checkpoint_engine
        orig = ce.save

        def save(state_dict, path):
            if "optim_states" in os.path.basename(path) and engine.global_steps == kill["step"]:
                import io
                buf = io.BytesIO()
                torch.save(state_dict, buf)
                with open(path, "wb") as f:          # half a shard reaches the disk, then death
                    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                die()
            return orig(state_dict, path)
        ce.save = save

    def on_step(step, micro):
        if me and kill.get("when") == "train" and step == kill["step"]:
            die()

    losses = {}
    for step in range(start, job["steps"]):
        losses[step] = train(engine, job, world, rank, step, step + 1, on_step=on_step)[0]
        if (step + 1) % job["every"] == 0:
            engine.save_checkpoint(job["dir"])
    dist.barrier()
    ref = load_ref(job, rank) if job.get("ref") else None
    if ref is not None:
        got = [losses[s] for s in range(start, job["steps"])]
        compare(res, got, full_params(engine), state_of(engine), ref)
        for k in ("losses_equal", "params_equal", "state_equal"):
            res[k] = all_ranks(res[k], world)
    res["global_steps"] = engine.global_steps
    return res


def job_latest_race(job, world, rank):
    """Is ``latest`` ever written while another rank is still writing its files? Rank 1 holds
    its ZeRO shard of the second save back until ``latest`` names the new tag (at most
    ``wait`` seconds) and records what ``latest`` said meanwhile."""
    import time
    import deepspeed.comm as dist
    engine = build(job, world)
    d = job["dir"]
    train(engine, job, world, rank, 0, 2)
    engine.save_checkpoint(d)
    train(engine, job, world, rank, 2, 4)
    seen = None
    if rank == 1:
        ce = engine.checkpoint_engine
        orig = ce.save

        def save(state_dict, path):
            nonlocal seen
            if "optim_states" in os.path.basename(path):
                t0 = time.time()
                while time.time() - t0 < job.get("wait", 3.0):
                    with open(os.path.join(d, "latest")) as f:
                        seen = f.read().strip()
                    if seen == "global_step4":
                        break
                    time.sleep(0.05)
            return orig(state_dict, path)
        ce.save = save
    engine.save_checkpoint(d)
    seen_all = [None] * world
    dist.all_gather_object(seen_all, seen)
    with open(os.path.join(d, "latest")) as f:
        final = f.read().strip()
    return {"latest_while_rank1_writing": seen_all[1], "latest_after_save": final}


JOBS = {"reference": job_reference, "torch_ref": job_torch_ref, "save": job_save, "resume": job_resume,
        "load_error": job_load_error, "nonfinite": job_nonfinite, "fuzz": job_fuzz, "train_save": job_train_save,
        "latest_race": job_latest_race}


def crash(e, job, rank):
    """A job that raised unexpectedly (``error_type``/``error`` alone are a job's expected errors)."""
    return {"error_type": type(e).__name__, "error": str(e), "crash": traceback.format_exc()[-3000:]}


def main():
    w = runner.start(items="--plan")
    for job, r in w.each(lambda job: JOBS[job["kind"]](job, w.world, w.rank), on_error=crash):
        r.update(name=job["name"], kind=job["kind"], world=w.world)
        w.write_lines([r], mode="a")     # job by job: a launch killed on purpose keeps what ran
        w.barrier()


if __name__ == "__main__":
    main()
    exit_process()      # not through finalization: megatron_shaping/shutdown.py
