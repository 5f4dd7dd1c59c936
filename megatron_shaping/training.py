"""The training loop of our launchers, once: ``launch/pretrain.py`` and the evidence grid
(``tools/experiments/run_grid.py``) both train through :class:`Trainer`.

* arguments: :func:`parse_args` (pretrain.py's command line, Megatron-LM's names),
  :func:`check_inputs`, :func:`load_ds_config` (batch sizes and LR from the command line
  override the DeepSpeed config), :func:`lr_at` (warmup + cosine);
* set-up: :func:`init_distributed`, :func:`open_corpus` / :func:`build_data`, :func:`build_model`,
  :func:`build_engine` (``megatron_shaping.initialize``: deepspeed.initialize + the
  ``gradient_shaping`` section);
* the loop: :class:`Trainer` (one iteration over all micro-batches on the plain or the pipeline
  engine, evaluation, log lines, checkpoint saves, progress bar, early-stop and loss-factor hooks)
  and :class:`ShapingLog` (what the shaper did between two log lines);
* :func:`pretrain`: the whole of pretrain.py, from arguments to the ``RESULT`` line.

DeepSpeed, megatron-core and the data stack are imported inside the functions, so importing this
module stays cheap.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch


# ---------------------------------------------------------------------------- arguments
def _model_and_parallel_args(p: argparse.ArgumentParser) -> None:
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


def _training_and_data_args(p: argparse.ArgumentParser) -> None:
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


def _checkpoint_and_log_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--override-resume-args", action="store_true",
                   help="resume although an argument that sets the LR schedule or the data order differs "
                        "from the checkpoint's (default: stop and name it); the LR then follows the new "
                        "arguments")
    g.add_argument("--shaping-fresh-state", action="store_true",
                   help="resume from a checkpoint that has no shaper state (made without shaping or by an "
                        "older format) with a fresh shaper instead of stopping; logged loudly")
    g.add_argument("--save-interval", type=int, default=0, help="0: only at the end (when --save)")
    g.add_argument("--eval-interval", type=int, default=50)
    g.add_argument("--eval-iters", type=int, default=4)
    g.add_argument("--log-interval", type=int, default=10)


def parse_args(argv=None, description: Optional[str] = None, prog: Optional[str] = None) -> argparse.Namespace:
    """pretrain.py's command line (Megatron-LM's argument names, plus DeepSpeed's
    ``--deepspeed`` / ``--deepspeed_config``)."""
    import deepspeed
    p = argparse.ArgumentParser(description=description, prog=prog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_and_parallel_args(p)
    _training_and_data_args(p)
    _checkpoint_and_log_args(p)
    p = deepspeed.add_config_arguments(p)      # --deepspeed, --deepspeed_config
    args = p.parse_args(argv)
    if args.deepspeed_config is None:
        p.error("--deepspeed_config is required (see configs/deepspeed/)")
    if args.data_path and not args.tokenizer_model:
        p.error("--data-path needs --tokenizer-model (the tokenizer the data was preprocessed with)")
    for name in ("micro_batch_size", "global_batch_size", "train_iters", "eval_iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("save_interval", "eval_interval", "log_interval", "lr_warmup_iters"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    return args


def check_inputs(args, prog: str = "pretrain.py") -> None:
    """Fail fast, before distributed start-up, with one line naming the bad input: every rank
    would otherwise print the same traceback."""
    from .data import DataFormatError, SentencePieceTokenizer, parse_data_path
    from .model import load_preset
    try:
        if args.data_path:
            parse_data_path(args.data_path)
            SentencePieceTokenizer(args.tokenizer_model)
        load_preset(args.model_preset)
        with open(args.deepspeed_config) as f:
            json.load(f)
    except (FileNotFoundError, DataFormatError, ValueError) as e:   # JSONDecodeError is a ValueError
        raise SystemExit(f"{prog}: error: {e}") from None
    if args.load and not os.path.isdir(args.load) and \
            not (args.save and os.path.abspath(args.save) == os.path.abspath(args.load)):
        # --load = --save is the auto-resume pattern (nothing there on the first run); any other
        # missing --load directory is a typo that would silently train from scratch
        raise SystemExit(f"{prog}: error: --load {args.load}: no such directory (to start from scratch, leave "
                         f"--load out, or give it the same directory as --save)")


def log0(*a):
    """print on global rank 0 (everywhere before torch.distributed starts)."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def lr_at(it: int, args) -> float:
    """Linear warmup to ``args.lr``, then cosine decay to ``args.min_lr`` at ``args.lr_decay_iters``
    (default ``args.train_iters``; Megatron's 'cosine' style), constant after."""
    decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters > 0 and it < args.lr_warmup_iters:
        return args.lr * (it + 1) / args.lr_warmup_iters
    span = max(1, decay_iters - args.lr_warmup_iters)
    progress = min(1.0, (it - args.lr_warmup_iters) / span)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_scheduler(args) -> Callable:
    """For ``deepspeed.initialize(lr_scheduler=...)``: :func:`lr_at` as a LambdaLR over ``args.lr``."""
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_at(it, args) / args.lr)


