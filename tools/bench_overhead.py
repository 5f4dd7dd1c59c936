#!/usr/bin/env python
"""What gradient shaping costs inside DeepSpeed's optimizer step (a benchmark, not a test).

One run builds one DeepSpeed engine per configuration on the same model and data, and visits
them round-robin, so machine noise falls on every configuration alike:

* ``none``            DeepSpeed, no clipping (``gradient_clipping: 0``);
* ``ds_clip``         DeepSpeed's built-in ``gradient_clipping`` (the baseline of the ratios);
* one per method of the shaper registry (``megatron_shaping.shapers.REGISTRY``), its
                      ``default_section`` with the overrides of ``OVERRIDES`` (so that every
                      shaper changes the gradient on every step), DeepSpeed clipping off;
* ``user_full_grad``  what users do today: ``deepspeed.utils.safe_get_full_grad`` per parameter
                      for per-layer norms, then ``safe_set_full_grad`` to scale (DS clipping off).

What is measured, per configuration (a :class:`Config` holds its engine and its :class:`Round`
records; rank 0 turns them into one :class:`Result`):

* ``engine.step()`` at the accumulation boundary (it runs our pre-step hook) and forward +
  backward, wall and process CPU time; the median over rounds and the median of the paired
  ratio to ds_clip in the same round, against ``TARGETS`` (the iteration against 1.01x);
* named regions inside the step: ``hook``, ``stats`` and ``apply`` are the package's own
  markers (:mod:`megatron_shaping.profiling`, recorded by :class:`Clock` while a step is timed;
  ``hook`` of ``user_full_grad`` is its loop), ``dsnorm`` and ``dsclip`` are DeepSpeed's
  ``scaled_global_norm`` / ``_get_norm_groups`` and ``unscale_and_clip_grads`` /
  ``clip_fp32_gradients``, wrapped on the engine's own optimizer and engine objects;
* in one extra step: host synchronisations (``torch.Tensor.item``, ``tolist``, ``cpu``,
  ``numpy``, ``bool()``/``float()``/``int()``/``__index__`` of a tensor) and every collective
  (the ``deepspeed.comm`` backend object), inside the hook and in the whole step, and the tensor
  memory of the hook, of DeepSpeed's norm and of the step (torch profiler); in another, the
  hook's Python heap (tracemalloc).

The counters wrap those torch methods and the DeepSpeed comm backend for the one counted step
and restore them after it: that is measurement of the whole process, not a change to
megatron_shaping, whose code runs unpatched (its regions are reported through the recorder
hook it offers).

Run it from the repository root (it starts the ``deepspeed`` launcher itself)::

    python tools/bench_overhead.py                       # ZeRO-2, fp32, 2 processes
    python tools/bench_overhead.py --dtype bf16 --stage 1 --world 2 --steps 30
    python tools/bench_overhead.py --model llama --preset llama-tiny --layers 12 --width 384

Results: docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

from megatron_shaping import profiling  # noqa: E402
from megatron_shaping.profiling import APPLY, HOOK, STATS  # noqa: E402
from megatron_shaping.shapers import REGISTRY, default_params, default_section  # noqa: E402
from tools.launching import deepspeed_cmd, free_port, launch_env, shm_buffers, unlink_leaked_shm  # noqa: E402

#: Step-time targets vs DeepSpeed's gradient_clipping (CPU time, issue 11): the hook's
#: statistics pass replaces DeepSpeed's own norm pass, so a norm-based shaper costs nothing.
TARGETS = {"gradient_stabilizer": 1.00, "norm_clip": 1.00, "zclip": 1.00, "adagc": 1.00, "agc": 1.03,
           "spamp": 1.06, "value_clip": 1.08, "entrywise_shrink": 1.08}
ITERATION_TARGET = 1.01     # forward + backward + step, every method
ACCELERATOR = ["cpu"]       # --accelerator (the launcher's DS_ACCELERATOR)
_SYNC: List[Callable] = [lambda: None]   # torch.cuda.synchronize on CUDA, before reading a clock
#: where the result reductions run: NCCL has no CPU backend, so on CUDA they go through the GPU
_REDUCE_DEVICE: List[str] = ["cpu"]

CLIP = "--clip"             # an override taking the value of --clip
#: Method -> the parameters changed from its defaults so that it shapes on every step of this
#: benchmark (a clip that never fires would skip its multiply pass); other methods of the
#: registry run at their defaults.
OVERRIDES: Dict[str, Dict[str, Any]] = {
    "norm_clip": {"max_norm": CLIP},
    "value_clip": {"clip_value": 1e-4},
    "agc": {"clipping": 0.01},
    "zclip": {"warmup_steps": 2, "max_grad_norm": CLIP},
    "adagc": {"warmup_steps": 0},
    "entrywise_shrink": {"threshold": 3.0},
}
BASELINES = ("none", "ds_clip", "user_full_grad")
DSNORM, DSCLIP = "dsnorm", "dsclip"
#: The timed regions of a step, in report order: the package's, then DeepSpeed's.
REGIONS = profiling.REGIONS + (DSNORM, DSCLIP)

# ---------------------------------------------------------------------------------- launcher


def launch(argv: List[str], world: int) -> int:
    """Re-run this file under the deepspeed launcher with ``world`` processes."""
    env = launch_env(DS_ACCELERATOR=ACCELERATOR[0], OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = deepspeed_cmd() + ["--num_gpus", str(world), "--master_port", str(free_port()), os.path.abspath(__file__),
                             "--_worker"] + argv
    before = shm_buffers()
    try:
        return subprocess.call(cmd, env=env)
    finally:
        unlink_leaked_shm(before)       # the launch's /dev/shm buffers (DeepSpeed leaves them)


# ---------------------------------------------------------------------------------- model


def make_mlp(width: int, layers: int, seed: int):
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.lin = nn.Linear(width, width)

        def forward(self, h):
            return h + torch.tanh(self.lin(self.norm(h)))

    class Stack(nn.Module):
        """``layers`` x (LayerNorm weight+bias, Linear weight+bias) + a Linear head."""

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block() for _ in range(layers)])
            self.head = nn.Linear(width, width)

        def forward(self, x, y):
            h = x
            for b in self.layers:
                h = b(h)
            return torch.nn.functional.mse_loss(self.head(h).float(), y.float())

    torch.manual_seed(seed)
    return Stack()


def make_llama(args, seed: int):
    from megatron_shaping.model import LlamaModel, load_preset
    over = {}
    if args.width:
        over["hidden_size"] = args.width
    if args.layers:
        over["num_layers"] = args.layers
    cfg = load_preset(args.preset, **over)
    return LlamaModel(cfg, tp=1, seed=seed), cfg


class Data:
    """The same batch for every configuration at a given round."""

    def __init__(self, args, llama_cfg=None):
        self.args = args
        self.cfg = llama_cfg

    def batch(self, step: int, rank: int, dtype):
        import torch
        g = torch.Generator().manual_seed(1000 * step + rank)
        b = self.args.micro_batch
        if self.cfg is not None:
            s = min(self.cfg.seq_length, self.args.seq)
            tok = torch.randint(0, self.cfg.vocab_size, (b, s + 1), generator=g)
            return (tok[:, :-1], tok[:, 1:], torch.ones(b, s))
        w = self.args.width
        x = torch.randn(b, w, generator=g)
        y = torch.randn(b, w, generator=g)
        return (x.to(dtype), y)


# ---------------------------------------------------------------------------------- probes


class Clock:
    """The recorder of named regions: :mod:`megatron_shaping.profiling`'s (installed while a
    step is timed) and the benchmark's own (DeepSpeed's norm and clip, the user loop). Wall and
    process CPU seconds per region since :meth:`reset`. ``around[name]`` (for one extra step)
    makes a context entered around each visit of that region: memory markers, the heap."""

    def __init__(self):
        self.wall: Dict[str, float] = {}
        self.cpu: Dict[str, float] = {}
        self.depth: Dict[str, int] = {}
        self.around: Dict[str, Callable[[], ContextManager]] = {}

    def reset(self) -> None:
        self.wall, self.cpu = {}, {}

    def inside(self, name: str) -> bool:
        return self.depth.get(name, 0) > 0

    @contextlib.contextmanager
    def region(self, name: str):
        around = self.around.get(name)
        with around() if around is not None else contextlib.nullcontext():
            self.depth[name] = self.depth.get(name, 0) + 1
            _SYNC[0]()
            t, c = time.perf_counter(), time.process_time()
            try:
                yield
            finally:
                _SYNC[0]()
                self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - t
                self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
                self.depth[name] -= 1

    def wrap(self, name: str, fn: Callable) -> Callable:
        """``fn`` run inside region ``name`` (for DeepSpeed's own functions)."""
        def in_region(*a, **k):
            with self.region(name):
                return fn(*a, **k)
        return in_region


COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "inference_all_reduce", "all_gather", "all_gather_into_tensor",
               "all_gather_coalesced", "reduce_scatter", "reduce_scatter_tensor", "broadcast", "reduce", "gather",
               "scatter", "all_to_all_single", "all_to_all", "barrier", "send", "recv", "isend", "irecv")


