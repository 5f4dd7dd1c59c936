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

from megatron_shaping.training import log0  # noqa: E402

from megatron_shaping.shapers import REGISTRY, default_section  # noqa: E402
from megatron_shaping.shutdown import exit_process  # noqa: E402

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
class _Record:
    """The grid's per-iteration hook for Trainer.fit: the gradient norm before shaping, and the
    early stop of a run that has clearly diverged (saves the budget for the rest of the grid):
    5 consecutive non-finite losses, or 10 consecutive losses above the initial one after the
    first 20 % of training."""

    def __init__(self, engine, steps: int):
        self.engine, self.steps, self.grad_norms = engine, steps, []

    def __call__(self, it, loss, history):
        rec = getattr(getattr(self.engine, "gradient_shaping", None), "session", None)
        last = getattr(rec, "last", None) if rec is not None else None
        try:
            self.grad_norms.append(float(last.stats_before.global_norm()) if last is not None else None)
        except Exception:
            self.grad_norms.append(None)
        losses = history.losses
        tail = losses[-10:]
        if len(losses) >= 5 and not any(math.isfinite(x) for x in losses[-5:]):
            return "nonfinite"
        if it >= self.steps // 5 and len(tail) == 10 and all(x > losses[0] for x in tail if math.isfinite(x)):
            return "above_initial"
        return None


def _engine_for(run, size, ctx, data):
    from megatron_shaping import training
    from megatron_shaping.model import LlamaModel, load_preset
    steps, warmup = size["steps"], size["warmup"]
    lr_args = argparse.Namespace(lr=run["lr"], min_lr=run["lr"] / 10, lr_warmup_iters=warmup,
                                 lr_decay_iters=steps, train_iters=steps)
    fp8 = run["precision"] == "fp8"
    model_cfg = load_preset(size["preset"], vocab_size=data["tokenizer"].vocab_size, fp8=fp8 or None,
                            fp8_backend="sim" if fp8 else None)
    torch.manual_seed(run["seed"])
    model = LlamaModel(model_cfg, seed=run["seed"])
    cfg = ds_config(run, size, ctx.dp)
    return training.build_engine(model, cfg, ctx, training.lr_scheduler(lr_args)), model_cfg, cfg


def train_one(run, size, ctx, data, args):
    from megatron_shaping import training
    steps = size["steps"]
    engine, model_cfg, cfg = _engine_for(run, size, ctx, data)
    trainer = training.Trainer(engine, ctx, data["data"], steps, size["global_batch"] * data["seq"],
                               training.Intervals(log=0, eval=0, eval_at_start=False),
                               log=lambda *a: None, progress=False)
    spikes = spike_steps(run["spikes"], steps, run["seed"], size["warmup"])
    record = _Record(engine, steps)
    h = trainer.fit(loss_factors=spikes, on_step=record)
    out = _result(run, size, data, h, record.grad_norms, spikes, trainer.shaping_log.summary(), engine)
    out.update(wall_time_s=round(h.train_time_s, 2), model=model_cfg.name, params=model_cfg.num_parameters(),
               ds_config=cfg)
    del engine, trainer, record
    gc.collect()
    return out


def _result(run, size, data, h, grad_norms, spikes, summary, engine) -> dict:
    """One line of results.jsonl."""
    losses, val = h.losses, h.val[-1][1]
    finite = [x for x in losses if math.isfinite(x)]
    last10 = losses[-10:]
    final_train = sum(last10) / len(last10) if last10 else float("nan")
    diverged = (h.stopped_early is not None or not math.isfinite(val) or not math.isfinite(final_train)
                or final_train > losses[0] or val > data["initial_val"])
    return dict(run, steps=size["steps"], steps_done=len(losses), tokens_per_step=size["global_batch"] * data["seq"],
                train_loss=[round(x, 5) if math.isfinite(x) else str(x) for x in losses],
                grad_norm_before_shaping=[round(x, 5) if x is not None and math.isfinite(x) else None
                                          for x in grad_norms],
                spike_steps=sorted(spikes), initial_train_loss=losses[0], final_train_loss=final_train,
                final_val_loss=val, final_val_ppl=math.exp(val) if math.isfinite(val) and val < 700 else float("inf"),
                initial_val_loss=data["initial_val"], loss_spikes=spike_count(losses),
                loss_spikes_1p2=spike_count(losses, 1.2), diverged=bool(diverged), stopped_early=h.stopped_early,
                nonfinite_losses=len(losses) - len(finite), skipped_steps=int(getattr(engine, "skipped_steps", 0)),
                shaping_skipped=summary.get("shaping_skipped", 0),
                steps_with_scaled_groups=summary.get("steps_with_scaled_groups", 0),
                loss_scale=float(engine.optimizer.cur_scale) if hasattr(engine.optimizer, "cur_scale") else None)


