#!/usr/bin/env python
"""What gradient shaping costs inside DeepSpeed's optimizer step (a benchmark, not a test).

One run builds one DeepSpeed engine per configuration on the same model and data, and visits
them round-robin, so machine noise falls on every configuration alike:

* ``none``            DeepSpeed, no clipping (``gradient_clipping: 0``);
* ``ds_clip``         DeepSpeed's built-in ``gradient_clipping`` (the baseline of the ratios);
* one per shaper      the ``gradient_shaping`` section, DeepSpeed clipping off;
* ``user_full_grad``  what users do today: ``deepspeed.utils.safe_get_full_grad`` per parameter
                      for per-layer norms, then ``safe_set_full_grad`` to scale (DS clipping off).

Per configuration it reports, on the step only (``engine.step()`` at the accumulation boundary,
which runs our pre-step hook; forward and backward are not timed):

* the median step time over the measured rounds, and the median over rounds of the paired ratio
  step / ds_clip step of the same round, against the targets (``TARGETS``); the same for the
  whole iteration (forward + backward + step, target 1.01x);
* host synchronisations (``.item()``, ``.tolist()``, ``bool()``/``float()``/``int()`` of a
  tensor, ``.cpu()``, ``.numpy()``) made inside the hook and inside the whole step;
* the hook's own time and DeepSpeed's own gradient-norm time (``optimizer.scaled_global_norm``);
* every collective issued during one step (``deepspeed.comm`` backend wrapped), the ones our
  hook issues, their sizes, and ``engine.gradient_shaping.collectives``;
* the peak extra memory of the hook and of the whole step (torch profiler memory events; Python
  heap by tracemalloc), set against the largest local gradient slice.

Run it from the repository root (it starts the ``deepspeed`` launcher itself)::

    python tools/bench_overhead.py                       # ZeRO-2, fp32, 2 processes
    python tools/bench_overhead.py --dtype bf16 --stage 1 --world 2 --steps 30
    python tools/bench_overhead.py --model llama --preset llama-tiny --layers 12 --width 512

Results: docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
import tracemalloc
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

#: Step-time targets vs DeepSpeed's gradient_clipping (CPU time, issue 11): the hook's
#: statistics pass replaces DeepSpeed's own norm pass, so a norm-based shaper costs nothing.
TARGETS = {"gradient_stabilizer": 1.00, "norm_clip": 1.00, "zclip": 1.00, "adagc": 1.00, "agc": 1.03,
           "spamp": 1.06, "value_clip": 1.08, "entrywise_shrink": 1.08}
ITERATION_TARGET = 1.01     # forward + backward + step, every method
ACCELERATOR = ["cpu"]       # --accelerator (the launcher's DS_ACCELERATOR)
_SYNC: List[Callable] = [lambda: None]   # torch.cuda.synchronize on CUDA, before reading a clock

#: shaper -> (params, kind). Parameters are chosen so that every shaper does its work on every
#: step of this benchmark (a clip that never fires would skip its multiply pass).
SHAPERS: Dict[str, tuple] = {
    "gradient_stabilizer": ({}, "norm"),
    "spamp": ({}, "elementwise"),
    "norm_clip": ({"max_norm": None}, "norm"),             # max_norm = --clip
    "value_clip": ({"clip_value": 1e-4}, "elementwise"),
    "agc": ({"clipping": 0.01}, "norm"),
    "zclip": ({"warmup_steps": 2, "max_grad_norm": None}, "norm"),  # max_grad_norm = --clip
    "adagc": ({"warmup_steps": 0}, "norm"),
    "entrywise_shrink": ({"threshold": 3.0}, "elementwise"),
}
BASELINES = ("none", "ds_clip", "user_full_grad")

# ---------------------------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: List[str], world: int) -> int:
    """Re-run this file under the deepspeed launcher with ``world`` processes."""
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = ACCELERATOR[0]
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher, "--num_gpus", str(world), "--master_port", str(_free_port()), os.path.abspath(__file__),
           "--_worker"] + argv
    return subprocess.call(cmd, env=env)


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


class Timed:
    """Wraps a callable; accumulates its wall time in ``total`` and the CPU time of the whole
    process (all threads, user + system) in ``cpu`` (both reset per step)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.total = 0.0
        self.cpu = 0.0

    def reset(self):
        self.total = self.cpu = 0.0

    def __call__(self, *a, **k):
        _SYNC[0]()
        t, c = time.perf_counter(), time.process_time()
        try:
            return self.fn(*a, **k)
        finally:
            _SYNC[0]()
            self.total += time.perf_counter() - t
            self.cpu += time.process_time() - c


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