def _tensors(x, out):
    import torch
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _tensors(y, out)
    return out


@contextlib.contextmanager
def wrapped(obj, names, wrap):
    """Replace ``obj.<name>`` by ``wrap(name, original)`` for the block, then restore it."""
    saved = []
    for name in names:
        fn = getattr(obj, name, None)
        if fn is not None:
            saved.append((name, name in obj.__dict__, fn))
            setattr(obj, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, had, fn in reversed(saved):
            if had:
                setattr(obj, name, fn)
            else:
                delattr(obj, name)


@dataclass
class Call:
    """One collective: its op, whether our hook (or the user loop) issued it, its largest tensor."""
    op: str
    hook: bool
    numel: int
    bytes: int
    dtype: str


class CommCounter:
    """Counts every collective that goes through deepspeed.comm (its backend object, which every
    ``deepspeed.comm.<op>`` calls) while active, and which were issued inside region ``hook``.
    Bytes of a call = the largest tensor argument (the buffer reduced or gathered into)."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.calls: List[Call] = []

    def active(self) -> ContextManager:
        from deepspeed.comm import comm as dscomm
        return wrapped(dscomm.cdb, COLLECTIVES, self._wrap)

    def _wrap(self, name, fn):
        def counted(*a, **k):
            ts = _tensors(list(a) + list(k.values()), [])
            big = max(ts, key=lambda t: t.numel() * t.element_size()) if ts else None
            self.calls.append(Call(name, self.clock.inside(HOOK), int(big.numel()) if big is not None else 0,
                                   int(big.numel() * big.element_size()) if big is not None else 0,
                                   str(big.dtype).replace("torch.", "") if big is not None else ""))
            return fn(*a, **k)
        return counted


class SyncCounter:
    """Counts device-to-host reads of tensor values while active: ``Tensor.item``, ``tolist``,
    ``cpu``, ``numpy`` and ``bool()``/``float()``/``int()``/``index`` of a tensor, by wrapping
    those methods of ``torch.Tensor``. On a GPU each of them waits for the device; on this CPU
    run the count is what carries over. ``hook`` / ``step``: inside region ``hook`` / in all."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, clock: Clock):
        self.clock = clock
        self.hook = 0
        self.step = 0

    def active(self) -> ContextManager:
        import torch
        return wrapped(torch.Tensor, self.METHODS, self._wrap)

    def _wrap(self, name, fn):
        def counted(t, *a, **k):
            self.step += 1
            self.hook += self.clock.inside(HOOK)
            return fn(t, *a, **k)
        return counted


class MemoryRecorder:
    """CPU tensor memory of named regions, from ONE torch profiler session with
    ``profile_memory``: the raw allocation records ("[memory]" events, +bytes on allocation,
    -bytes on free) in time order, windowed by ``record_function`` markers. Per region: the
    peak of live bytes above its start and the largest single allocation. Op-level memory
    totals would net out a temporary that an op allocates and frees inside itself, so they are
    not used. (tracemalloc is run in another step: with both active, gloo processes crashed.)"""

    PREFIX = "bench_region::"

    def __init__(self):
        self.results: Dict[str, Dict[str, int]] = {}

    @contextlib.contextmanager
    def session(self):
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield self
        events = list(prof.profiler.kineto_results.events())
        mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        for e in events:
            if not e.name().startswith(self.PREFIX):
                continue
            t0, t1 = e.start_ns(), e.start_ns() + e.duration_ns()
            cur = peak = largest = 0
            for t, b in mem:
                if t0 <= t <= t1:
                    cur += b
                    peak = max(peak, cur)
                    largest = max(largest, b)
            self.results[e.name()[len(self.PREFIX):]] = {"peak": peak, "largest": largest}

    def region(self, name: str) -> ContextManager:
        import torch
        return torch.profiler.record_function(self.PREFIX + name)


class HeapPeak:
    """Peak Python heap (tracemalloc) above the start of the region, of its last visit."""

    def __init__(self):
        self.peak = 0

    @contextlib.contextmanager
    def measure(self):
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        try:
            yield
        finally:
            self.peak = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.stop()


# ---------------------------------------------------------------------------------- configs


@dataclass
class SliceInfo:
    """The gradient slices the hook sees on rank 0 (sizes only: holding the views would keep
    the gradient storage alive past the step)."""
    count: int
    largest: int
    total: int
    dtype: str
    L: int
    U: int
    granularity: str


@dataclass
class Round:
    """One measured round of one configuration: forward + backward, then ``engine.step()``."""
    step_wall: float
    step_cpu: float
    region_wall: Dict[str, float]
    region_cpu: Dict[str, float]
    collectives: int = 0                # gradient_shaping.collectives during the step
    active: Optional[bool] = None       # the shaper changed the gradient
    fb_wall: float = 0.0
    fb_cpu: float = 0.0


@dataclass
class Config:
    """One configuration: its DeepSpeed config, engine and what was measured on it (this rank)."""
    name: str
    kind: str                           # baseline, user or shaper
    ds: Dict[str, Any]
    engine: Any = None
    rounds: List[Round] = field(default_factory=list)
    calls: List[Call] = field(default_factory=list)
    syncs_hook: int = 0
    syncs_step: int = 0
    slices: Optional[SliceInfo] = None
    memory: Dict[str, Dict[str, int]] = field(default_factory=dict)   # region -> peak, largest
    heap: HeapPeak = field(default_factory=HeapPeak)

    @property
    def shaping(self):
        return getattr(self.engine, "gradient_shaping", None)


def ds_config(args, clip: float, shaping: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    cfg: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": args.stage},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": clip,
    }
    z = cfg["zero_optimization"]
    if args.ds_skip_norm and clip == 0.0 and args.stage in (1, 2):
        # DeepSpeed computes the global gradient norm every step even without clipping; with a
        # shaper attached (or nothing to clip) that pass is redundant.
        z["compute_grad_norm"] = False
    if args.stage in (1, 2):
        z["reduce_bucket_size"] = args.bucket
        z["allgather_bucket_size"] = args.bucket
    if args.stage == 3:
        z["reduce_bucket_size"] = args.bucket
        z["stage3_prefetch_bucket_size"] = args.bucket
    if args.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if shaping is not None:
        cfg["gradient_shaping"] = shaping
    return cfg


def shaping_section(name: str, clip: float) -> Dict[str, Any]:
    """The registry's default section of ``name`` with this benchmark's overrides."""
    over = OVERRIDES.get(name, {})
    unknown = sorted(set(over) - set(default_params(name)))
    if unknown:
        raise SystemExit(f"OVERRIDES[{name!r}]: {unknown} are not parameters of {name}")
    section = default_section(name)
    section["params"].update({k: clip if v == CLIP else v for k, v in over.items()})
    return section


def known_configs() -> List[str]:
    return list(BASELINES) + list(REGISTRY)


def build_configs(args) -> List[Config]:
    names = args.configs.split(",") if args.configs else known_configs()
    if "ds_clip" not in names:
        names = ["ds_clip"] + names
    out = []
    for n in names:
        if n in BASELINES:
            clip = args.clip if n == "ds_clip" else 0.0
            out.append(Config(n, "user" if n == "user_full_grad" else "baseline", ds_config(args, clip, None)))
        elif n in REGISTRY:
            out.append(Config(n, "shaper", ds_config(args, 0.0, shaping_section(n, args.clip))))
        else:
            raise SystemExit(f"unknown configuration {n!r}; known: {known_configs()}")
    return out


def user_per_layer_clip(engine, max_norm: float) -> None:
    """Today's way to shape per layer under ZeRO: assemble each parameter's full gradient
    (an all-reduce of the whole tensor per parameter), take its norm, write it back scaled."""
    import torch
    from deepspeed.utils import safe_get_full_grad, safe_set_full_grad
    for p in engine.module.parameters():
        if not p.requires_grad:
            continue
        g = safe_get_full_grad(p)
        if g is None:
            continue
        n = float(torch.linalg.vector_norm(g.float()))
        f = min(1.0, max_norm / (n + 1e-6))
        safe_set_full_grad(p, g * f)


# ---------------------------------------------------------------------------------- worker


def _unlink_shm_buffer(dist, rank: int) -> None:
    """DeepSpeed's CPU shm comm op (0.19.8) creates /dev/shm/deepspeed_allreduce_buffer_<uid>_
    <addr>_<port>_<rank> (69 MB) per rank and never unlinks it: every run leaks RAM until the
    host runs out. Once all ranks have mapped each other's buffers (after init), unlinking our
    own is safe: the mappings stay valid until exit."""
    dist.barrier()
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(os.getuid(), os.environ.get("MASTER_ADDR", ""),
                                                           os.environ.get("MASTER_PORT", ""), rank)
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:
        pass


def setup_process(args):
    """Distributed init, threads, logging, megatron-core for LLaMA; returns deepspeed.comm."""
    import faulthandler
    import logging
    faulthandler.enable()
    import torch
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(dist_backend=args.backend)
    if args.accelerator == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        _SYNC[0] = torch.cuda.synchronize
        _REDUCE_DEVICE[0] = f"cuda:{torch.cuda.current_device()}"
    _unlink_shm_buffer(dist, dist.get_rank())
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("megatron_shaping").setLevel(logging.WARNING)
    if args.model == "llama":
        from megatron.core import parallel_state as ps
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    return dist


def start_engine(args, c: Config, clock: Clock):
    """The engine of ``c`` with DeepSpeed's norm and clip functions in the clock's regions
    (instance attributes of this engine's optimizer / engine); returns the LLaMA config or None."""
    import torch
    import megatron_shaping
    llama_cfg = None
    if args.model == "llama":
        model, llama_cfg = make_llama(args, seed=1234)
    else:
        model = make_mlp(args.width, args.layers, seed=1234)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, foreach=True)
    c.engine, _, _, _ = megatron_shaping.initialize(model=model, optimizer=opt, config=c.ds)
    dsopt = c.engine.optimizer
    for norm_fn in ("scaled_global_norm", "_get_norm_groups"):      # ZeRO 1/2, ZeRO-3
        if hasattr(dsopt, norm_fn):
            setattr(dsopt, norm_fn, clock.wrap(DSNORM, getattr(dsopt, norm_fn)))
            break
    if hasattr(dsopt, "unscale_and_clip_grads"):
        dsopt.unscale_and_clip_grads = clock.wrap(DSCLIP, dsopt.unscale_and_clip_grads)
    elif hasattr(c.engine, "clip_fp32_gradients"):
        # ZeRO-0 fp32: DeepSpeed clips with clip_grad_norm_ (its norm and multiply together)
        c.engine.clip_fp32_gradients = clock.wrap(DSCLIP, c.engine.clip_fp32_gradients)
    return llama_cfg