# ---------------------------------------------------------------------------- main
def parse_args(argv=None):
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
    return p.parse_args(argv)


def setup(args):
    """Distributed start-up (quiet loggers, fp16 allowed on CPU) and the shared data: (ctx, size, data)."""
    import logging

    from megatron_shaping import training
    from megatron_shaping.model import load_preset

    patch_cpu_fp16()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(logging.WARNING)
    logging.getLogger("megatron_shaping").setLevel(logging.ERROR)

    ctx = training.init_distributed(1, 1, args.local_rank)
    size = dict(SIZES[args.plan])
    if args.steps:
        size["steps"] = args.steps
    if args.preset:
        size["preset"] = args.preset
    corpus = training.open_corpus(vocab_size=4096)
    tokenizer = corpus.tokenizer
    seq = load_preset(size["preset"], vocab_size=tokenizer.vocab_size).seq_length
    train_data = training.build_data(corpus, ctx, seq, 1234, size["steps"], size["global_batch"], size["micro_batch"],
                                     size["eval_iters"])
    data = dict(tokenizer=tokenizer, data=train_data, seq=seq, initial_val=math.log(tokenizer.vocab_size))
    return ctx, size, data


def plan_todo(args, results: Path):
    """(plan, runs still to do in this launch, runs still to do in all)."""
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
    return plan, todo, remaining


def write_meta(out_dir: Path, args, size, plan, head: str) -> None:
    import deepspeed
    import torch.distributed as dist
    (out_dir / "meta.json").write_text(json.dumps(dict(
        commit=head, plan=args.plan, size=size, seeds=args.seeds, base_lr=args.base_lr, sweep=args.sweep,
        sweep_extra_seeds=args.sweep_extra_seeds, shapers=args.shapers, shaper_sections=SHAPER_SECTIONS,
        world_size=dist.get_world_size(), torch=torch.__version__, deepspeed=deepspeed.__version__,
        runs_planned=len(plan)), indent=1))


def run_and_record(i, n, run, size, ctx, data, args, results: Path, head: str, tree_diff: str, t_grid: float):
    """Train one run and append its line to results.jsonl (an error is recorded, not raised)."""
    import torch.distributed as dist
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
    log0(f"[grid] {i + 1}/{n} {run['id']}: "
         + (f"ERROR {res['error']}" if "error" in res else
            f"val {res['final_val_loss']:.4f} train {res['final_train_loss']:.4f} spikes {res['loss_spikes']} "
            f"diverged {res['diverged']} skipped {res['skipped_steps']}")
         + f" | {time.time() - t:.1f}s (grid {time.time() - t_grid:.0f}s)")


def main(argv=None):
    import torch.distributed as dist
    args = parse_args(argv)
    ctx, size, data = setup(args)
    out_dir = ROOT / args.out if not os.path.isabs(args.out) else Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.jsonl"
    plan, todo, remaining = plan_todo(args, results)
    dist.barrier()
    if dist.get_rank() == 0 and todo and (out_dir / "DONE").exists():
        (out_dir / "DONE").unlink()      # the plan grew (new arguments): not done any more
    head, tree_diff = subprocess_head(), tree_diff_sha1()
    if dist.get_rank() == 0:
        write_meta(out_dir, args, size, plan, head)
    log0(f"[grid] {len(plan)} runs planned, {len(plan) - len(todo)} already done, {len(todo)} to run; "
         f"size {size}; world {dist.get_world_size()}; commit {head}")
    t_grid = time.time()
    for i, run in enumerate(todo):
        run_and_record(i, len(todo), run, size, ctx, data, args, results, head, tree_diff, t_grid)
        dist.barrier()
    if len(todo) == remaining and dist.get_rank() == 0:
        (out_dir / "DONE").write_text(f"{len(plan)} runs\n")
    log0("[grid] done" if len(todo) == remaining else f"[grid] stopping after {len(todo)} runs (--max-runs)")


def tree_diff_sha1() -> str:
    """sha1 of the uncommitted changes to the code the runs import (other engineers share the
    tree): '' when megatron_shaping/ (the training loop included) is clean at launch time."""
    import hashlib
    import subprocess
    try:
        d = subprocess.run(["git", "diff", "HEAD", "--", "megatron_shaping"], cwd=ROOT,
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
    exit_process()      # not through finalization: megatron_shaping/shutdown.py