def load_ds_config(args, accumulation_steps: int, on_cpu: bool) -> dict:
    """The DeepSpeed config file with the command line's batch sizes and LR, the scheduler
    removed (the schedule is :func:`lr_at`), and torch's AdamW on CPU; clear errors for fp16 on
    CPU and ZeRO-2/3 with pipeline parallelism."""
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
    cfg.setdefault("steps_per_print", 10 ** 9)      # the Trainer prints its own log lines
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


# ---------------------------------------------------------------------------- shaping log
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

    def describe(self) -> str:
        """The set-up log line."""
        s = self.shaping
        if s is None:
            return "[shaping] off (no gradient_shaping section in the DeepSpeed config)"
        return (f"[shaping] {s.config.type} params={s.config.params} granularity={s.session.granularity} "
                f"groups={s.session.layout.num_groups}")


# ---------------------------------------------------------------------------- set-up
def init_distributed(tp: int = 1, pp: int = 1, local_rank: int = 0):
    """torch.distributed through DeepSpeed (gloo on CPU), the device, and megatron's parallel
    state; returns :func:`megatron_shaping.model.parallel.init_parallel`'s context."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from .model.parallel import init_parallel
    on_cpu = get_accelerator().device_name() == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else get_accelerator().communication_backend_name())
    if not on_cpu:
        get_accelerator().set_device(local_rank)
    return init_parallel(tp=tp, pp=pp)


def on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name() == "cpu"


@dataclass
class Corpus:
    """Indexed data prefixes, their tokenizer, and where dataset indices are cached; ``default``:
    the default corpus's cache entry (its Python version, vocabulary size and file-list digest),
    None for --data-path data."""
    data_path: List[str]
    tokenizer: object
    cache_dir: str
    default: Optional[str] = None


@dataclass
class Data:
    schedule: object                     # megatron_shaping.data.BatchSchedule
    train_ds: object
    valid_ds: object
    valid_batches: list                  # eval_iters x the micro-batches of one global batch


def open_corpus(data_path=None, tokenizer_model=None, vocab_size: int = 4096, cache_dir=None, log=log0) -> Corpus:
    """``data_path`` (Megatron's --data-path) with its tokenizer, or, without one, the running
    interpreter's standard-library sources (tokenizer trained and corpus tokenised on first use)."""
    from .data import SentencePieceTokenizer, prepare_stdlib_corpus
    from .data.corpus import default_cache_dir
    default = None
    if data_path is None:
        corpus = prepare_stdlib_corpus(vocab_size=vocab_size, log=log)
        data_path, tokenizer_model = [corpus.data_prefix], corpus.tokenizer_model
        cache = cache_dir or str(corpus.directory / "index-cache")
        default = corpus.directory.name
    else:
        cache = cache_dir or str(default_cache_dir() / "index-cache")
    return Corpus(list(data_path), SentencePieceTokenizer(tokenizer_model), cache, default)


def build_data(corpus: Corpus, ctx, seq_length: int, seed: int, train_iters: int, global_batch: int,
               micro_batch: int, eval_iters: int, split: str = "98,2,0") -> Data:
    """Train and validation datasets sized for the run, and this data-parallel rank's batches."""
    from .data import BatchSchedule, build_gpt_datasets
    schedule = BatchSchedule(global_batch, micro_batch, ctx.mpu.get_data_parallel_rank(), ctx.dp,
                             vocab_size=corpus.tokenizer.vocab_size, source=" ".join(map(str, corpus.data_path)))
    train_ds, valid_ds = build_gpt_datasets(
        corpus.data_path, corpus.tokenizer, seq_length, seed, train_samples=train_iters * global_batch,
        valid_samples=eval_iters * global_batch, split=split, cache_dir=corpus.cache_dir)
    return Data(schedule, train_ds, valid_ds,
                [schedule.micro_batches(valid_ds, i, "validation batch") for i in range(eval_iters)])


def build_model(model_cfg, ctx, seed: int):
    """A LlamaModel, or its DeepSpeed pipeline version when ``ctx`` has pipeline stages."""
    if ctx.is_pipeline:
        from .model.pipeline import build_pipeline_model
        return build_pipeline_model(model_cfg, ctx.topology, seed=seed)
    from .model import LlamaModel
    return LlamaModel(model_cfg, seed=seed)


def build_engine(model, ds_config: dict, ctx, lr_schedule: Callable):
    """``megatron_shaping.initialize`` (deepspeed.initialize + the gradient_shaping section)."""
    from . import initialize
    engine, _, _, _ = initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
        mpu=None if ctx.is_pipeline else ctx.mpu, lr_scheduler=lr_schedule)
    return engine


