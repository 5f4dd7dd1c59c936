#!/usr/bin/env python
"""Issue 7 evidence grid: do the shapers stabilise pretraining? (CPU scale)

One command, one process group for the whole grid (a DeepSpeed launch costs 15-20 s on CPU):

    bash tools/experiments/run_grid.sh                   # = deepspeed --num_gpus 2 tools/experiments/run_grid.py --out runs/grid
    deepspeed --num_gpus 2 tools/experiments/run_grid.py --out runs/grid --plan smoke

Every run goes through the real DeepSpeed engine (``megatron_shaping.initialize``, ZeRO-1,
2 data-parallel processes, gloo) on the default corpus (Python stdlib sources) with a LLaMA
built from megatron-core layers. Runs execute sequentially inside this one launch; each
finished run appends one JSON line to ``OUT/results.jsonl`` (rank 0), so an interrupted grid
resumes where it stopped (finished run ids are skipped). ``tools/experiments/analyze.py``
turns the JSONL into tables and plots.

Conditions (see ``build_plan``): base LR (AdamW and Adam), an AdamW LR sweep, injected gradient
spikes (the loss multiplied by k at chosen steps multiplies every gradient by k), fp16 with
dynamic loss scaling, simulated FP8. Each x every shaper x seeds.

fp16 on CPU: DeepSpeed refuses fp16 unless the accelerator reports support, so this runner
patches ``get_accelerator().is_fp16_supported`` and ``supported_dtypes`` (CPU has fp16 kernels
for matmul in torch; the loss scaler and the FP16 ZeRO path are DeepSpeed's own).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

if "OMP_NUM_THREADS" not in os.environ:
    _local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, _local)))

import torch  # noqa: E402

from megatron_shaping.shapers import REGISTRY, default_section  # noqa: E402

#: Every registered method (registry order: classic baselines first), after the unshaped baseline.
SHAPERS = ["none"] + list(REGISTRY)

#: Deviations from a method's documented defaults (docs/SHAPERS.md), where a default would silently
#: turn the method into something else on our short runs; each is said here.
GRID_PARAMS = {
    # max_grad_norm null: purely adaptive ZClip (the package default 1.0 would add a norm clip).
    # warmup 10 (package: 25) because our runs are short.
    "zclip": {"max_grad_norm": None, "warmup_steps": 10},
    # warmup_steps 10 (default 100 = longer than some of our runs).
    "adagc": {"warmup_steps": 10},
}


def _section(name: str) -> dict:
    section = default_section(name)
    section["params"].update(GRID_PARAMS.get(name, {}))
    return section


#: Shaper sections: every method at its defaults, except GRID_PARAMS.
SHAPER_SECTIONS = {name: _section(name) for name in REGISTRY}

SIZES = {
    # name: model overrides, steps, global batch, micro batch, eval iters
    # Sized on the shared 2-core machine (see docs/RESULTS.md): llama-micro fp32 ~0.3 s/step,
    # fp16 ~1.5 s/step (half matmuls on CPU), ~1.5 s engine set-up per run.
    "grid": dict(preset=str(ROOT / "tools" / "experiments" / "llama-micro.json"), steps=60, global_batch=8,
                 micro_batch=4, eval_iters=2, warmup=6),
    "smoke": dict(preset="llama-tiny", steps=6, global_batch=8, micro_batch=4, eval_iters=1, warmup=2),
}


def log0(*a):
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


# ---------------------------------------------------------------------------- the plan
def run_id(r: dict) -> str:
    return (f"{r['condition']}|{r['optimizer']}|{r['shaper']}|lr{r['lr']:g}|{r['precision']}"
            f"|{r['spikes']}|s{r['seed']}")


def build_plan(plan: str, seeds, base_lr: float, sweep, shapers=SHAPERS, sweep_extra_seeds=()):
    """The list of runs, in execution order (cheap and most important first, so that an
    interrupted grid still answers the main question)."""
    runs = []

    def add(condition, optimizer="AdamW", lr=base_lr, precision="fp32", spikes="none"):
        for seed in seeds:
            for s in shapers:
                runs.append(dict(condition=condition, optimizer=optimizer, shaper=s, lr=lr, precision=precision,
                                 spikes=spikes, seed=seed))

    if plan == "smoke":
        runs.append(dict(condition="smoke", optimizer="AdamW", shaper="none", lr=base_lr, precision="fp32",
                         spikes="none", seed=seeds[0]))
        runs.append(dict(condition="smoke", optimizer="AdamW", shaper="spamp", lr=base_lr, precision="fp16",
                         spikes="x5@2%", seed=seeds[0]))
        runs.append(dict(condition="smoke", optimizer="Adam", shaper="gradient_stabilizer", lr=base_lr,
                         precision="fp8", spikes="x100rare", seed=seeds[0]))
    else:
        _grid(add, base_lr, sweep)
        # More seeds where the outcome is a coin flip (the edge of stability): the whole AdamW
        # sweep, base LR included (as condition lr_sweep, so the base tables keep `seeds`).
        for seed in sweep_extra_seeds:
            for lr in sweep:
                for s in shapers:
                    runs.append(dict(condition="lr_sweep", optimizer="AdamW", shaper=s, lr=lr, precision="fp32",
                                     spikes="none", seed=seed))
    seen, out = set(), []
    for r in runs:
        r["id"] = run_id(r)
        if r["id"] not in seen:
            seen.add(r["id"])
            out.append(r)
    return out


def _grid(add, base_lr, sweep):
    add("base", "AdamW")
    add("base", "Adam")
    add("spikes", spikes="x5@2%")
    add("spikes", spikes="x100rare")
    for lr in sweep:
        if lr != base_lr:
            add("lr_sweep", lr=lr)
    add("fp8", precision="fp8")
    add("fp16", precision="fp16")      # last: 5x the cost of an fp32 run on CPU


def spike_steps(kind: str, steps: int, seed: int, warmup: int):
    """{step: factor}. 'x5@2%': 5x at 2% of the steps (at least one), drawn after warmup with
    a seed-fixed RNG (the same steps for every shaper); 'x100rare': 100x at 1/3 and 2/3."""
    if kind == "none":
        return {}
    if kind == "x5@2%":
        g = torch.Generator().manual_seed(10_000 + seed)
        k = max(1, round(0.02 * steps))
        cand = torch.arange(warmup, steps)
        pick = cand[torch.randperm(len(cand), generator=g)[:k]]
        return {int(s): 5.0 for s in pick}
    if kind == "x100rare":
        return {steps // 3: 100.0, (2 * steps) // 3: 100.0}
    raise ValueError(kind)


# ---------------------------------------------------------------------------- DeepSpeed config
def ds_config(run, size, dp: int) -> dict:
    accumulation = size["global_batch"] // (size["micro_batch"] * dp)
    if run["optimizer"] == "AdamW":
        opt = {"type": "AdamW", "params": {"lr": run["lr"], "betas": [0.9, 0.95], "eps": 1e-8,
                                           "weight_decay": 0.1, "torch_adam": True}}
    else:   # plain Adam, no weight decay (DeepSpeed's "Adam" is AdamW unless adam_w_mode is false)
        opt = {"type": "Adam", "params": {"lr": run["lr"], "betas": [0.9, 0.95], "eps": 1e-8,
                                          "weight_decay": 0.0, "adam_w_mode": False, "torch_adam": True}}
    cfg = {"train_batch_size": size["global_batch"], "train_micro_batch_size_per_gpu": size["micro_batch"],
           "gradient_accumulation_steps": accumulation, "gradient_clipping": 0.0, "optimizer": opt,
           "zero_optimization": {"stage": 1, "contiguous_gradients": True, "overlap_comm": False,
                                 "reduce_bucket_size": 50_000_000},
           "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    if run["precision"] == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 100,
                       "hysteresis": 2, "min_loss_scale": 1}
    if run["shaper"] != "none":
        cfg["gradient_shaping"] = json.loads(json.dumps(SHAPER_SECTIONS[run["shaper"]]))
    return cfg


def patch_cpu_fp16():
    """DeepSpeed's CPU accelerator says no to fp16; the runner says yes (documented)."""
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        acc.is_fp16_supported = lambda: True
        dtypes = acc.supported_dtypes()
        acc.supported_dtypes = lambda: list(dict.fromkeys(list(dtypes) + [torch.float16]))


