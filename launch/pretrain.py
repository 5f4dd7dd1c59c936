#!/usr/bin/env python
"""Pretrain a LLaMA with DeepSpeed and gradient shaping.

    deepspeed --num_gpus 2 launch/pretrain.py --model-preset llama-tiny \\
        --deepspeed_config configs/deepspeed/zero1_bf16_gradient_stabilizer.json \\
        --micro-batch-size 4 --global-batch-size 16 --train-iters 200 --lr 3e-3

Arguments follow Megatron-LM's names. Without ``--data-path`` it trains on the running
interpreter's standard-library sources (tokenizer trained and corpus tokenised on first use,
cached under $MEGATRON_SHAPING_CACHE or ./cache). The DeepSpeed config's "gradient_shaping"
section selects the shaper; ``megatron_shaping.initialize`` attaches it.

Batch sizes, the learning rate and the schedule come from the command line and override the
DeepSpeed config (``train_batch_size``, ``train_micro_batch_size_per_gpu``,
``gradient_accumulation_steps``, ``optimizer.params.lr``), as Megatron-DeepSpeed does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if "OMP_NUM_THREADS" not in os.environ:
    # Split the cores between the processes of this node, before torch starts its thread
    # pools: on CPU, oversubscribed ranks waiting in gloo collectives slow each other down
    # several-fold (torch.set_num_threads after import does not cover every pool).
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
    _local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, _local)))

import warnings  # noqa: E402

# megatron-core warns once per module that the GPU fast paths are absent; on CPU that is expected
# and the repeated lines would bury the training log.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

import torch  # noqa: E402


# ---------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    import deepspeed
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model-preset", default="llama-tiny", help="configs/models/NAME.json or a JSON path")
    g.add_argument("--seq-length", type=int, default=None, help="default: the preset's")
    g.add_argument("--fp8", action="store_true", help="FP8 in the transformer linears (simulated on CPU)")
    g.add_argument("--fp8-backend", choices=["auto", "sim", "te"], default="auto")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=16)
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=3e-4)
    g.add_argument("--lr-warmup-iters", type=int, default=10)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="indexed dataset prefix(es), optionally weighted: 'W1 P1 W2 P2' (default: stdlib corpus)")
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece .model (required with --data-path)")
    g.add_argument("--split", default="98,2,0", help="train,valid,test weights (Megatron's --split)")
    g.add_argument("--data-cache-path", default=None, help="where dataset indices are cached")
    g.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary for the default corpus")
    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--shaping-fresh-state", action="store_true",
                   help="resume from a checkpoint that has no shaper state (made without shaping or by an "
                        "older format) with a fresh shaper instead of stopping; logged loudly")
    g.add_argument("--save-interval", type=int, default=0, help="0: only at the end (when --save)")
    g.add_argument("--eval-interval", type=int, default=50)
    g.add_argument("--eval-iters", type=int, default=4)
    g.add_argument("--log-interval", type=int, default=10)
    p = deepspeed.add_config_arguments(p)      # --deepspeed, --deepspeed_config
    args = p.parse_args(argv)
    if args.deepspeed_config is None:
        p.error("--deepspeed_config is required (see configs/deepspeed/)")
    if args.data_path and not args.tokenizer_model:
        p.error("--data-path needs --tokenizer-model (the tokenizer the data was preprocessed with)")
    return args


# ---------------------------------------------------------------------------- helpers
def log0(*a):
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def lr_at(it: int, args) -> float:
    """Linear warmup to --lr, then cosine decay to --min-lr at --lr-decay-iters (Megatron's
    'cosine' style), constant after."""
    decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters > 0 and it < args.lr_warmup_iters:
        return args.lr * (it + 1) / args.lr_warmup_iters
    span = max(1, decay_iters - args.lr_warmup_iters)
    progress = min(1.0, (it - args.lr_warmup_iters) / span)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1.0 + math.cos(math.pi * progress))


def load_ds_config(args, accumulation_steps: int, on_cpu: bool) -> dict:
    path = Path(args.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"--deepspeed_config {path} not found")
    with open(path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--deepspeed_config {path} is not valid JSON: {e}") from None
    cfg["train_batch_size"] = args.global_batch_size
    cfg["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    cfg["gradient_accumulation_steps"] = accumulation_steps
    cfg.setdefault("steps_per_print", 10 ** 9)      # this script prints its own log lines
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    opt.setdefault("params", {})["lr"] = args.lr
    if on_cpu and opt.get("type", "").lower() in ("adam", "adamw"):
        # DeepSpeed's FusedAdam is a GPU kernel; torch's AdamW is the CPU equivalent.
        opt["params"].setdefault("torch_adam", True)
    if on_cpu and cfg.get("fp16", {}).get("enabled", False):
        raise ValueError(f"{path} enables fp16, which DeepSpeed supports on GPUs only; "
                         f"on CPU use a bf16 config (configs/deepspeed/*_bf16_*.json)")
    cfg.pop("scheduler", None)                      # the schedule is --lr/--min-lr/--lr-warmup-iters
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if args.pipeline_model_parallel_size > 1 and stage > 1:
        raise ValueError(f"{path}: ZeRO stage {stage} cannot be combined with pipeline parallelism "
                         f"in DeepSpeed; use a ZeRO-0/1 config with --pipeline-model-parallel-size > 1")
    return cfg


def deepspeed_initialize(**kwargs):
    """``megatron_shaping.initialize``: deepspeed.initialize + the gradient_shaping section."""
    import megatron_shaping
    return megatron_shaping.initialize(**kwargs)


class ShapingLog:
    """Collects what the shaper did between two log lines (from engine.gradient_shaping's
    per-step callback): gradient norm before and after shaping, the smallest per-group factor,
    how many groups were scaled down, and skipped steps."""

    def __init__(self, engine):
        self.shaping = getattr(engine, "gradient_shaping", None)
        self.total_steps = self.total_skipped = 0
        self.total_scaled_steps = 0          # steps on which some group was scaled down
        self.reset()
        if self.shaping is not None:
            self.shaping.callbacks.append(self)

    def reset(self):
        self.steps = self.skipped = 0
        self.norm_before = self.norm_after = 0.0
        self.min_factor = float("inf")
        self.scaled = 0

    def __call__(self, shaping, record):
        if record is None:
            self.skipped += 1
            self.total_skipped += 1
            return
        self.steps += 1
        self.total_steps += 1
        self.norm_before += float(record.stats_before.global_norm())
        self.norm_after += float(record.stats_after.global_norm())
        f = record.factor.float()
        self.min_factor = min(self.min_factor, float(f.min()))
        self.scaled += int((f < 0.999).sum())
        self.total_scaled_steps += int(bool((f < 0.999).any()))

    def line(self) -> str:
        if self.shaping is None:
            return ""
        if not self.steps:
            return f" | shaping: {self.skipped} skipped"
        n = self.steps
        groups = self.shaping.session.layout.num_groups
        return (f" | shaping[{self.shaping.config.type}]: grad norm {self.norm_before / n:.3f} -> "
                f"{self.norm_after / n:.3f}, min factor {self.min_factor:.3f}, "
                f"scaled {self.scaled / n:.1f}/{groups} groups, skipped {self.skipped}")

    def summary(self) -> dict:
        if self.shaping is None:
            return {}
        return {"shaper": self.shaping.config.type, "shaping_steps": self.total_steps,
                "shaping_skipped": self.total_skipped, "steps_with_scaled_groups": self.total_scaled_steps}


def check_inputs(args) -> None:
    """Fail fast, before distributed start-up, with one line naming the bad input: every rank
    would otherwise print the same traceback."""
    from megatron_shaping.data import DataFormatError, SentencePieceTokenizer, parse_data_path
    from megatron_shaping.model import load_preset
    try:
        if args.data_path:
            parse_data_path(args.data_path)
            SentencePieceTokenizer(args.tokenizer_model)
        load_preset(args.model_preset)
        with open(args.deepspeed_config) as f:
            json.load(f)
    except (FileNotFoundError, DataFormatError, ValueError) as e:   # JSONDecodeError is a ValueError
        raise SystemExit(f"pretrain.py: error: {e}") from None


# ---------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from megatron_shaping.data import BatchSchedule, SentencePieceTokenizer, build_gpt_datasets, prepare_stdlib_corpus
    from megatron_shaping.data.corpus import default_cache_dir
    from megatron_shaping.model import LlamaModel, load_preset
    from megatron_shaping.model.parallel import init_parallel

    on_cpu = get_accelerator().device_name() == "cpu"
    check_inputs(args)
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else get_accelerator().communication_backend_name())
    if not on_cpu:
        get_accelerator().set_device(args.local_rank)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ctx = init_parallel(tp=tp, pp=pp)
    torch.manual_seed(args.seed)
    log0(f"[setup] world {dist.get_world_size()}: tensor {tp} x pipeline {pp} x data {ctx.dp}, "
         f"accelerator {get_accelerator().device_name()}")

    # -- data
    t0 = time.time()
    if args.data_path is None:
        corpus = prepare_stdlib_corpus(vocab_size=args.vocab_size, log=log0)
        data_path, tokenizer_model = [corpus.data_prefix], corpus.tokenizer_model
        cache = args.data_cache_path or str(corpus.directory / "index-cache")
    else:
        data_path, tokenizer_model = args.data_path, args.tokenizer_model
        cache = args.data_cache_path or str(default_cache_dir() / "index-cache")
    tokenizer = SentencePieceTokenizer(tokenizer_model)
    model_cfg = load_preset(args.model_preset, vocab_size=tokenizer.vocab_size, seq_length=args.seq_length,
                            fp8=args.fp8 or None, fp8_backend=args.fp8_backend if args.fp8 else None)
    seq = model_cfg.seq_length
    schedule = BatchSchedule(args.global_batch_size, args.micro_batch_size, ctx.mpu.get_data_parallel_rank(), ctx.dp)
    train_ds, valid_ds = build_gpt_datasets(
        data_path, tokenizer, seq, args.seed, train_samples=args.train_iters * args.global_batch_size,
        valid_samples=args.eval_iters * args.global_batch_size, split=args.split, cache_dir=cache)
    log0(f"[data] {tokenizer} | train {len(train_ds)} / valid {len(valid_ds)} samples of {seq} tokens "
         f"| ready in {time.time() - t0:.1f}s")

    # -- model and engine
    if ctx.is_pipeline:
        from megatron_shaping.model.pipeline import build_pipeline_model
        model = build_pipeline_model(model_cfg, ctx.topology, seed=args.seed)
    else:
        model = LlamaModel(model_cfg, seed=args.seed)
    log0(f"[model] {model_cfg.name}: {model_cfg.num_parameters() / 1e6:.2f}M parameters, hidden {model_cfg.hidden_size}, "
         f"{model_cfg.num_layers} layers, {model_cfg.num_attention_heads} heads / {model_cfg.num_query_groups} kv, "
         f"vocab {model_cfg.padded_vocab_size}, tied {model_cfg.tie_embeddings}, fp8 {model_cfg.fp8}")
    ds_config = load_ds_config(args, schedule.accumulation_steps, on_cpu)
    engine, optimizer, _, scheduler = deepspeed_initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
        mpu=None if ctx.is_pipeline else ctx.mpu,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_at(it, args) / args.lr))
    shaping_log = ShapingLog(engine)
    if shaping_log.shaping is not None:
        s = shaping_log.shaping
        log0(f"[shaping] {s.config.type} params={s.config.params} granularity={s.session.granularity} "
             f"groups={s.session.layout.num_groups}")
    else:
        log0("[shaping] off (no gradient_shaping section in the DeepSpeed config)")

    # Shaper state travels with engine.save_checkpoint / load_checkpoint (the integration's
    # checkpoint hooks, docs/CHECKPOINTS.md).
    start_iter = 0
    if args.load:
        from megatron_shaping.integrations.deepspeed.checkpointing import load_checkpoint
        path, client = load_checkpoint(engine, args.load,
                                       allow_fresh_state=True if args.shaping_fresh_state else None)
        if path is None:
            log0(f"[checkpoint] no checkpoint in {args.load}: starting from scratch")
        else:
            start_iter = int(client.get("iteration", 0))
            log0(f"[checkpoint] resumed from {path} at iteration {start_iter}")

    def save(iteration):
        client = {"iteration": iteration, "consumed_samples": iteration * args.global_batch_size,
                  "args": vars(args), "model_config": model_cfg.to_dict()}
        engine.save_checkpoint(args.save, tag=f"iter_{iteration:07d}", client_state=client)
        log0(f"[checkpoint] saved iteration {iteration} to {args.save}")

    def to_pipe(batches):
        return iter([(b["tokens"], (b["labels"], b["loss_mask"])) for b in batches])

    valid_batches = [schedule.micro_batches(valid_ds, i) for i in range(args.eval_iters)]
    dp_group = ctx.mpu.get_data_parallel_group()

    def evaluate() -> float:
        if ctx.is_pipeline:
            losses = [engine.eval_batch(to_pipe(b), num_micro_batches=len(b)).float() for b in valid_batches]
            return float(torch.stack(losses).mean())      # eval_batch averages over DP itself
        engine.eval()
        with torch.no_grad():
            total = torch.stack([engine(mb["tokens"], mb["labels"], mb["loss_mask"]).float()
                                 for b in valid_batches for mb in b]).mean()
        engine.train()
        dist.all_reduce(total, group=dp_group)
        return float(total) / ctx.dp

    def monitor(events):
        if engine.monitor.enabled and dist.get_rank() == 0:
            engine.monitor.write_events(events)

    # -- train
    history = {"val": [], "train": []}
    val = evaluate()
    history["val"].append((start_iter, val))
    log0(f"[eval] iteration {start_iter}: val loss {val:.4f}")
    monitor([("Train/Samples/val_loss", val, engine.global_samples)])
    tokens_per_iter = args.global_batch_size * seq
    window_loss, window_n, window_t = 0.0, 0, time.time()
    # A tqdm bar on rank 0 when it writes to a terminal; the [train]/[eval] lines otherwise.
    from megatron_shaping.progress import Progress
    shaping = getattr(engine, "gradient_shaping", None)
    bar = Progress(args.train_iters, enabled=dist.get_rank() == 0 and sys.stdout.isatty(), initial=start_iter,
                   stream=sys.stdout, use_bar=True)
    for it in range(start_iter, args.train_iters):
        batches = schedule.micro_batches(train_ds, it)
        if ctx.is_pipeline:
            loss = engine.train_batch(to_pipe(batches)).float()     # averaged over micro-batches and DP
        else:
            losses = []
            for mb in batches:
                step_loss = engine(mb["tokens"], mb["labels"], mb["loss_mask"])
                engine.backward(step_loss)
                engine.step()
                losses.append(step_loss.detach().float())
            loss = torch.stack(losses).mean()
            dist.all_reduce(loss, group=dp_group)
            loss = loss / ctx.dp
            # The pipeline engine writes its own train_loss event; the plain engine does not.
            monitor([("Train/Samples/train_loss", float(loss), engine.global_samples)])
        window_loss += float(loss)
        window_n += 1
        done = it + 1
        if shaping is not None:
            from megatron_shaping.integrations.deepspeed.monitor import shaped_fraction
            bar.update(done, loss=float(loss), lr=engine.get_lr()[0], tokens=tokens_per_iter,
                       loss_scale=shaping.last_loss_scale, shaped_fraction=shaped_fraction(shaping.session.last))
        else:
            bar.update(done, loss=float(loss), lr=engine.get_lr()[0], tokens=tokens_per_iter)
        if done % args.log_interval == 0 or done == args.train_iters:
            elapsed = time.time() - window_t
            history["train"].append((done, window_loss / window_n))
            log0(f"[train] iteration {done:5d}/{args.train_iters} | loss {window_loss / window_n:.4f} | "
                 f"lr {engine.get_lr()[0]:.3e} | {tokens_per_iter * window_n / elapsed:,.0f} tokens/s"
                 f"{shaping_log.line()}")
            window_loss, window_n, window_t = 0.0, 0, time.time()
            shaping_log.reset()
        if done % args.eval_interval == 0 or done == args.train_iters:
            val = evaluate()
            history["val"].append((done, val))
            log0(f"[eval] iteration {done}: val loss {val:.4f}")
            monitor([("Train/Samples/val_loss", val, engine.global_samples)])
            window_t = time.time()
        if args.save and ((args.save_interval and done % args.save_interval == 0) or done == args.train_iters):
            save(done)
            window_t = time.time()

    bar.close()
    result = {"initial_val_loss": history["val"][0][1], "final_val_loss": history["val"][-1][1],
              "final_train_loss": history["train"][-1][1] if history["train"] else None,
              "iterations": args.train_iters, "start_iteration": start_iter, "world_size": dist.get_world_size(),
              "tp": tp, "pp": pp, "dp": ctx.dp, **shaping_log.summary()}
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        # One line per node (not only global rank 0): multi-node runs can check that every
        # node saw the same (all-reduced) losses.
        print("RESULT " + json.dumps({"rank": dist.get_rank(), **result}), flush=True)
    return result


if __name__ == "__main__":
    main()