class CommCounter:
    """Counts every collective that goes through deepspeed.comm (its backend object, which every
    ``deepspeed.comm.<op>`` calls), and which of them our hook issued. Bytes of a call = the
    largest tensor argument (the buffer reduced or gathered into)."""

    def __init__(self):
        self.calls: List[Dict[str, Any]] = []
        self.in_hook = False
        self._saved = []

    @contextmanager
    def active(self):
        from deepspeed.comm import comm as dscomm
        cdb = dscomm.cdb
        for name in COLLECTIVES:
            fn = getattr(cdb, name, None)
            if fn is None:
                continue
            self._saved.append((cdb, name, name in cdb.__dict__, fn))
            setattr(cdb, name, self._wrap(name, fn))
        try:
            yield self
        finally:
            for obj, name, had, fn in reversed(self._saved):
                if had:
                    setattr(obj, name, fn)
                else:
                    delattr(obj, name)
            self._saved.clear()

    def _wrap(self, name, fn):
        def counted(*a, **k):
            ts = _tensors(list(a) + list(k.values()), [])
            big = max(ts, key=lambda t: t.numel() * t.element_size()) if ts else None
            self.calls.append({"op": name, "hook": self.in_hook,
                               "numel": int(big.numel()) if big is not None else 0,
                               "bytes": int(big.numel() * big.element_size()) if big is not None else 0,
                               "dtype": str(big.dtype).replace("torch.", "") if big is not None else ""})
            return fn(*a, **k)
        return counted


class SyncCounter:
    """Counts device-to-host reads of tensor values: ``Tensor.item``, ``tolist``, ``cpu``,
    ``numpy`` and ``bool()``/``float()``/``int()``/``index`` of a tensor, by wrapping those
    methods of ``torch.Tensor`` while active. On a GPU each of them waits for the device; on
    this CPU run the count is what carries over. ``hook`` / ``step``: counts inside our hook
    and inside the whole ``engine.step()``."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self):
        self.hook = 0
        self.step = 0
        self.in_hook = False
        self._saved = []

    @contextmanager
    def active(self):
        import torch
        for name in self.METHODS:
            fn = getattr(torch.Tensor, name, None)
            if fn is None:
                continue
            self._saved.append((name, name in torch.Tensor.__dict__, fn))
            setattr(torch.Tensor, name, self._wrap(fn))
        try:
            yield self
        finally:
            for name, had, fn in reversed(self._saved):
                if had:
                    setattr(torch.Tensor, name, fn)
                else:
                    delattr(torch.Tensor, name)
            self._saved.clear()

    def _wrap(self, fn):
        counter = self

        def counted(t, *a, **k):
            counter.step += 1
            if counter.in_hook:
                counter.hook += 1
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

    @contextmanager
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

    @contextmanager
    def region(self, name: str):
        import torch
        with torch.profiler.record_function(self.PREFIX + name):
            yield


@contextmanager
def python_heap(out: Dict[str, int], key: str):
    """Peak Python heap (tracemalloc) above the start of the block."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    try:
        yield
    finally:
        out[key] = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()


# ---------------------------------------------------------------------------------- configs


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


def shaper_params(name: str, args) -> Dict[str, Any]:
    params = dict(SHAPERS[name][0])
    for k, v in params.items():
        if v is None:
            params[k] = args.clip
    return params


def build_configs(args) -> List[Dict[str, Any]]:
    names = args.configs.split(",") if args.configs else list(BASELINES) + list(SHAPERS)
    if "ds_clip" not in names:
        names = ["ds_clip"] + names
    out = []
    for n in names:
        if n == "none":
            out.append({"name": n, "kind": "baseline", "ds": ds_config(args, 0.0, None)})
        elif n == "ds_clip":
            out.append({"name": n, "kind": "baseline", "ds": ds_config(args, args.clip, None)})
        elif n == "user_full_grad":
            out.append({"name": n, "kind": "user", "ds": ds_config(args, 0.0, None)})
        elif n in SHAPERS:
            out.append({"name": n, "kind": SHAPERS[n][1],
                        "ds": ds_config(args, 0.0, {"type": n, "params": shaper_params(n, args)})})
        else:
            raise SystemExit(f"unknown configuration {n!r}; known: {list(BASELINES) + list(SHAPERS)}")
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