# ---------------------------------------------------------------------------- the loop
@dataclass
class Intervals:
    """Every how many iterations the Trainer logs, evaluates and saves (0: only at the end;
    ``log=0``: no [train] lines)."""
    log: int = 10
    eval: int = 50
    save: int = 0
    eval_at_start: bool = True


@dataclass
class History:
    losses: List[float] = field(default_factory=list)                  # every iteration's DP-mean loss
    train: List[Tuple[int, float]] = field(default_factory=list)       # (iteration, mean loss of the log window)
    val: List[Tuple[int, float]] = field(default_factory=list)         # (iteration, validation loss)
    stopped_early: Optional[str] = None
    train_time_s: float = 0.0                                          # without evaluations and saves


#: on_step(iteration, loss, history) -> a reason to stop, or None
StepHook = Callable[[int, float, History], Optional[str]]


class Trainer:
    """Trains ``engine`` (plain or pipeline DeepSpeed engine) on ``data`` for ``train_iters``
    iterations of one global batch each."""

    def __init__(self, engine, ctx, data: Data, train_iters: int, tokens_per_iter: int,
                 intervals: Optional[Intervals] = None, save: Optional[Callable[[int], None]] = None,
                 log: Callable = log0, progress: bool = True, shaping_log: Optional[ShapingLog] = None):
        import torch.distributed as dist
        self.engine, self.ctx, self.data = engine, ctx, data
        self.train_iters, self.tokens_per_iter = train_iters, tokens_per_iter
        self.intervals = intervals if intervals is not None else Intervals()
        self.save, self.log, self.progress = save, log, progress
        self.shaping_log = shaping_log if shaping_log is not None else ShapingLog(engine)
        self.dist, self.dp_group = dist, ctx.mpu.get_data_parallel_group()

    # ------------------------------------------------------------------ one iteration
    def _to_pipe(self, batches):
        return iter([(b["tokens"], (b["labels"], b["loss_mask"])) for b in batches])

    def _inputs(self, mb) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A micro-batch's tensors on the engine's device: the data loader gives CPU tensors and
        DeepSpeed's plain engine does not move its inputs (its PipelineEngine does)."""
        dev = self.engine.device
        return tuple(mb[k].to(dev, non_blocking=True) for k in ("tokens", "labels", "loss_mask"))

    def step(self, it: int, loss_factor: float = 1.0) -> float:
        """One iteration (every micro-batch of global batch ``it``); the loss averaged over
        micro-batches and data-parallel ranks. ``loss_factor`` multiplies the loss that is
        backpropagated (and so every gradient): injected spikes."""
        engine, batches = self.engine, self.data.schedule.micro_batches(self.data.train_ds, it)
        if self.ctx.is_pipeline:
            if loss_factor != 1.0:
                raise ValueError("loss_factor is not supported with pipeline parallelism")
            return float(engine.train_batch(self._to_pipe(batches)).float())   # averaged over micro-batches and DP
        losses = []
        shaping = getattr(engine, "gradient_shaping", None)
        for mb in batches:
            loss = engine(*self._inputs(mb))
            engine.backward(loss * loss_factor if loss_factor != 1.0 else loss)
            if shaping is not None:
                shaping.observe_loss(loss)          # the spike rule's loss_z (a no-op without it)
            engine.step()
            losses.append(loss.detach().float())
        total = torch.stack(losses).mean()
        self.dist.all_reduce(total, group=self.dp_group)
        loss = float(total) / self.ctx.dp
        # The pipeline engine writes its own train_loss event; the plain engine does not.
        self.monitor([("Train/Samples/train_loss", loss, engine.global_samples)])
        return loss

    def evaluate(self) -> float:
        """Validation loss over ``data.valid_batches``, averaged over data-parallel ranks."""
        engine, valid = self.engine, self.data.valid_batches
        if self.ctx.is_pipeline:
            losses = [engine.eval_batch(self._to_pipe(b), num_micro_batches=len(b)).float() for b in valid]
            return float(torch.stack(losses).mean())      # eval_batch averages over DP itself
        engine.eval()
        with torch.no_grad():
            total = torch.stack([engine(*self._inputs(mb)).float() for b in valid for mb in b]).mean()
        engine.train()
        self.dist.all_reduce(total, group=self.dp_group)
        return float(total) / self.ctx.dp

    def monitor(self, events) -> None:
        if self.engine.monitor.enabled and self.dist.get_rank() == 0:
            self.engine.monitor.write_events(events)

    # ------------------------------------------------------------------ the loop
    def fit(self, start_iter: int = 0, loss_factors: Optional[Dict[int, float]] = None,
            on_step: Optional[StepHook] = None) -> History:
        """Iterations ``start_iter`` .. ``train_iters``: log, evaluate and save at the intervals and
        at the end; ``loss_factors`` {iteration: k} for :meth:`step`; ``on_step`` may stop early
        (then the run is evaluated once more at the iteration it reached)."""
        h = History()
        if self.intervals.eval_at_start:
            self._evaluate(start_iter, h)
        bar = self._progress_bar(start_iter)
        self._window = [0.0, 0, time.time()]           # loss sum, iterations, start time
        t_loop, t_other = time.time(), 0.0
        done = start_iter
        for it in range(start_iter, self.train_iters):
            loss = self.step(it, (loss_factors or {}).get(it, 1.0))
            h.losses.append(loss)
            done = it + 1
            self._window[0] += loss
            self._window[1] += 1
            self._update_bar(bar, done, loss)
            h.stopped_early = on_step(it, loss, h) if on_step is not None else None
            t_other += self._at_iteration_end(done, h)
            if h.stopped_early:
                break
        h.train_time_s = time.time() - t_loop - t_other
        if h.stopped_early and (not h.val or h.val[-1][0] != done):
            self._evaluate(done, h)
        bar.close()
        return h

    def _at_iteration_end(self, done: int, h: History) -> float:
        """Log, evaluate and save when due; returns the seconds spent evaluating and saving."""
        last, iv = done == self.train_iters, self.intervals
        if iv.log and (done % iv.log == 0 or last):
            self._log_window(done, h)
        t0 = time.time()
        if (iv.eval and done % iv.eval == 0) or last:
            self._evaluate(done, h)
        if self.save is not None and ((iv.save and done % iv.save == 0) or last):
            self.save(done)
        spent = time.time() - t0
        # the iterations already in the window keep their time; only the evaluation and the
        # save are left out of tokens/s (restarting the window's clock overstated it)
        self._window[2] += spent
        return spent

    def _log_window(self, done: int, h: History) -> None:
        total, n, t0 = self._window
        h.train.append((done, total / n))
        lr = self.engine.get_lr()[0]
        self.log(f"[train] iteration {done:5d}/{self.train_iters} | loss {total / n:.4f} | lr {lr:.3e} | "
                 f"{self.tokens_per_iter * n / (time.time() - t0):,.0f} tokens/s{self.shaping_log.line()}")
        self._window = [0.0, 0, time.time()]
        self.shaping_log.reset()

    def _evaluate(self, iteration: int, h: History) -> None:
        val = self.evaluate()
        h.val.append((iteration, val))
        self.log(f"[eval] iteration {iteration}: val loss {val:.4f}")
        self.monitor([("Train/Samples/val_loss", val, self.engine.global_samples)])

    def _progress_bar(self, start_iter: int):
        # A tqdm bar on rank 0 when it writes to a terminal; the [train]/[eval] lines otherwise.
        from .progress import Progress
        return Progress(self.train_iters, enabled=self.progress and self.dist.get_rank() == 0 and sys.stdout.isatty(),
                        initial=start_iter, stream=sys.stdout, use_bar=True)

    def _update_bar(self, bar, done: int, loss: float) -> None:
        shaping, extra = getattr(self.engine, "gradient_shaping", None), {}
        if shaping is not None:
            from .monitoring import shaped_fraction
            extra = dict(loss_scale=shaping.last_loss_scale, shaped_fraction=shaped_fraction(shaping.session.last))
        bar.update(done, loss=loss, lr=self.engine.get_lr()[0], tokens=self.tokens_per_iter, **extra)