def slice_info(c: Config) -> Optional[SliceInfo]:
    """The slices the hook will see in this step (call between backward and the step)."""
    sh = c.shaping
    if sh is None:
        return None
    sizes, dtype = [], ""
    for pc in sh.adapter.pieces(False):
        sizes.append(pc.grad.numel())
        dtype = str(pc.grad.dtype).replace("torch.", "")
    if not sizes:
        return None
    layout = sh.session.layout
    return SliceInfo(len(sizes), max(sizes), sum(sizes), dtype, layout.num_groups, int(layout.unit_group.numel()),
                     sh.session.granularity)


class Runner:
    """The measurement loop of one rank over the configurations."""

    def __init__(self, args, dist, configs: List[Config], data: Data, clock: Clock):
        import torch
        self.args, self.dist, self.configs, self.data, self.clock = args, dist, configs, data, clock
        self.rank = dist.get_rank()
        self.dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    def fwd_bwd(self, c: Config, step: int) -> Tuple[float, float]:
        """Forward and backward; returns their (wall, CPU) seconds."""
        eng = c.engine
        batch = tuple(t.to(eng.device) for t in self.data.batch(step, self.rank, self.dtype))
        self.dist.barrier()
        _SYNC[0]()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = eng(*batch)
        eng.backward(loss)
        _SYNC[0]()
        return time.perf_counter() - t0, time.process_time() - c0

    def step(self, c: Config, *counters) -> Round:
        """``engine.step()`` (after the user loop for user_full_grad), timed with its regions;
        ``counters`` (CommCounter, SyncCounter) are active during it."""
        sh = c.shaping
        coll0 = sh.collectives if sh is not None else 0
        self.clock.reset()
        self.dist.barrier()
        with contextlib.ExitStack() as stack:
            for counter in counters:
                stack.enter_context(counter.active())
            stack.enter_context(profiling.recording(self.clock))
            _SYNC[0]()
            t0, c0 = time.perf_counter(), time.process_time()
            if c.kind == "user":
                with self.clock.region(HOOK):
                    user_per_layer_clip(c.engine, self.args.clip)
            c.engine.step()
            _SYNC[0]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
        rnd = Round(dt, dc, dict(self.clock.wall), dict(self.clock.cpu))
        if sh is not None:
            rnd.collectives = sh.collectives - coll0
            if sh.session.last is not None:
                rnd.active = float((sh.session.last.factor - 1).abs().max()) > 1e-6 or rnd.collectives > 1
        return rnd

    def rounds(self) -> None:
        """Warm-up and measured rounds, round-robin with a rotating start."""
        args, n = self.args, len(self.configs)
        total, t_start = args.warmup + args.steps, time.time()
        gc.collect()
        gc.disable()
        for r in range(total):
            for c in [self.configs[(r + i) % n] for i in range(n)]:   # no fixed position in the round
                fb, fb_cpu = self.fwd_bwd(c, r)
                rnd = self.step(c)
                rnd.fb_wall, rnd.fb_cpu = fb, fb_cpu
                if r >= args.warmup:
                    c.rounds.append(rnd)
            gc.collect()
            if self.rank == 0 and (r + 1) % max(1, total // 5) == 0:
                print(f"[bench] round {r + 1}/{total} ({time.time() - t_start:.0f} s)", flush=True)
        gc.enable()

    def counted_steps(self, r: int) -> None:
        """One extra step per configuration: collectives, host syncs and tensor memory (hook,
        DeepSpeed's norm, the whole step); then one more for the hook's Python heap."""
        recorder = MemoryRecorder()
        with recorder.session():
            for c in self.configs:
                self.fwd_bwd(c, r)
                c.slices = slice_info(c)
                comm, syncs = CommCounter(self.clock), SyncCounter(self.clock)
                self.clock.around = {k: (lambda k=k, c=c: recorder.region(f"{c.name}:{k}")) for k in (HOOK, DSNORM)}
                try:
                    with recorder.region(f"{c.name}:step"):
                        self.step(c, comm, syncs)
                finally:
                    self.clock.around = {}
                c.calls, c.syncs_hook, c.syncs_step = comm.calls, syncs.hook, syncs.step
        for c in self.configs:
            c.memory = {k: recorder.results.get(f"{c.name}:{k}", {}) for k in (HOOK, DSNORM, "step")}
            self.fwd_bwd(c, r + 1)
            self.clock.around = {HOOK: c.heap.measure}
            try:
                self.step(c)
            finally:
                self.clock.around = {}

    def profile(self, names: List[str], r: int) -> None:
        """cProfile ``--profile-steps`` more steps of each named configuration (printed on rank 0)."""
        import cProfile
        import io
        import pstats
        for c in self.configs:
            if c.name not in names:
                continue
            # CPU time by default, the measure the targets are judged on (a wall-clock profile
            # charges gloo's wait for the other rank to the collective that waits)
            pr = cProfile.Profile(time.process_time) if self.args.profile_clock == "cpu" else cProfile.Profile()
            for k in range(self.args.profile_steps):
                self.fwd_bwd(c, r + k)
                pr.enable()
                self.step(c)
                pr.disable()
            if self.rank == 0:
                if self.args.profile_dump:
                    pr.dump_stats(f"{self.args.profile_dump}.{c.name}")
                buf = io.StringIO()
                pstats.Stats(pr, stream=buf).sort_stats(self.args.profile_sort).print_stats(
                    *([self.args.profile_filter] if self.args.profile_filter else []), self.args.profile_top)
                print(f"\n== cProfile ({self.args.profile_clock} time) of {self.args.profile_steps} engine.step() of {c.name} "
                      f"(rank 0, by {self.args.profile_sort})\n"
                      + buf.getvalue())


# ---------------------------------------------------------------------------------- results


@dataclass
class Paired:
    """Median over rounds of a time (ms) and of its ratio to ds_clip's in the same round, with
    the interquartile ranges."""
    ms: float
    iqr_ms: List[float]
    ratio: float
    ratio_iqr: List[float]

    @classmethod
    def of(cls, xs: List[float], base: List[float]) -> "Paired":
        paired = [x / b for x, b in zip(xs, base)]
        return cls(1e3 * statistics.median(xs), [1e3 * q for q in _quartiles(xs)], statistics.median(paired),
                   _quartiles(paired))


@dataclass
class Collectives:
    """The collectives of the counted step (all of deepspeed.comm) and ours among them."""
    step: int
    bytes_step: int
    ops_step: str
    hook: int                           # issued inside our hook (or the user loop)
    bytes_hook: int
    hook_vectors: List[Tuple[str, int, str]]     # (op, numel, dtype) of the first four of ours
    per_step: float                     # median of gradient_shaping.collectives per measured step

    @classmethod
    def of(cls, c: Config) -> "Collectives":
        ours = [x for x in c.calls if x.hook]
        per_step = statistics.median([r.collectives for r in c.rounds]) if c.rounds else 0
        return cls(len(c.calls), sum(x.bytes for x in c.calls), _op_summary(c.calls), len(ours),
                   sum(x.bytes for x in ours), [(x.op, x.numel, x.dtype) for x in ours][:4], per_step)


@dataclass
class Memory:
    """Bytes, max over ranks: peak of live tensor bytes above the region's start and the largest
    single allocation (torch profiler), the hook's Python heap peak (tracemalloc)."""
    hook_peak: int
    hook_largest: int
    hook_python: int
    step_peak: int
    step_largest: int
    dsnorm_peak: int

    @staticmethod
    def row(c: Config) -> List[int]:
        m = c.memory
        return [m[HOOK].get("peak", 0), m[HOOK].get("largest", 0), c.heap.peak, m["step"].get("peak", 0),
                m["step"].get("largest", 0), m[DSNORM].get("peak", 0)]


@dataclass
class Result:
    """What the benchmark reports for one configuration (rank 0, all ranks gathered)."""
    name: str
    kind: str
    target: Optional[float]             # step CPU ratio target (TARGETS)
    iter_target: Optional[float]
    step: Paired                        # engine.step() wall time, slowest rank
    step_cpu: Paired                    # engine.step() CPU time per rank
    iter: Paired                        # forward + backward + step
    iter_cpu: Paired
    region_ms: Dict[str, float]         # median wall ms per region of REGIONS
    region_cpu_ms: Dict[str, float]     # median CPU ms per rank
    syncs_hook: int
    syncs_step: int
    active_steps: Optional[int]         # rounds where the shaper changed the gradient
    collectives: Collectives
    memory: Memory
    slices: Optional[SliceInfo]
    slice_rebuilds: Optional[int]
    storage_changes: Optional[int]
    norms_replaced: Optional[int]       # steps whose DeepSpeed norm pass was replaced
    est_ratio: float = math.nan         # see estimate()
    iter_est: float = math.nan          # see estimate()


@dataclass
class Meta:
    """The run: model, parallel layout, versions, host."""
    accelerator: str
    backend: str
    ds_skip_norm: bool
    model: str
    params: int
    tensors: int
    world: int
    stage: int
    dtype: str
    adapter: str
    rounds: int
    warmup: int
    clip: float
    width: Optional[int]
    layers: Optional[int]
    micro_batch: int
    torch: str
    deepspeed: str
    threads_per_rank: int
    cpus: Optional[int]
    wall_s: float = 0.0
    loadavg: Tuple[float, float, float] = (0.0, 0.0, 0.0)


def gather_times(dist, configs: List[Config], world: int) -> Dict[str, Tuple[Any, Any]]:
    """Per quantity (step, iter, each region): [configs x rounds] seconds, wall (slowest rank)
    and CPU (the work of all ranks, per rank)."""
    import torch
    get: Dict[str, Callable[[Round], Tuple[float, float]]] = {
        "step": lambda r: (r.step_wall, r.step_cpu),
        "iter": lambda r: (r.fb_wall + r.step_wall, r.fb_cpu + r.step_cpu)}
    for k in REGIONS:
        get[k] = lambda r, k=k: (r.region_wall.get(k, 0.0), r.region_cpu.get(k, 0.0))
    out = {}
    for k, fn in get.items():
        pairs = [[fn(r) for r in c.rounds] for c in configs]
        dev = _REDUCE_DEVICE[0]
        wall = torch.tensor([[p[0] for p in row] for row in pairs], dtype=torch.float64, device=dev)
        cpu = torch.tensor([[p[1] for p in row] for row in pairs], dtype=torch.float64, device=dev)
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
        dist.all_reduce(cpu, op=dist.ReduceOp.SUM)
        out[k] = (wall.cpu(), cpu.cpu() / world)
    return out


def gather_memory(dist, configs: List[Config]) -> List[Memory]:
    import torch
    mem = torch.tensor([Memory.row(c) for c in configs], dtype=torch.float64, device=_REDUCE_DEVICE[0])
    dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    return [Memory(*(int(v) for v in row)) for row in mem.cpu().tolist()]


def summarise(c: Config, i: int, bi: int, times, memory: Memory) -> Result:
    """The :class:`Result` of configuration ``i`` (``bi``: ds_clip's index)."""
    def paired(k, which):
        t = times[k][which]
        return Paired.of(t[i].tolist(), t[bi].tolist())

    def med(k, which):
        return 1e3 * statistics.median(times[k][which][i].tolist())
    sh = c.shaping
    return Result(
        name=c.name, kind=c.kind, target=TARGETS.get(c.name),
        iter_target=ITERATION_TARGET if c.name in TARGETS else None,
        step=paired("step", 0), step_cpu=paired("step", 1), iter=paired("iter", 0), iter_cpu=paired("iter", 1),
        region_ms={k: med(k, 0) for k in REGIONS}, region_cpu_ms={k: med(k, 1) for k in REGIONS},
        syncs_hook=c.syncs_hook, syncs_step=c.syncs_step,
        active_steps=sum(1 for r in c.rounds if r.active) if sh is not None else None,
        collectives=Collectives.of(c), memory=memory, slices=c.slices,
        slice_rebuilds=getattr(sh, "slice_rebuilds", None), storage_changes=getattr(sh, "storage_changes", None),
        norms_replaced=getattr(getattr(sh, "adapter", None), "norms_replaced", None))


def estimate(results: List[Result], base: Result) -> None:
    """est.: the baseline step with DeepSpeed's norm and clip multiply replaced by this
    configuration's hook, norm and clip multiply (small, directly timed pieces, so far less
    noisy than the difference of two whole steps); iteration est.: the same difference on the
    baseline's whole iteration (forward and backward run the same code with and without shaping)."""
    b = base.region_cpu_ms
    for r in results:
        x = r.region_cpu_ms
        delta = x[HOOK] + x[DSNORM] + x[DSCLIP] - b[DSNORM] - b[DSCLIP]
        r.est_ratio = 1 + delta / base.step_cpu.ms
        r.iter_est = 1 + delta / base.iter_cpu.ms


def describe_run(args, configs: List[Config], world: int) -> Meta:
    import torch
    import deepspeed
    module = configs[0].engine.module
    shaped = next((c for c in configs if c.shaping is not None), None)
    return Meta(accelerator=args.accelerator, backend=args.backend, ds_skip_norm=bool(args.ds_skip_norm),
                model=args.model, params=sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()),
                tensors=sum(1 for p in module.parameters() if p.requires_grad), world=world, stage=args.stage,
                dtype=args.dtype, adapter=shaped.shaping.adapter.name if shaped else "-", rounds=args.steps,
                warmup=args.warmup, clip=args.clip, width=args.width, layers=args.layers,
                micro_batch=args.micro_batch, torch=torch.__version__, deepspeed=deepspeed.__version__,
                threads_per_rank=torch.get_num_threads(), cpus=os.cpu_count())


