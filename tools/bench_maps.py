#!/usr/bin/env python
"""The elementwise maps in-process, old path (multi-tensor torch ops) vs fused kernel (a benchmark).

For each map (SPAMP's power map, entrywise_shrink's p = 2 map, value_clip's clamp), storage
dtype and size: the CPU time of the map on one slice set of that many elements (one tensor per
slice, sizes as a llama-tiny ZeRO-2 rank's), through ``slices._map_batch`` as the driver runs it,
with ``MEGATRON_SHAPING_KERNELS=0`` (the torch ops: 16-bit slices through fp32 copies) and with
the kernel; median of ``--reps`` runs, 1 thread by default. Also prints the kernel's one-off
build time when it had to build (cold cache).

    python tools/bench_maps.py                     # 1.2M and 6.3M elements, fp32 and bf16
    python tools/bench_maps.py --sizes 1200000 --reps 31

``--against SOURCE``: the kernel of this checkout vs the same kernel built from another version
of ``_maps.c`` (e.g. ``git show 426dc0c:megatron_shaping/stats/_maps.c > /tmp/old_maps.c``),
``ms_run`` alone on the same tensors, the two interleaved rep by rep (columns "other ms" and
"this ms").

``--stats``: the CPU statistics pass instead (``SliceSet.compute`` on the same slices, cut
into rows of 1024 for the unit statistics): sums of squares (norm_clip), sums of squares and of
|x| (entrywise_shrink's first pass) and AGC's gradient and parameter row sums, torch path
(``MEGATRON_SHAPING_KERNELS=0``: fp32 partials, 16-bit widened, exact pass) vs the sum kernel.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from megatron_shaping.shapers import make_layout
from megatron_shaping.shapers.base import SUMABS, SUMSQ, UNIT_PARAM_SUMSQ, UNIT_SUMSQ
from megatron_shaping.shapers.entrywise_shrink import ShrinkMap
from megatron_shaping.shapers.spamp import PowerMap
from megatron_shaping.shapers.value_clip import ClampMap
from megatron_shaping.stats import kernels
from megatron_shaping.stats import slices

#: per-tensor parameters of each map (the clip is below most entries: every entry is visited)
MAPS = {
    "spamp (power)": (PowerMap, {"alpha": 0.8, "coef": 1.7}),
    "shrink p=2": (ShrinkMap, {"T": 2e-3, "p": 2.0}),
    "value_clip": (ClampMap, {"clip": 1e-3}),
}


def _tensors(n: int, dtype) -> list:
    """``n`` elements in tensors of 64K..1M elements (a transformer rank's mix)."""
    sizes, left, k = [], n, 0
    while left > 0:
        s = min(left, (1 << 16) << (k % 5))
        sizes.append(s)
        left -= s
        k += 1
    return [(torch.randn(s) * 1e-3).to(dtype) for s in sizes]


def _time_map(cls, kw: dict, xs: list, kernel: bool, reps: int) -> float:
    os.environ["MEGATRON_SHAPING_KERNELS"] = "1" if kernel else "0"
    foreach = slices._Foreach(cls.apply_foreach_, getattr(cls, "kernel_args", None))
    times = []
    for _ in range(reps):
        work = [x.clone() for x in xs]
        pieces, batch_kw = [], {k: [] for k in kw}
        t0 = time.process_time()
        for x in work:          # in batches of at most WIDEN_BLOCK elements, as SliceSet._map
            for a in range(0, x.numel(), slices.WIDEN_BLOCK):
                pieces.append(x.narrow(0, a, min(slices.WIDEN_BLOCK, x.numel() - a)))
                for k, v in kw.items():
                    batch_kw[k].append(v)
                slices._map_batch(foreach, pieces, batch_kw, 1.0, None)
                pieces, batch_kw = [], {k: [] for k in kw}
        times.append((time.process_time() - t0) * 1e3)
    return statistics.median(times)


def _time_builds(libs: list, name: str, xs: list, reps: int) -> list:
    """CPU ms of one ms_run call of the map ``name`` on fresh copies of ``xs`` with each library
    (median of ``reps``, the libraries interleaved in every rep)."""
    cls, kw = MAPS[name]
    kernel, params = cls.kernel_args(**kw)
    times = [[] for _ in libs]
    for _ in range(reps):
        for i, lib in enumerate(libs):
            work = [x.clone() for x in xs]
            args = kernels._map_args(kernel, work, [[p] * len(work) for p in params])
            t0 = time.process_time()
            rc = lib.ms_run(*args, 1.0)
            times[i].append((time.process_time() - t0) * 1e3)
            if rc:
                raise RuntimeError(f"{name}: ms_run returned {rc} (not run by this build / CPU)")
    return [statistics.median(t) for t in times]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def against_main(args) -> None:
    import ctypes
    import tempfile
    from pathlib import Path
    src = Path(args.against)
    if not src.is_file():
        raise SystemExit(f"--against: {src} is not a file (expected a version of megatron_shaping/stats/_maps.c)")
    other = Path(tempfile.mkdtemp()) / "other.so"
    kernels.build(other, source=src)
    libs = [kernels.bind(ctypes.CDLL(str(other))), kernels._lib]
    print(f"other build: {args.against}; instruction set {kernels.isa()} (0 baseline, 1 AVX2+FMA, 2 AVX-512)")
    print(f"{'map':16s} {'dtype':5s} {'elements':>9s} {'other ms':>9s} {'this ms':>9s} {'speed-up':>8s}")
    for name in MAPS:
        for d in args.dtypes:
            for n in args.sizes:
                old, new = _time_builds(libs, name, _tensors(n, DTYPES[d]), args.reps)
                print(f"{name:16s} {d:5s} {n:9d} {old:9.2f} {new:9.2f} {old / new:7.2f}x")


#: the statistics passes of --stats: (name, what SliceSet.compute is asked)
PASSES = [("sumsq (norm_clip)", frozenset({SUMSQ})), ("sumsq+sumabs (shrink)", frozenset({SUMSQ, SUMABS})),
          ("agc unit pair", frozenset({SUMSQ, UNIT_SUMSQ, UNIT_PARAM_SUMSQ}))]
ROW = 1024


def _stats_set(xs: list) -> slices.SliceSet:
    """One slice per tensor, its own group, rows of ROW elements (parameters: fp32 values)."""
    units = [-(-x.numel() // ROW) for x in xs]
    layout = make_layout([f"t{i}" for i in range(len(xs))], [x.numel() for x in xs], units_per_group=units,
                         unit_numel=[min(ROW, x.numel() - r * ROW) for x in xs for r in range(-(-x.numel() // ROW))])
    out, base = [], 0
    for i, (x, u) in enumerate(zip(xs, units)):
        out.append(slices.GradSlice(x, i, True, torch.randn(x.numel()), 0, ROW, base))
        base += u
    return slices.SliceSet(out, layout)


def _time_stats(ss: slices.SliceSet, needs: frozenset, kernel: bool, reps: int) -> float:
    os.environ["MEGATRON_SHAPING_KERNELS"] = "1" if kernel else "0"
    ss.compute(needs)             # tables / parameter runs built once, as at attach time
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        ss.compute(needs)
        times.append((time.process_time() - t0) * 1e3)
    return statistics.median(times)


def stats_main(args) -> None:
    print(f"{'statistics pass':22s} {'dtype':5s} {'elements':>9s} {'torch ms':>9s} {'kernel ms':>9s} {'speed-up':>8s}")
    for name, needs in PASSES:
        for d in args.dtypes:
            for n in args.sizes:
                ss = _stats_set(_tensors(n, DTYPES[d]))
                old = _time_stats(ss, needs, False, args.reps)
                new = _time_stats(ss, needs, True, args.reps)
                print(f"{name:22s} {d:5s} {n:9d} {old:9.2f} {new:9.2f} {old / new:7.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_200_000, 6_300_000])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stats", action="store_true", help="time the statistics pass instead of the maps")
    ap.add_argument("--against", metavar="SOURCE", help="another version of _maps.c: its kernels vs this checkout's")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cold = not kernels.library_path().exists()
    t0 = time.perf_counter()
    ok = kernels.available()
    print(f"kernels available: {ok}; {'built' if cold else 'loaded'} in {time.perf_counter() - t0:.2f} s "
          f"({kernels.library_path()})")
    if args.stats:
        stats_main(args)
        return
    if args.against:
        if not ok:
            raise SystemExit("--against: the kernels of this checkout are not available")
        against_main(args)
        return
    print(f"{'map':16s} {'dtype':5s} {'elements':>9s} {'torch ms':>9s} {'kernel ms':>9s} {'speed-up':>8s}")
    for name, (cls, kw) in MAPS.items():
        for d in args.dtypes:
            for n in args.sizes:
                xs = _tensors(n, DTYPES[d])
                old = _time_map(cls, kw, xs, False, args.reps)
                new = _time_map(cls, kw, xs, True, args.reps)
                print(f"{name:16s} {d:5s} {n:9d} {old:9.2f} {new:9.2f} {old / new:7.2f}x")


if __name__ == "__main__":
    main()