# ---------------------------------------------------------------------------- metrics
def spike_count(losses, factor=1.5, window=20):
    """Loss spikes: steps t >= 10 whose loss exceeds ``factor`` x the median of the previous
    ``window`` finite losses (a non-finite loss counts as a spike)."""
    n = 0
    for t in range(10, len(losses)):
        prev = [x for x in losses[max(0, t - window):t] if math.isfinite(x)]
        if not math.isfinite(losses[t]):
            n += 1
        elif prev and losses[t] > factor * sorted(prev)[len(prev) // 2]:
            n += 1
    return n


# ---------------------------------------------------------------------------- one run
def train_one(run, size, ctx, data, args):
    import torch.distributed as dist
    from megatron_shaping.integrations.deepspeed import initialize
    from megatron_shaping.model import LlamaModel, load_preset

    pretrain = data["pretrain"]
    steps, warmup = size["steps"], size["warmup"]
    lr_args = argparse.Namespace(lr=run["lr"], min_lr=run["lr"] / 10, lr_warmup_iters=warmup,
                                 lr_decay_iters=steps, train_iters=steps)
    fp8 = run["precision"] == "fp8"
    model_cfg = load_preset(size["preset"], vocab_size=data["tokenizer"].vocab_size, fp8=fp8 or None,
                            fp8_backend="sim" if fp8 else None)
    torch.manual_seed(run["seed"])
    model = LlamaModel(model_cfg, seed=run["seed"])
    cfg = ds_config(run, size, ctx.dp)
    engine, _, _, _ = initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=cfg,
        mpu=ctx.mpu, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda it: pretrain.lr_at(it, lr_args) / run["lr"]))
    shaping_log = pretrain.ShapingLog(engine)
    schedule, dp_group = data["schedule"], ctx.mpu.get_data_parallel_group()
    spikes = spike_steps(run["spikes"], steps, run["seed"], warmup)

    def evaluate():
        engine.eval()
        with torch.no_grad():
            total = torch.stack([engine(mb["tokens"], mb["labels"], mb["loss_mask"]).float()
                                 for b in data["valid_batches"] for mb in b]).mean()
        engine.train()
        dist.all_reduce(total, group=dp_group)
        return float(total) / ctx.dp

    t0 = time.time()
    losses, grad_norms, stopped_early = [], [], None
    for it in range(steps):
        batches = schedule.micro_batches(data["train_ds"], it)
        k = spikes.get(it, 1.0)
        step_losses = []
        for mb in batches:
            loss = engine(mb["tokens"], mb["labels"], mb["loss_mask"])
            engine.backward(loss * k if k != 1.0 else loss)
            engine.step()
            step_losses.append(loss.detach().float())
        loss = torch.stack(step_losses).mean()
        dist.all_reduce(loss, group=dp_group)
        losses.append(float(loss) / ctx.dp)
        rec = getattr(getattr(engine, "gradient_shaping", None), "session", None)
        last = getattr(rec, "last", None) if rec is not None else None
        try:
            grad_norms.append(float(last.stats_before.global_norm()) if last is not None else None)
        except Exception:
            grad_norms.append(None)
        # Early stop of a run that has clearly diverged (saves the budget for the rest of the
        # grid): 5 consecutive non-finite losses, or 10 consecutive losses above the initial one
        # after the first 20 % of training.
        tail = losses[-10:]
        if len(losses) >= 5 and not any(math.isfinite(x) for x in losses[-5:]):
            stopped_early = "nonfinite"
        elif it >= steps // 5 and len(tail) == 10 and all(x > losses[0] for x in tail if math.isfinite(x)):
            stopped_early = "above_initial"
        if stopped_early:
            break
    train_time = time.time() - t0
    val = evaluate()
    skipped = int(getattr(engine, "skipped_steps", 0))
    summary = shaping_log.summary()
    finite = [x for x in losses if math.isfinite(x)]
    last10 = losses[-10:]
    final_train = sum(last10) / len(last10) if last10 else float("nan")
    diverged = (stopped_early is not None or not math.isfinite(val) or not math.isfinite(final_train)
                or final_train > losses[0] or val > data["initial_val"])
    out = dict(run, steps=steps, steps_done=len(losses), tokens_per_step=size["global_batch"] * data["seq"],
               train_loss=[round(x, 5) if math.isfinite(x) else str(x) for x in losses],
               grad_norm_before_shaping=[round(x, 5) if x is not None and math.isfinite(x) else None
                                         for x in grad_norms],
               spike_steps=sorted(spikes), initial_train_loss=losses[0], final_train_loss=final_train,
               final_val_loss=val, final_val_ppl=math.exp(val) if math.isfinite(val) and val < 700 else float("inf"),
               initial_val_loss=data["initial_val"], loss_spikes=spike_count(losses),
               loss_spikes_1p2=spike_count(losses, 1.2), diverged=bool(diverged), stopped_early=stopped_early,
               nonfinite_losses=len(losses) - len(finite), skipped_steps=skipped,
               shaping_skipped=summary.get("shaping_skipped", 0),
               steps_with_scaled_groups=summary.get("steps_with_scaled_groups", 0),
               loss_scale=float(engine.optimizer.cur_scale) if hasattr(engine.optimizer, "cur_scale") else None,
               wall_time_s=round(train_time, 2), model=model_cfg.name, params=model_cfg.num_parameters(),
               ds_config=cfg)
    del engine, model, shaping_log
    gc.collect()
    return out