def worker(args) -> None:
    """One rank: engines, measured rounds, the counted steps, then the report on rank 0."""
    import megatron_shaping
    dist = setup_process(args)
    rank, world = dist.get_rank(), dist.get_world_size()
    clock = Clock()
    configs = build_configs(args)
    llama_cfg = [start_engine(args, c, clock) for c in configs][0]
    meta = describe_run(args, configs, world)
    if rank == 0:
        print(f"[bench] model {args.model}: {meta.params / 1e6:.1f}M parameters in {meta.tensors} tensors; world "
              f"{world}, ZeRO-{args.stage}, {args.dtype}, adapter {meta.adapter}, {len(configs)} engines, "
              f"{args.warmup}+{args.steps} rounds, torch threads {meta.threads_per_rank}; megatron_shaping from "
              f"{os.path.dirname(os.path.dirname(os.path.abspath(megatron_shaping.__file__)))}", flush=True)
    runner = Runner(args, dist, configs, Data(args, llama_cfg), clock)
    t_start = time.time()
    runner.rounds()
    extra = args.warmup + args.steps
    runner.counted_steps(extra)
    if args.profile:
        runner.profile(args.profile.split(","), extra + 2)
    times, memory = gather_times(dist, configs, world), gather_memory(dist, configs)
    if rank != 0:
        return
    bi = [c.name for c in configs].index("ds_clip")
    results = [summarise(c, i, bi, times, memory[i]) for i, c in enumerate(configs)]
    estimate(results, results[bi])
    meta.wall_s, meta.loadavg = time.time() - t_start, os.getloadavg()
    write_outputs(args, meta, results)