# ---------------------------------------------------------------------------- pretrain.py
def _setup(args):
    """Distributed start-up, data, model, engine: (ctx, data, model_cfg, engine)."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from .model import load_preset
    check_inputs(args)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ctx = init_distributed(tp, pp, args.local_rank)
    torch.manual_seed(args.seed)
    log0(f"[setup] world {dist.get_world_size()}: tensor {tp} x pipeline {pp} x data {ctx.dp}, "
         f"accelerator {get_accelerator().device_name()}")
    t0 = time.time()
    corpus = open_corpus(args.data_path, args.tokenizer_model, args.vocab_size, args.data_cache_path)
    # saved with the arguments: a resume under another Python (other stdlib sources, another
    # tokenizer of the same vocabulary size) is another corpus, which --data-path None hides
    args.default_corpus = corpus.default
    model_cfg = load_preset(args.model_preset, vocab_size=corpus.tokenizer.vocab_size, seq_length=args.seq_length,
                            fp8=args.fp8 or None, fp8_backend=args.fp8_backend if args.fp8 else None)
    data = build_data(corpus, ctx, model_cfg.seq_length, args.seed, args.train_iters, args.global_batch_size,
                      args.micro_batch_size, args.eval_iters, args.split)
    log0(f"[data] {corpus.tokenizer} | train {len(data.train_ds)} / valid {len(data.valid_ds)} samples of "
         f"{model_cfg.seq_length} tokens | ready in {time.time() - t0:.1f}s")
    model = build_model(model_cfg, ctx, args.seed)
    c = model_cfg
    log0(f"[model] {c.name}: {c.num_parameters() / 1e6:.2f}M parameters, hidden {c.hidden_size}, "
         f"{c.num_layers} layers, {c.num_attention_heads} heads / {c.num_query_groups} kv, "
         f"vocab {c.padded_vocab_size}, tied {c.tie_embeddings}, fp8 {c.fp8}")
    ds_config = load_ds_config(args, data.schedule.accumulation_steps, on_cpu())
    return ctx, data, model_cfg, build_engine(model, ds_config, ctx, lr_scheduler(args))


def _resume(engine, args) -> int:
    """--load: the iteration to continue from (shaper state travels with engine.load_checkpoint,
    docs/CHECKPOINTS.md); 0 without a checkpoint."""
    if not args.load:
        return 0
    from .integrations.deepspeed.checkpointing import load_checkpoint
    path, client = load_checkpoint(engine, args.load, allow_fresh_state=True if args.shaping_fresh_state else None)
    if path is None:
        log0(f"[checkpoint] no checkpoint in {args.load}: starting from scratch")
        return 0
    if "iteration" in client:
        start_iter = int(client["iteration"])
    else:
        # a checkpoint saved by another script: continue from the engine's step it restored
        start_iter = int(engine.global_steps)
        log0(f"[checkpoint] WARNING: {path} has no 'iteration' in its client state (not saved by pretrain.py): "
             f"continuing from the engine's global step {start_iter}")
    changed = resume_arg_changes(client.get("args"), args)
    if changed:
        listed = ", ".join(f"{RESUME_ARG_NAMES.get(k, '--' + k.replace('_', '-'))} {old!r} -> {new!r}"
                           for k, old, new in changed)
        if not args.override_resume_args:
            raise SystemExit(f"pretrain.py: error: --load {path}: the checkpoint was saved with other arguments "
                             f"that set the LR schedule or the data order: {listed}. Resume with the saved "
                             "values, or pass --override-resume-args to go on with the new ones.")
        follow_new_lr(engine, args)
        log0(f"[checkpoint] WARNING: resuming with changed arguments ({listed}, --override-resume-args): the LR "
             "follows the new schedule from here; changed data arguments change which samples come next")
    log0(f"[checkpoint] resumed from {path} at iteration {start_iter}")
    return start_iter


#: arguments a resumed run must share with the checkpoint to continue the same LR schedule and
#: the same sample order (the order depends on the iteration, the global batch and the dataset
#: megatron-core builds, whose size follows --train-iters)
RESUME_ARGS = ("lr", "min_lr", "lr_warmup_iters", "lr_decay_iters", "train_iters", "global_batch_size", "seed",
               "seq_length", "data_path", "split", "vocab_size", "tokenizer_model", "default_corpus")
#: how the resume error names the entries that are not command-line flags
RESUME_ARG_NAMES = {"default_corpus": "the default corpus (the standard library of another Python)"}


def resume_arg_changes(saved: Optional[dict], args) -> list:
    """(name, saved, now) for each :data:`RESUME_ARGS` entry that differs from the checkpoint's
    saved arguments (none for a checkpoint without them)."""
    if not isinstance(saved, dict):
        return []
    now = vars(args)
    return [(k, saved[k], now.get(k)) for k in RESUME_ARGS if k in saved and saved[k] != now.get(k)]


def follow_new_lr(engine, args) -> None:
    """After loading a checkpoint made with another --lr: the restored LambdaLR keeps the old
    base LR while its factor is lr_at(it) / new lr; rebase it (and the optimizer's current LR)
    on the new one, so the LR is lr_at(iteration) of the new arguments."""
    sched = getattr(engine, "lr_scheduler", None)
    if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
        return
    sched.base_lrs = [args.lr for _ in sched.base_lrs]
    for group, fn in zip(sched.optimizer.param_groups, sched.lr_lambdas):
        group["lr"] = args.lr * fn(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]


def _saver(engine, args, model_cfg) -> Optional[Callable[[int], None]]:
    if not args.save:
        return None

    def save(iteration: int) -> None:
        client = {"iteration": iteration, "consumed_samples": iteration * args.global_batch_size,
                  "args": vars(args), "model_config": model_cfg.to_dict()}
        engine.save_checkpoint(args.save, tag=f"iter_{iteration:07d}", client_state=client)
        log0(f"[checkpoint] saved iteration {iteration} to {args.save}")
    return save


def pretrain(args) -> dict:
    """pretrain.py: set up, resume, train, and print one ``RESULT {json}`` line per node."""
    import torch.distributed as dist
    ctx, data, model_cfg, engine = _setup(args)
    shaping_log = ShapingLog(engine)
    log0(shaping_log.describe())
    start_iter = _resume(engine, args)
    trainer = Trainer(engine, ctx, data, args.train_iters, args.global_batch_size * model_cfg.seq_length,
                      Intervals(args.log_interval, args.eval_interval, args.save_interval),
                      save=_saver(engine, args, model_cfg), shaping_log=shaping_log)
    h = trainer.fit(start_iter)
    result = {"initial_val_loss": h.val[0][1], "final_val_loss": h.val[-1][1],
              "final_train_loss": h.train[-1][1] if h.train else None,
              "iterations": args.train_iters, "start_iteration": start_iter, "world_size": dist.get_world_size(),
              "tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, **shaping_log.summary()}
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        # One line per node (not only global rank 0): multi-node runs can check that every
        # node saw the same (all-reduced) losses.
        print("RESULT " + json.dumps({"rank": dist.get_rank(), **result}), flush=True)
    return result