def worker(args) -> None:
    import faulthandler
    faulthandler.enable()
    import torch
    import deepspeed
    import deepspeed.comm as dist
    import megatron_shaping

    deepspeed.init_distributed(dist_backend=args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.accelerator == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        _SYNC[0] = torch.cuda.synchronize
    _unlink_shm_buffer(dist, rank)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import logging
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("megatron_shaping").setLevel(logging.WARNING)

    llama_cfg = None
    if args.model == "llama":
        from megatron.core import parallel_state as ps
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    # The statistics passes (local sums + all-reduce) and the application, timed apart. Patched
    # on the class, so no per-step SliceSet is referenced from here.
    from megatron_shaping.stats.slices import SliceSet
    part_t = {"stats": Timed(SliceSet.compute), "apply": Timed(SliceSet.apply)}
    SliceSet.compute = lambda self, *a, **k: part_t["stats"](self, *a, **k)
    SliceSet.apply = lambda self, *a, **k: part_t["apply"](self, *a, **k)

    configs = build_configs(args)
    for c in configs:
        if args.model == "llama":
            model, llama_cfg = make_llama(args, seed=1234)
        else:
            model = make_mlp(args.width, args.layers, seed=1234)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, foreach=True)
        engine, _, _, _ = megatron_shaping.initialize(model=model, optimizer=opt, config=c["ds"])
        c["engine"] = engine
        c["shaping"] = getattr(engine, "gradient_shaping", None)
        c["hook"] = None
        if c["shaping"] is not None:
            sh = c["shaping"]
            c["hook"] = sh.shape = Timed(sh.shape)
            c["want_slices"] = False

            def capture(orig=sh._slice_set, c=c):
                ss, pieces = orig()
                if c["want_slices"]:
                    # Sizes only: holding the SliceSet would keep the gradient storage alive
                    # past the hook and inflate the step's memory.
                    sizes = [x.grad.numel() for x in ss.slices]
                    c["slices"] = {"count": len(sizes), "largest": max(sizes), "total": sum(sizes),
                                   "dtype": str(ss.slices[0].grad.dtype).replace("torch.", ""),
                                   "L": ss.layout.num_groups, "U": int(ss.layout.unit_group.numel()),
                                   "granularity": c["shaping"].session.granularity}
                return ss, pieces
            sh._slice_set = capture
        c["dsnorm"] = None
        for norm_fn in ("scaled_global_norm", "_get_norm_groups"):      # ZeRO 1/2, ZeRO-3
            if hasattr(engine.optimizer, norm_fn):
                c["dsnorm"] = Timed(getattr(engine.optimizer, norm_fn))
                setattr(engine.optimizer, norm_fn, c["dsnorm"])
                break
        c["dsclip"] = None
        if hasattr(engine.optimizer, "unscale_and_clip_grads"):
            c["dsclip"] = engine.optimizer.unscale_and_clip_grads = Timed(engine.optimizer.unscale_and_clip_grads)
        elif hasattr(engine, "clip_fp32_gradients"):
            # ZeRO-0 fp32: DeepSpeed clips with clip_grad_norm_ (its norm and multiply together)
            c["dsclip"] = engine.clip_fp32_gradients = Timed(engine.clip_fp32_gradients)
        c["user"] = Timed(user_per_layer_clip) if c["kind"] == "user" else None
        c["rows"] = []
    data = Data(args, llama_cfg)

    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in configs[0]["engine"].module.parameters())
    n_tensors = sum(1 for p in configs[0]["engine"].module.parameters() if p.requires_grad)
    first_shaped = next((c for c in configs if c["shaping"] is not None), None)
    adapter = first_shaped["shaping"].adapter.name if first_shaped else "-"
    if rank == 0:
        print(f"[bench] model {args.model}: {n_params / 1e6:.1f}M parameters in {n_tensors} tensors; world {world}, "
              f"ZeRO-{args.stage}, {args.dtype}, adapter {adapter}, {len(configs)} engines, "
              f"{args.warmup}+{args.steps} rounds, torch threads {torch.get_num_threads()}; megatron_shaping from "
              f"{os.path.dirname(os.path.dirname(os.path.abspath(megatron_shaping.__file__)))}", flush=True)

    def fwd_bwd(c, step):
        """Forward and backward; returns their (wall, CPU) seconds."""
        eng = c["engine"]
        batch = tuple(t.to(eng.device) for t in data.batch(step, rank, dtype))
        dist.barrier()
        _SYNC[0]()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = eng(*batch)
        eng.backward(loss)
        _SYNC[0]()
        return time.perf_counter() - t0, time.process_time() - c0

    def timed_step(c, counter: Optional[CommCounter] = None, syncs: Optional[SyncCounter] = None):
        eng = c["engine"]
        probes = {"hook": c["hook"] or c["user"], "dsnorm": c["dsnorm"], "dsclip": c["dsclip"],
                  "stats": part_t["stats"], "apply": part_t["apply"]}
        for t in probes.values():
            if t is not None:
                t.reset()
        sh = c["shaping"]
        coll0 = sh.collectives if sh is not None else 0
        dist.barrier()
        with counter.active() if counter is not None else _nullcontext(), \
                syncs.active() if syncs is not None else _nullcontext():
            _SYNC[0]()
            t0, c0 = time.perf_counter(), time.process_time()
            if c["user"] is not None:
                c["user"](eng, args.clip)
            eng.step()
            _SYNC[0]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
        row = {"step": dt, "step_cpu": dc, "collectives": (sh.collectives - coll0) if sh is not None else 0}
        for k, t in probes.items():
            row[k] = t.total if t is not None else 0.0
            row[k + "_cpu"] = t.cpu if t is not None else 0.0
        if sh is not None and sh.session.last is not None:
            row["active"] = float((sh.session.last.factor - 1).abs().max()) > 1e-6 or row["collectives"] > 1
        return row

    # ------------------------------------------------------------------ timed rounds
    n = len(configs)
    t_start = time.time()
    gc.collect()
    gc.disable()
    for r in range(args.warmup + args.steps):
        order = [configs[(r + i) % n] for i in range(n)]     # rotate: no fixed position in the round
        for c in order:
            fb, fb_cpu = fwd_bwd(c, r)
            row = timed_step(c)
            row["iter"], row["iter_cpu"] = fb + row["step"], fb_cpu + row["step_cpu"]
            if r >= args.warmup:
                c["rows"].append(row)
        gc.collect()
        if rank == 0 and (r + 1) % max(1, (args.warmup + args.steps) // 5) == 0:
            print(f"[bench] round {r + 1}/{args.warmup + args.steps} ({time.time() - t_start:.0f} s)", flush=True)
    gc.enable()

    # ------------------------------------------------------------------ extra, untimed steps
    # Step A counts every collective of the step and profiles the tensor memory of the step and
    # of the hook (or the user loop) inside it; step B measures the hook's Python heap.
    r_extra = args.warmup + args.steps
    recorder = MemoryRecorder()

    def wrap_probe(c, make, probe=None):
        probe = probe or c["hook"] or c["user"]
        if probe is None:
            return lambda: None
        inner = probe.fn
        probe.fn = make(inner)

        def restore():
            probe.fn = inner
        return restore

    with recorder.session():
        for c in configs:
            fwd_bwd(c, r_extra)
            counter = CommCounter()
            syncs = SyncCounter()
            c["want_slices"] = True

            def make(inner, c=c, counter=counter, syncs=syncs):
                def probed(*a):
                    counter.in_hook = syncs.in_hook = True
                    try:
                        with recorder.region(c["name"] + ":hook"):
                            return inner(*a)
                    finally:
                        counter.in_hook = syncs.in_hook = False
                return probed
            restore = wrap_probe(c, make)

            def make_ds(inner, c=c):
                def probed(*a, **k):
                    with recorder.region(c["name"] + ":dsnorm"):
                        return inner(*a, **k)
                return probed
            restore_ds = wrap_probe(c, make_ds, c["dsnorm"]) if c["dsnorm"] is not None else (lambda: None)
            with recorder.region(c["name"] + ":step"):
                timed_step(c, counter, syncs)
            restore()
            restore_ds()
            c["comm"] = counter.calls
            c["syncs"] = (syncs.hook, syncs.step)
            c["want_slices"] = False
    py_heap: Dict[str, int] = {}
    for c in configs:
        fwd_bwd(c, r_extra + 1)

        def make(inner, c=c):
            def probed(*a):
                with python_heap(py_heap, c["name"]):
                    return inner(*a)
            return probed
        restore = wrap_probe(c, make)
        timed_step(c)
        restore()
    for c in configs:
        c["mem_hook"] = dict(recorder.results.get(c["name"] + ":hook", {}), python_peak=py_heap.get(c["name"], 0))
        c["mem_step"] = recorder.results.get(c["name"] + ":step", {})
        c["mem_dsnorm"] = recorder.results.get(c["name"] + ":dsnorm", {})
    if args.profile:
        import cProfile
        import io
        import pstats
        for c in configs:
            if c["name"] not in args.profile.split(","):
                continue
            fwd_bwd(c, r_extra + 2)
            pr = cProfile.Profile()
            pr.enable()
            timed_step(c)
            pr.disable()
            if rank == 0:
                buf = io.StringIO()
                pstats.Stats(pr, stream=buf).sort_stats(args.profile_sort).print_stats(*([args.profile_filter] if args.profile_filter else []), args.profile_top)
                print(f"\n== cProfile of one engine.step() of {c['name']} (rank 0, by {args.profile_sort})\n" + buf.getvalue())

    # ------------------------------------------------------------------ gather and report
    keys = ("step", "iter", "hook", "stats", "apply", "dsnorm", "dsclip")
    per = {}
    for k in keys:
        wall = torch.tensor([[row[k] for row in c["rows"]] for c in configs], dtype=torch.float64)
        cpu = torch.tensor([[row[k + "_cpu"] for row in c["rows"]] for c in configs], dtype=torch.float64)
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)     # a step lasts as long as its slowest rank
        dist.all_reduce(cpu, op=dist.ReduceOp.SUM)      # the work of all ranks ...
        per[k], per[k + "_cpu"] = wall, cpu / world     # ... reported per rank
    mem = torch.tensor([[c["mem_hook"].get("peak", 0), c["mem_hook"].get("largest", 0),
                         c["mem_hook"].get("python_peak", 0), c["mem_step"].get("peak", 0),
                         c["mem_step"].get("largest", 0), c["mem_dsnorm"].get("peak", 0)] for c in configs],
                       dtype=torch.float64)
    dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    if rank != 0:
        return
    bi = [c["name"] for c in configs].index("ds_clip")
    results = []
    med = lambda t: 1e3 * statistics.median(t.tolist())   # noqa: E731
    for i, c in enumerate(configs):
        calls = c["comm"]
        hook_calls = [x for x in calls if x["hook"]]
        target = TARGETS.get(c["name"])
        res = {"name": c["name"], "kind": c["kind"], "target": target,
               "iter_target": ITERATION_TARGET if c["name"] in TARGETS else None}
        for k in ("step", "step_cpu", "iter", "iter_cpu"):
            paired = per[k][i] / per[k][bi]
            res[k + "_ms"] = med(per[k][i])
            res[k + "_iqr_ms"] = [1e3 * q for q in _quartiles(per[k][i].tolist())]
            res[k + "_ratio"] = statistics.median(paired.tolist())
            res[k + "_ratio_iqr"] = _quartiles(paired.tolist())
        for k in ("hook", "hook_cpu", "stats", "stats_cpu", "apply", "apply_cpu", "dsnorm", "dsnorm_cpu", "dsclip",
                  "dsclip_cpu"):
            res[k + "_ms"] = med(per[k][i])
        res.update({
            "collectives_step": len(calls),
            "bytes_step": sum(x["bytes"] for x in calls),
            "ops_step": _op_summary(calls),
            "collectives_hook": len(hook_calls),
            "bytes_hook": sum(x["bytes"] for x in hook_calls),
            "hook_vectors": [(x["op"], x["numel"], x["dtype"]) for x in hook_calls][:4],
            "shaping_collectives_per_step": statistics.median([row["collectives"] for row in c["rows"]]),
            "active_steps": sum(1 for row in c["rows"] if row.get("active")) if c["shaping"] is not None else None,
            "mem_hook_peak": int(mem[i, 0]), "mem_hook_largest": int(mem[i, 1]), "mem_hook_python": int(mem[i, 2]),
            "mem_step_peak": int(mem[i, 3]), "mem_step_largest": int(mem[i, 4]), "mem_dsnorm_peak": int(mem[i, 5]),
            "slices": c.get("slices"),
            "syncs_hook": c["syncs"][0], "syncs_step": c["syncs"][1],
            "slice_rebuilds": getattr(getattr(c["shaping"], "_slice_cache", None), "rebuilds", None),
            "storage_changes": getattr(getattr(c["shaping"], "_slice_cache", None), "storage_changes", None),
            "norms_replaced": getattr(getattr(c["shaping"], "adapter", None), "norms_replaced", None),
        })
        results.append(res)
    # Component estimate: the baseline step with DeepSpeed's norm and clip multiply replaced by
    # this configuration's hook, norm and clip multiply (small, directly timed pieces, so far
    # less noisy than the difference of two whole steps).
    b = results[bi]
    for r in results:
        r["est_ratio"] = 1 + (r["hook_cpu_ms"] + r["dsnorm_cpu_ms"] + r["dsclip_cpu_ms"]
                              - b["dsnorm_cpu_ms"] - b["dsclip_cpu_ms"]) / b["step_cpu_ms"]
    meta = {"accelerator": args.accelerator, "backend": args.backend, "ds_skip_norm": bool(args.ds_skip_norm), "model": args.model, "params": n_params, "tensors": n_tensors, "world": world, "stage": args.stage,
            "dtype": args.dtype, "adapter": adapter, "rounds": args.steps, "warmup": args.warmup,
            "clip": args.clip, "width": args.width, "layers": args.layers, "micro_batch": args.micro_batch,
            "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "threads_per_rank": torch.get_num_threads(), "cpus": os.cpu_count(),
            "wall_s": time.time() - t_start, "loadavg": os.getloadavg()}
    print_report(meta, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        print(f"[bench] wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_report(meta, results))
        print(f"[bench] wrote {args.markdown}")


@contextmanager
def _nullcontext():
    yield


def _quartiles(xs: List[float]) -> List[float]:
    if len(xs) < 2:
        return [xs[0], xs[0]] if xs else [math.nan, math.nan]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return [q[0], q[2]]


def _op_summary(calls) -> str:
    agg: Dict[str, List[int]] = {}
    for x in calls:
        a = agg.setdefault(x["op"], [0, 0])
        a[0] += 1
        a[1] += x["bytes"]
    return ", ".join(f"{op} x{n} ({_fmt_bytes(b)})" for op, (n, b) in agg.items())


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(b) < 1024 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024.0
    return str(b)


def print_report(meta, results) -> None:
    print()
    print(f"== optimizer step: {meta['model']} {meta['params'] / 1e6:.1f}M params / {meta['tensors']} tensors, "
          f"world {meta['world']}, ZeRO-{meta['stage']}, {meta['dtype']} ({meta['adapter']}); "
          f"{meta['rounds']} interleaved rounds after {meta['warmup']} warm-up"
          + ("; DeepSpeed's norm pass off where nothing clips (--ds-skip-norm)" if meta["ds_skip_norm"] else ""))
    print("   wall = engine.step() wall time (slowest rank); CPU = process CPU time of engine.step() per rank "
          "(user+system, all threads: insensitive to waiting for a core on a busy host)")
    print("   ratio = median over rounds of (step / ds_clip step of the same round), [interquartile range]; "
          "est. = 1 + (hook + DS norm + DS clip multiply - those of ds_clip) / ds_clip step, all CPU (a low-noise "
          "estimate from directly timed parts); ok = within target (CPU ratio / est.)")
    hdr = (f"{'config':20s} {'wall ms':>8s} {'wall ratio':>10s} {'[IQR]':>13s} {'CPU ms':>8s} {'CPU ratio':>9s} "
           f"{'[IQR]':>13s} {'est.':>6s} {'target':>7s} {'ok':>7s} {'iter CPU ms':>11s} {'iter ratio':>10s} "
           f"{'[IQR]':>13s} {'ok':>4s}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        tgt = f"{r['target']:.2f}x" if r["target"] else "-"
        ok = "-" if not r["target"] else "/".join("yes" if v <= r["target"] else "NO"
                                                   for v in (r["step_cpu_ratio"], r["est_ratio"]))
        iok = "-" if not r["iter_target"] else ("yes" if r["iter_cpu_ratio"] <= r["iter_target"] else "NO")
        wq, cq, iq = r["step_ratio_iqr"], r["step_cpu_ratio_iqr"], r["iter_cpu_ratio_iqr"]
        print(f"{r['name']:20s} {r['step_ms']:8.1f} {r['step_ratio']:10.3f} [{wq[0]:5.3f},{wq[1]:5.3f}] "
              f"{r['step_cpu_ms']:8.1f} {r['step_cpu_ratio']:9.3f} [{cq[0]:5.3f},{cq[1]:5.3f}] {r['est_ratio']:6.3f} "
              f"{tgt:>7s} {ok:>7s} {r['iter_cpu_ms']:11.1f} {r['iter_cpu_ratio']:10.3f} [{iq[0]:5.3f},{iq[1]:5.3f}] "
              f"{iok:>4s}")
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
    base = next(r for r in results if r["name"] == "ds_clip")
    for r in results:
        act = "-" if r["active_steps"] is None else f"{r['active_steps']}/{meta['rounds']}"
        opt = lambda v: "-" if v is None else str(v)   # noqa: E731
        print(f"{r['name']:20s} {r['hook_ms']:9.2f} {r['hook_cpu_ms']:8.2f} {r['stats_cpu_ms']:9.2f} "
              f"{r['apply_cpu_ms']:9.2f} {r['dsnorm_cpu_ms']:11.2f} {r['dsclip_cpu_ms']:11.2f} "
              f"{r['hook_cpu_ms'] / base['step_cpu_ms']:13.3f} "
              f"{act:>7s} {r['syncs_hook']:10d} {r['syncs_step']:10d} {opt(r['norms_replaced']):>16s} "
              f"{opt(r['slice_rebuilds']):>14s} {opt(r['storage_changes']):>13s}")
    print()
    print("== collectives in one step (all of deepspeed.comm during engine.step(); 'ours' = issued inside the hook "
          "or the user loop); target: one all-reduce of L values per statistics pass")
    for r in results:
        s = r["slices"] or {}
        vec = "; ".join(f"{op} {n} x {dt}" for op, n, dt in r["hook_vectors"]) or "-"
        extra = f" L={s['L']} U={s['U']} ({s['granularity']})" if s else ""
        print(f"{r['name']:20s} step: {r['collectives_step']:3d} calls {_fmt_bytes(r['bytes_step']):>9s} "
              f"[{r['ops_step']}]")
        print(f"{'':20s} ours: {r['collectives_hook']:3d} calls {_fmt_bytes(r['bytes_hook']):>9s}  "
              f"gradient_shaping.collectives/step={r['shaping_collectives_per_step']}  vectors: {vec}{extra}")
    print()
    print("== memory (torch CPU tensor allocations: peak of live bytes above the start of the region, max over "
          "ranks; py heap = tracemalloc peak); target: no gradient-sized buffer (the local gradient = all slices "
          "of a rank)")
    hdr = (f"{'config':20s} {'hook peak':>10s} {'largest alloc':>13s} {'py heap':>8s} {'DS norm peak':>12s} "
           f"{'step peak':>10s} {'largest slice':>18s} {'local grad':>10s} {'peak/slice':>10s} {'peak/grad':>9s}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        s = r["slices"]
        if s:
            esz = {"bfloat16": 2, "float16": 2, "float64": 8}.get(s["dtype"], 4)
            largest, total = s["largest"] * esz, s["total"] * esz
            sl = f"{_fmt_bytes(largest)} {s['dtype']}"
            tot = _fmt_bytes(total)
            r1, r2 = f"{r['mem_hook_peak'] / largest:.2f}", f"{r['mem_hook_peak'] / total:.3f}"
        else:
            sl = tot = r1 = r2 = "-"
        dsn = _fmt_bytes(r["mem_dsnorm_peak"]) if r["dsnorm_ms"] else "-"
        print(f"{r['name']:20s} {_fmt_bytes(r['mem_hook_peak']):>10s} {_fmt_bytes(r['mem_hook_largest']):>13s} "
              f"{_fmt_bytes(r['mem_hook_python']):>8s} {dsn:>12s} {_fmt_bytes(r['mem_step_peak']):>10s} {sl:>18s} "
              f"{tot:>10s} {r1:>10s} {r2:>9s}")
    print(f"\n[bench] wall {meta['wall_s']:.0f} s, load average {meta['loadavg'][0]:.1f} on {meta['cpus']} CPUs")


def markdown_report(meta, results) -> str:
    """The three tables of :func:`print_report` as Markdown (for docs/BENCHMARKS.md)."""
    out = [f"{meta['model']} {meta['params'] / 1e6:.1f}M parameters / {meta['tensors']} tensors, world {meta['world']}, "
           f"ZeRO-{meta['stage']}, {meta['dtype']} (adapter `{meta['adapter']}`), {meta['rounds']} rounds after "
           f"{meta['warmup']} warm-up, load average {meta['loadavg'][0]:.1f} on {meta['cpus']} CPUs"
           + (", DeepSpeed's norm pass off where nothing clips" if meta.get("ds_skip_norm") else "") + ".", "",
           "| config | CPU ms | CPU ratio [IQR] | est. | target | iteration CPU ms | iteration ratio [IQR] "
           "| hook CPU ms | stats | apply | DS norm | syncs hook / step | active |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        tgt = "-"
        if r["target"]:
            ok = r["step_cpu_ratio"] <= r["target"]
            tgt = f"{r['target']:.2f}x {'ok' if ok else '**missed**'}"
        itgt = ""
        if r["iter_target"]:
            itgt = " ok" if r["iter_cpu_ratio"] <= r["iter_target"] else " **missed**"
        cq, iq = r["step_cpu_ratio_iqr"], r["iter_cpu_ratio_iqr"]
        act = "-" if r["active_steps"] is None else f"{r['active_steps']}/{meta['rounds']}"
        out.append(f"| {r['name']} | {r['step_cpu_ms']:.1f} | "
                   f"{r['step_cpu_ratio']:.3f} [{cq[0]:.2f}, {cq[1]:.2f}] | {r['est_ratio']:.3f} | {tgt} | "
                   f"{r['iter_cpu_ms']:.0f} | {r['iter_cpu_ratio']:.3f} [{iq[0]:.2f}, {iq[1]:.2f}]{itgt} | "
                   f"{r['hook_cpu_ms']:.1f} | {r['stats_cpu_ms']:.1f} | {r['apply_cpu_ms']:.1f} | "
                   f"{r['dsnorm_cpu_ms']:.1f} | {r['syncs_hook']} / {r['syncs_step']} | {act} |")
    out += ["", "| config | collectives in the counted step | ours | our vectors | bytes ours |",
            "|---|---|---:|---|---:|"]
    for r in results:
        s = r["slices"] or {}
        vec = "; ".join(f"{n} x {dt}" for _, n, dt in r["hook_vectors"]) or "-"
        if len(r["hook_vectors"]) > 2:
            vec = f"{r['collectives_hook']} all-reduces, one per parameter (its full fp32 gradient)"
        if s:
            vec += f" (L={s['L']}, U={s['U']}, {s['granularity']})"
        ours = str(r["collectives_hook"])
        if r["active_steps"] is not None:
            ours += f" (median {r['shaping_collectives_per_step']:g}/step)"
        out.append(f"| {r['name']} | {r['collectives_step']}: {r['ops_step']} | {ours} | {vec} | "
                   f"{_fmt_bytes(r['bytes_hook'])} |")
    out += ["", "| config | hook peak | largest alloc | Python heap | DS norm peak | step peak | largest slice "
            "| local gradient | peak / slice |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s = r["slices"]
        if s:
            esz = {"bfloat16": 2, "float16": 2, "float64": 8}.get(s["dtype"], 4)
            sl = f"{_fmt_bytes(s['largest'] * esz)} {s['dtype']}"
            tot = _fmt_bytes(s["total"] * esz)
            ratio = f"{r['mem_hook_peak'] / (s['largest'] * esz):.2f}"
        else:
            sl = tot = ratio = "-"
        out.append(f"| {r['name']} | {_fmt_bytes(r['mem_hook_peak'])} | {_fmt_bytes(r['mem_hook_largest'])} | "
                   f"{_fmt_bytes(r['mem_hook_python'])} | {_fmt_bytes(r['mem_dsnorm_peak'])} | "
                   f"{_fmt_bytes(r['mem_step_peak'])} | {sl} | {tot} | {ratio} |")
    return "\n".join(out) + "\n"


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
    p.add_argument("--configs", default="", help="comma-separated subset of: " + ",".join(list(BASELINES) + list(SHAPERS)))
    p.add_argument("--profile", default="", help="comma-separated configurations to cProfile for one extra step (rank 0)")
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
    sys.path.insert(0, ROOT)
    worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