def write_outputs(args, meta: Meta, results: List[Result]) -> None:
    print_report(meta, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": asdict(meta), "results": [asdict(r) for r in results]}, f, indent=1)
        print(f"[bench] wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_report(meta, results))
        print(f"[bench] wrote {args.markdown}")


def _quartiles(xs: List[float]) -> List[float]:
    if len(xs) < 2:
        return [xs[0], xs[0]] if xs else [math.nan, math.nan]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return [q[0], q[2]]


def _op_summary(calls: List[Call]) -> str:
    agg: Dict[str, List[int]] = {}
    for x in calls:
        a = agg.setdefault(x.op, [0, 0])
        a[0] += 1
        a[1] += x.bytes
    return ", ".join(f"{op} x{n} ({_fmt_bytes(b)})" for op, (n, b) in agg.items())


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(b) < 1024 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024.0
    return str(b)


# ---------------------------------------------------------------------------------- reports


def _slice_bytes(s: SliceInfo) -> Tuple[int, int]:
    """(largest slice, all slices of the rank) in bytes."""
    esz = {"bfloat16": 2, "float16": 2, "float64": 8}.get(s.dtype, 4)
    return s.largest * esz, s.total * esz


def _active(r: Result, meta: Meta) -> str:
    return "-" if r.active_steps is None else f"{r.active_steps}/{meta.rounds}"


def print_report(meta: Meta, results: List[Result]) -> None:
    print()
    print(f"== optimizer step: {meta.model} {meta.params / 1e6:.1f}M params / {meta.tensors} tensors, "
          f"world {meta.world}, ZeRO-{meta.stage}, {meta.dtype} ({meta.adapter}); "
          f"{meta.rounds} interleaved rounds after {meta.warmup} warm-up"
          + ("; DeepSpeed's norm pass off where nothing clips (--ds-skip-norm)" if meta.ds_skip_norm else ""))
    print_step_table(results)
    print_inside_table(meta, results)
    print_collectives(results)
    print_memory(results)
    print(f"\n[bench] wall {meta.wall_s:.0f} s, load average {meta.loadavg[0]:.1f} on {meta.cpus} CPUs")


def _within(target: Optional[float], *ratios: float) -> str:
    """"yes"/"NO" per ratio against the target ("-" without one), joined by "/"."""
    return "-" if not target else "/".join("yes" if v <= target else "NO" for v in ratios)


def print_step_table(results: List[Result]) -> None:
    print("   wall = engine.step() wall time (slowest rank); CPU = process CPU time of engine.step() per rank "
          "(user+system, all threads: insensitive to waiting for a core on a busy host)")
    print("   ratio = median over rounds of (step / ds_clip step of the same round), [interquartile range]; "
          "est. = 1 + (hook + DS norm + DS clip multiply - those of ds_clip) / ds_clip step, all CPU (a low-noise "
          "estimate from directly timed parts); ok = within target (CPU ratio / est.); iter est. = the same "
          "difference on ds_clip's iteration")
    hdr = (f"{'config':20s} {'wall ms':>8s} {'wall ratio':>10s} {'[IQR]':>13s} {'CPU ms':>8s} {'CPU ratio':>9s} "
           f"{'[IQR]':>13s} {'est.':>6s} {'target':>7s} {'ok':>7s} {'iter CPU ms':>11s} {'iter ratio':>10s} "
           f"{'[IQR]':>13s} {'iter est.':>9s} {'ok':>7s}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        tgt = f"{r.target:.2f}x" if r.target else "-"
        ok = _within(r.target, r.step_cpu.ratio, r.est_ratio)
        iok = _within(r.iter_target, r.iter_cpu.ratio, r.iter_est)
        wq, cq, iq = r.step.ratio_iqr, r.step_cpu.ratio_iqr, r.iter_cpu.ratio_iqr
        print(f"{r.name:20s} {r.step.ms:8.1f} {r.step.ratio:10.3f} [{wq[0]:5.3f},{wq[1]:5.3f}] "
              f"{r.step_cpu.ms:8.1f} {r.step_cpu.ratio:9.3f} [{cq[0]:5.3f},{cq[1]:5.3f}] {r.est_ratio:6.3f} "
              f"{tgt:>7s} {ok:>7s} {r.iter_cpu.ms:11.1f} {r.iter_cpu.ratio:10.3f} [{iq[0]:5.3f},{iq[1]:5.3f}] "
              f"{r.iter_est:9.3f} {iok:>7s}")


def print_inside_table(meta: Meta, results: List[Result]) -> None:
    print()
    print("== inside the step (medians, ms; CPU per rank): hook = our pre-step hook (user_full_grad: the "
          "safe_get/set_full_grad loop); stats = statistics passes incl. their all-reduce; apply = scaling and "
          "elementwise maps; DS norm = DeepSpeed's optimizer.scaled_global_norm (runs with and without clipping); DS clip "
          "= optimizer.unscale_and_clip_grads (the clip multiply; returns at once without clipping and loss scale; "
          "ZeRO-0 fp32: engine.clip_fp32_gradients, norm and multiply)")
    hdr = (f"{'config':20s} {'hook wall':>9s} {'hook CPU':>8s} {'stats CPU':>9s} {'apply CPU':>9s} "
           f"{'DS norm CPU':>11s} {'DS clip CPU':>11s} {'hook/step CPU':>13s} {'active':>7s} {'syncs hook':>10s} "
           f"{'syncs step':>10s} {'DS norm replaced':>16s} {'slice rebuilds':>14s} {'storage moved':>13s}")
    print(hdr)
    print("-" * len(hdr))
    base = next(r for r in results if r.name == "ds_clip")
    opt = lambda v: "-" if v is None else str(v)   # noqa: E731
    for r in results:
        x = r.region_cpu_ms
        print(f"{r.name:20s} {r.region_ms[HOOK]:9.2f} {x[HOOK]:8.2f} {x[STATS]:9.2f} {x[APPLY]:9.2f} "
              f"{x[DSNORM]:11.2f} {x[DSCLIP]:11.2f} {x[HOOK] / base.step_cpu.ms:13.3f} "
              f"{_active(r, meta):>7s} {r.syncs_hook:10d} {r.syncs_step:10d} {opt(r.norms_replaced):>16s} "
              f"{opt(r.slice_rebuilds):>14s} {opt(r.storage_changes):>13s}")


def print_collectives(results: List[Result]) -> None:
    print()
    print("== collectives in one step (all of deepspeed.comm during engine.step(); 'ours' = issued inside the hook "
          "or the user loop); target: one all-reduce of L values per statistics pass")
    for r in results:
        s, k = r.slices, r.collectives
        vec = "; ".join(f"{op} {n} x {dt}" for op, n, dt in k.hook_vectors) or "-"
        extra = f" L={s.L} U={s.U} ({s.granularity})" if s else ""
        print(f"{r.name:20s} step: {k.step:3d} calls {_fmt_bytes(k.bytes_step):>9s} [{k.ops_step}]")
        print(f"{'':20s} ours: {k.hook:3d} calls {_fmt_bytes(k.bytes_hook):>9s}  "
              f"gradient_shaping.collectives/step={k.per_step}  vectors: {vec}{extra}")


def print_memory(results: List[Result]) -> None:
    print()
    print("== memory (torch CPU tensor allocations: peak of live bytes above the start of the region, max over "
          "ranks; py heap = tracemalloc peak); target: no gradient-sized buffer (the local gradient = all slices "
          "of a rank)")
    hdr = (f"{'config':20s} {'hook peak':>10s} {'largest alloc':>13s} {'py heap':>8s} {'DS norm peak':>12s} "
           f"{'step peak':>10s} {'largest slice':>18s} {'local grad':>10s} {'peak/slice':>10s} {'peak/grad':>9s}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        m = r.memory
        sl = tot = r1 = r2 = "-"
        if r.slices:
            largest, total = _slice_bytes(r.slices)
            sl, tot = f"{_fmt_bytes(largest)} {r.slices.dtype}", _fmt_bytes(total)
            r1, r2 = f"{m.hook_peak / largest:.2f}", f"{m.hook_peak / total:.3f}"
        dsn = _fmt_bytes(m.dsnorm_peak) if r.region_ms[DSNORM] else "-"
        print(f"{r.name:20s} {_fmt_bytes(m.hook_peak):>10s} {_fmt_bytes(m.hook_largest):>13s} "
              f"{_fmt_bytes(m.hook_python):>8s} {dsn:>12s} {_fmt_bytes(m.step_peak):>10s} {sl:>18s} "
              f"{tot:>10s} {r1:>10s} {r2:>9s}")


def markdown_report(meta: Meta, results: List[Result]) -> str:
    """The three tables of :func:`print_report` as Markdown (for docs/BENCHMARKS.md)."""
    head = (f"{meta.model} {meta.params / 1e6:.1f}M parameters / {meta.tensors} tensors, world {meta.world}, "
            f"ZeRO-{meta.stage}, {meta.dtype} (adapter `{meta.adapter}`), {meta.rounds} rounds after "
            f"{meta.warmup} warm-up, load average {meta.loadavg[0]:.1f} on {meta.cpus} CPUs"
            + (", DeepSpeed's norm pass off where nothing clips" if meta.ds_skip_norm else "") + ".")
    wall = (md_step_table_wall(results) + [""]) if meta.accelerator != "cpu" else []
    out = [head, ""] + wall + md_step_table(meta, results) + [""] + md_collectives(results) + [""] + md_memory(results)
    return "\n".join(out) + "\n"


def md_step_table_wall(results: List[Result]) -> List[str]:
    """On an accelerator the measure is wall time (the device's work does not show in the
    host's CPU time; synchronising spins count in it): the step and iteration in wall time,
    targets judged on the paired wall ratio. (Each timed region synchronises on entry and
    exit: a few extra synchronisations per shaped step, which bias the ratio against the
    shapers on a step of a millisecond or two.)"""
    out = ["| config | wall ms | wall ratio [IQR] | target | iteration wall ms | iteration ratio [IQR] | hook wall ms "
           "| stats | apply | DS norm |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        tgt = "-" if not r.target else f"{r.target:.2f}x {'ok' if r.step.ratio <= r.target else '**missed**'}"
        sq, iq, x = r.step.ratio_iqr, r.iter.ratio_iqr, r.region_ms
        out.append(f"| {r.name} | {r.step.ms:.2f} | {r.step.ratio:.3f} [{sq[0]:.2f}, {sq[1]:.2f}] | {tgt} | "
                   f"{r.iter.ms:.1f} | {r.iter.ratio:.3f} [{iq[0]:.2f}, {iq[1]:.2f}] | {x[HOOK]:.2f} | "
                   f"{x[STATS]:.2f} | {x[APPLY]:.2f} | {x[DSNORM]:.2f} |")
    return out


def md_step_table(meta: Meta, results: List[Result]) -> List[str]:
    out = ["| config | CPU ms | CPU ratio [IQR] | est. | target | iteration CPU ms | iteration ratio [IQR] "
           "| iteration est. | hook CPU ms | stats | apply | DS norm | syncs hook / step | active |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        tgt = "-"
        if r.target:
            tgt = f"{r.target:.2f}x {'ok' if r.step_cpu.ratio <= r.target else '**missed**'}"
        itgt = ""
        if r.iter_target:
            itgt = " ok" if r.iter_cpu.ratio <= r.iter_target else " **missed**"
        cq, iq, x = r.step_cpu.ratio_iqr, r.iter_cpu.ratio_iqr, r.region_cpu_ms
        out.append(f"| {r.name} | {r.step_cpu.ms:.1f} | "
                   f"{r.step_cpu.ratio:.3f} [{cq[0]:.2f}, {cq[1]:.2f}] | {r.est_ratio:.3f} | {tgt} | "
                   f"{r.iter_cpu.ms:.0f} | {r.iter_cpu.ratio:.3f} [{iq[0]:.2f}, {iq[1]:.2f}]{itgt} | "
                   f"{r.iter_est:.3f} | {x[HOOK]:.1f} | {x[STATS]:.1f} | {x[APPLY]:.1f} | "
                   f"{x[DSNORM]:.1f} | {r.syncs_hook} / {r.syncs_step} | {_active(r, meta)} |")
    return out


def md_collectives(results: List[Result]) -> List[str]:
    out = ["| config | collectives in the counted step | ours | our vectors | bytes ours |", "|---|---|---:|---|---:|"]
    for r in results:
        s, k = r.slices, r.collectives
        vec = "; ".join(f"{n} x {dt}" for _, n, dt in k.hook_vectors) or "-"
        if len(k.hook_vectors) > 2:
            vec = f"{k.hook} all-reduces, one per parameter (its full fp32 gradient)"
        if s:
            vec += f" (L={s.L}, U={s.U}, {s.granularity})"
        ours = str(k.hook)
        if r.active_steps is not None:
            ours += f" (median {k.per_step:g}/step)"
        out.append(f"| {r.name} | {k.step}: {k.ops_step} | {ours} | {vec} | {_fmt_bytes(k.bytes_hook)} |")
    return out


def md_memory(results: List[Result]) -> List[str]:
    out = ["| config | hook peak | largest alloc | Python heap | DS norm peak | step peak | largest slice "
           "| local gradient | peak / slice |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        m = r.memory
        sl = tot = ratio = "-"
        if r.slices:
            largest, total = _slice_bytes(r.slices)
            sl, tot, ratio = f"{_fmt_bytes(largest)} {r.slices.dtype}", _fmt_bytes(total), f"{m.hook_peak / largest:.2f}"
        out.append(f"| {r.name} | {_fmt_bytes(m.hook_peak)} | {_fmt_bytes(m.hook_largest)} | "
                   f"{_fmt_bytes(m.hook_python)} | {_fmt_bytes(m.dsnorm_peak)} | "
                   f"{_fmt_bytes(m.step_peak)} | {sl} | {tot} | {ratio} |")
    return out


# ---------------------------------------------------------------------------------- main


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="processes started by the deepspeed launcher (default 2)")
    p.add_argument("--accelerator", default="cpu", choices=("cpu", "cuda"),
                   help="DeepSpeed accelerator (default cpu; cuda: one GPU per process, wall time is the measure)")
    p.add_argument("--backend", default=None, help="torch.distributed backend (default gloo on cpu, nccl on cuda)")
    p.add_argument("--stage", type=int, default=2, choices=(0, 1, 2, 3), help="ZeRO stage (default 2)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--model", default="mlp", choices=("mlp", "llama"),
                   help="mlp: --layers x (LayerNorm, Linear) + head; llama: megatron_shaping.model preset")
    p.add_argument("--preset", default="llama-tiny", help="LLaMA preset (with --model llama)")
    p.add_argument("--width", type=int, default=None, help="hidden size (mlp default 512)")
    p.add_argument("--layers", type=int, default=None, help="number of blocks (mlp default 48)")
    p.add_argument("--seq", type=int, default=64, help="sequence length (llama)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=15, help="measured rounds (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="rounds excluded from the statistics (default 3)")
    p.add_argument("--clip", type=float, default=0.05,
                   help="DeepSpeed gradient_clipping of ds_clip, max_norm of norm_clip/zclip, per-layer max norm "
                        "of user_full_grad (default 0.05: active on this model)")
    p.add_argument("--ds-skip-norm", action="store_true",
                   help="zero_optimization.compute_grad_norm=false for every configuration without DeepSpeed "
                        "clipping (ZeRO 1/2): drop DeepSpeed's own, then redundant, gradient-norm pass")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--bucket", type=int, default=int(2e7), help="ZeRO reduce/allgather bucket size (elements)")
    p.add_argument("--configs", default="", help="comma-separated subset of: " + ",".join(known_configs()))
    p.add_argument("--profile", default="", help="comma-separated configurations to cProfile for --profile-steps extra steps (rank 0)")
    p.add_argument("--profile-steps", type=int, default=1, help="steps cProfiled per configuration (default 1)")
    p.add_argument("--profile-dump", default="", help="also write each profile (pstats format) to PATH.<config>")
    p.add_argument("--profile-clock", choices=("cpu", "wall"), default="cpu",
                   help="the profile's clock: process CPU time (default, the benchmark's measure) or wall time")
    p.add_argument("--profile-top", type=int, default=15, help="functions shown per cProfile (default 15)")
    p.add_argument("--profile-sort", default="tottime", help="cProfile sort key (default tottime; e.g. cumulative)")
    p.add_argument("--profile-filter", default="", help="regex on file:function to restrict the cProfile listing")
    p.add_argument("--json", default="", help="also write the results as JSON here")
    p.add_argument("--markdown", default="", help="also write the tables as Markdown here")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model == "mlp":
        args.width = args.width or 512
        args.layers = args.layers or 48
    args.backend = args.backend or ("nccl" if args.accelerator == "cuda" else "gloo")
    ACCELERATOR[0] = args.accelerator
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if not args._worker:
        return launch([a for a in argv if a != "--_worker"], args.world)
    worker(args)
    from megatron_shaping.shutdown import exit_process
    exit_process()      # not through finalization (a gloo race there aborts now and then)


if __name__ == "__main__":
    sys.exit(main())