# ---------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/grid")
    p.add_argument("--plan", choices=["grid", "smoke"], default="grid")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--base-lr", type=float, default=3e-3)
    p.add_argument("--sweep", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0],
                   help="AdamW learning rates (the base LR is one of them and is not rerun)")
    p.add_argument("--shapers", nargs="+", default=SHAPERS)
    p.add_argument("--sweep-extra-seeds", type=int, nargs="*", default=[3],
                   help="extra seeds for the AdamW LR sweep only (run last)")
    p.add_argument("--steps", type=int, default=None, help="override the plan's steps")
    p.add_argument("--preset", default=None, help="override the plan's model preset (name or JSON path)")
    p.add_argument("--only", default=None, help="run only ids containing this substring")
    p.add_argument("--max-runs", type=int, default=0,
                   help="exit after this many runs (0: no limit); run_grid.sh relaunches until OUT/DONE exists. "
                        "Each run leaks ~10 MB per rank inside DeepSpeed/torch, so long grids are cut into launches")
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = p.parse_args(argv)

    import logging

    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from megatron_shaping.data import BatchSchedule, SentencePieceTokenizer, build_gpt_datasets, prepare_stdlib_corpus
    from megatron_shaping.model import load_preset
    from megatron_shaping.model.parallel import init_parallel

    spec = importlib.util.spec_from_file_location("ms_pretrain", ROOT / "launch" / "pretrain.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)

    patch_cpu_fp16()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(logging.WARNING)
    logging.getLogger("megatron_shaping").setLevel(logging.ERROR)

    on_cpu = get_accelerator().device_name() == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else get_accelerator().communication_backend_name())
    ctx = init_parallel(tp=1, pp=1)
    size = dict(SIZES[args.plan])
    if args.steps:
        size["steps"] = args.steps
    if args.preset:
        size["preset"] = args.preset

    corpus = prepare_stdlib_corpus(vocab_size=4096, log=log0)
    tokenizer = SentencePieceTokenizer(corpus.tokenizer_model)
    seq = load_preset(size["preset"], vocab_size=tokenizer.vocab_size).seq_length
    schedule = BatchSchedule(size["global_batch"], size["micro_batch"], ctx.mpu.get_data_parallel_rank(), ctx.dp)
    train_ds, valid_ds = build_gpt_datasets(
        [corpus.data_prefix], tokenizer, seq, 1234, train_samples=size["steps"] * size["global_batch"],
        valid_samples=size["eval_iters"] * size["global_batch"], cache_dir=str(corpus.directory / "index-cache"))
    data = dict(pretrain=pretrain, tokenizer=tokenizer, schedule=schedule, train_ds=train_ds, seq=seq,
                valid_batches=[schedule.micro_batches(valid_ds, i) for i in range(size["eval_iters"])],
                initial_val=math.log(tokenizer.vocab_size))

    out_dir = ROOT / args.out if not os.path.isabs(args.out) else Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.jsonl"
    done = set()
    if results.exists():
        for line in results.read_text().splitlines():
            try:
                done.add(json.loads(line)["id"])
            except (ValueError, KeyError):
                pass      # a line cut by an interruption: that run is redone
    plan = build_plan(args.plan, args.seeds, args.base_lr, args.sweep, args.shapers, args.sweep_extra_seeds)
    if args.only:
        plan = [r for r in plan if args.only in r["id"]]
    todo = [r for r in plan if r["id"] not in done]
    remaining = len(todo)
    if args.max_runs:
        todo = todo[:args.max_runs]
    dist.barrier()
    if dist.get_rank() == 0 and todo and (out_dir / "DONE").exists():
        (out_dir / "DONE").unlink()      # the plan grew (new arguments): not done any more
    head, tree_diff = subprocess_head(), tree_diff_sha1()
    if dist.get_rank() == 0:
        (out_dir / "meta.json").write_text(json.dumps(dict(
            commit=head, plan=args.plan, size=size, seeds=args.seeds, base_lr=args.base_lr, sweep=args.sweep,
            sweep_extra_seeds=args.sweep_extra_seeds, shapers=args.shapers, shaper_sections=SHAPER_SECTIONS, world_size=dist.get_world_size(),
            torch=torch.__version__, deepspeed=deepspeed.__version__, runs_planned=len(plan)), indent=1))
    log0(f"[grid] {len(plan)} runs planned, {len(plan) - len(todo)} already done, {len(todo)} to run; "
         f"size {size}; world {dist.get_world_size()}; commit {head}")
    t_grid = time.time()
    for i, run in enumerate(todo):
        t = time.time()
        try:
            res = train_one(run, size, ctx, data, args)
        except Exception as e:      # record and go on: one broken configuration must not stop the grid
            import traceback
            traceback.print_exc()
            res = dict(run, error=f"{type(e).__name__}: {e}")
            gc.collect()
        res["commit"] = head
        res["tree_diff_sha1"] = tree_diff
        if dist.get_rank() == 0:
            with open(results, "a") as f:
                f.write(json.dumps(res) + "\n")
        log0(f"[grid] {i + 1}/{len(todo)} {run['id']}: "
             + (f"ERROR {res['error']}" if "error" in res else
                f"val {res['final_val_loss']:.4f} train {res['final_train_loss']:.4f} spikes {res['loss_spikes']} "
                f"diverged {res['diverged']} skipped {res['skipped_steps']}")
             + f" | {time.time() - t:.1f}s (grid {time.time() - t_grid:.0f}s)")
        dist.barrier()
    if len(todo) == remaining and dist.get_rank() == 0:
        (out_dir / "DONE").write_text(f"{len(plan)} runs\n")
    log0("[grid] done" if len(todo) == remaining else f"[grid] stopping after {len(todo)} runs (--max-runs)")


def tree_diff_sha1() -> str:
    """sha1 of the uncommitted changes to the code the runs import (other engineers share the
    tree): '' when megatron_shaping/ and launch/pretrain.py are clean at launch time."""
    import hashlib
    import subprocess
    try:
        d = subprocess.run(["git", "diff", "HEAD", "--", "megatron_shaping", "launch/pretrain.py"], cwd=ROOT,
                           capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return hashlib.sha1(d.encode()).hexdigest() if d else ""


def subprocess_head() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
