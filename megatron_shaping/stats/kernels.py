"""Fused CPU kernels: the elementwise maps (one pass per tensor, in place, no temporary),
the statistics pass's per-chunk float64 sums (:func:`sums`: read only, no buffer), both in one
call (:func:`run_sums`: the map and the sums of what it stored) and AGC's row factors
(:func:`rows`: in place).

The C source is ``_maps.c`` next to this file (what each kernel computes is documented there). It
is compiled on first use with the system C compiler (``$CC``, else ``cc``) into a shared library
cached on disk (``$MEGATRON_SHAPING_KERNEL_DIR``, else ``~/.cache/megatron_shaping/kernels``,
one file per source and flags hash; 1.5-6.5 s to build on a loaded 2-core host) and called
through ctypes on the tensors' data pointers. Flags every x86-64 / aarch64 machine runs: ``-O3`` without
fast-math, ``-ffp-contract=off`` (no FMA contraction), ``-fno-trapping-math -fno-math-errno``
(only exception flags and errno, which let the loops vectorise); on x86-64 the loops are also
compiled for AVX2+FMA and AVX-512 and chosen at run time by the CPU (:func:`isa`; the same
operations in every variant, so the same results).

:func:`run` returns False (the caller takes the torch-op path) when the kernels are disabled
(``MEGATRON_SHAPING_KERNELS=0``), the build failed (one logged warning), a tensor is not a
contiguous CPU tensor of fp32, bf16 or fp16, or the power map gets an exponent outside (0, 1];
:func:`sums` returns None in the same cases, and :func:`rows` (AGC's row factors) False,
:func:`run_sums` None.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_maps.c")
FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: the kernels: their index in ms_run and the number of per-tensor float64 parameters each takes
MAPS = {"power": (0, 2), "shrink2": (1, 2), "clamp": (2, 1)}

_lib: Optional[ctypes.CDLL] = None
_failed = False


def enabled() -> bool:
    return os.environ.get("MEGATRON_SHAPING_KERNELS", "1") != "0"


def _cache_dir() -> Path:
    d = os.environ.get("MEGATRON_SHAPING_KERNEL_DIR")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "megatron_shaping" / "kernels"


def library_path() -> Path:
    """Where the library for this source, compiler and flags is (or will be) cached."""
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, sys.platform] + FLAGS).encode()).hexdigest()[:16]
    return _cache_dir() / f"maps_{key}.so"


def build(path: Path, extra: Sequence[str] = (), source: Path = SOURCE) -> None:
    """Compile the source to ``path`` (written under a temporary name, then renamed: ranks that
    build at the same time each get a whole file). ``extra``: more compiler flags (the tests'
    control variants, e.g. ``-DMS_SUMS_CONTROL=1``; never the package's own library);
    ``source``: another version of ``_maps.c`` (``tools/bench_maps.py --against``)."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, *extra, "-o", tmp, str(source), "-lm"], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> Optional[ctypes.CDLL]:
    global _lib, _failed
    if _lib is not None or _failed:
        return _lib
    try:
        path = library_path()
        if not path.exists():
            build(path)
        _lib = bind(ctypes.CDLL(str(path)))
    except (OSError, RuntimeError, AttributeError) as e:
        _failed = True
        logger.warning("megatron_shaping: fused map kernels unavailable, using torch ops (%s)", e)
    return _lib


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the entry points' signatures on a loaded library (also a test's control build)."""
    dp = ctypes.POINTER(ctypes.c_double)
    lp = ctypes.POINTER(ctypes.c_long)
    ip = ctypes.POINTER(ctypes.c_int)
    lib.ms_run.restype = ctypes.c_int
    lib.ms_run.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.POINTER(ctypes.c_void_p), lp, ip, dp, dp,
                           ctypes.c_double]
    lib.ms_sums.restype = ctypes.c_int
    lib.ms_sums.argtypes = [ctypes.c_long, ctypes.POINTER(ctypes.c_void_p), ip, ip, lp, lp, lp, ctypes.c_void_p,
                            ctypes.c_void_p]
    lib.ms_clamp_sums.restype = ctypes.c_int
    lib.ms_clamp_sums.argtypes = [ctypes.c_long, ctypes.POINTER(ctypes.c_void_p), ip, ip, lp, lp, lp, dp,
                                  ctypes.c_void_p, ctypes.c_void_p]
    ub = ctypes.POINTER(ctypes.c_ubyte)
    lib.ms_run_sums.restype = ctypes.c_int
    lib.ms_run_sums.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.POINTER(ctypes.c_void_p), lp, ip, dp, dp, ub,
                                ub, ctypes.c_double, ctypes.c_long, ip, lp, lp, lp, ctypes.c_void_p]
    lib.ms_rows.restype = ctypes.c_int
    lib.ms_rows.argtypes = [ctypes.c_long, ctypes.POINTER(ctypes.c_void_p), ip, lp, lp, lp, lp, ctypes.c_void_p]
    lib.ms_level.restype = ctypes.c_int
    lib.ms_cap_level.restype = ctypes.c_int
    lib.ms_cap_level.argtypes = [ctypes.c_int]
    return lib


def available() -> bool:
    """Whether the kernels are enabled and built (builds them on the first call)."""
    return enabled() and _load() is not None


def isa(cap: Optional[int] = None) -> int:
    """The instruction set the kernels run with: 0 baseline, 1 AVX2+FMA, 2 AVX-512 (x86-64;
    other CPUs 0); ``cap``: use at most that one from now on (None: leave it; -1: the best);
    -1 when the kernels are unavailable."""
    if not available():
        return -1
    return _lib.ms_level() if cap is None else _lib.ms_cap_level(cap)


def supports(t: torch.Tensor) -> bool:
    return t.is_cpu and t.dtype in DTYPES and t.is_contiguous() and not t.requires_grad


def run(kernel: str, tensors: Sequence[torch.Tensor], params: Sequence[Sequence[float]], ls: float = 1.0) -> bool:
    """Kernel ``kernel`` in place on every tensor (``params[j][i]``: parameter j of tensor i),
    with loss scale ``ls``. True if it ran; False (nothing touched) if the caller must take
    the torch-op path."""
    if not tensors:
        return True
    if not enabled() or not all(supports(t) for t in tensors) or _load() is None:
        return False
    rc = _lib.ms_run(*_map_args(kernel, tensors, params), float(ls))
    if rc == 1:       # not on this CPU (the power map without hardware FMA), or an exponent outside (0, 1]
        return False
    if rc:
        raise RuntimeError(f"kernel {kernel} failed ({rc})")
    return True


def _map_args(kernel: str, tensors: Sequence[torch.Tensor], params: Sequence[Sequence[float]]) -> tuple:
    """ms_run's leading arguments as ctypes values: (map index, n, data pointers, lengths, dtype
    codes, parameter column a, column b or None)."""
    n = len(tensors)
    index, arity = MAPS[kernel]
    if len(params) != arity or any(len(c) != n for c in params):
        raise ValueError(f"kernel {kernel}: {arity} parameters per tensor expected")
    cols = [(ctypes.c_double * n)(*[float(v) for v in col]) for col in params]
    return (index, n, (ctypes.c_void_p * n)(*[t.data_ptr() for t in tensors]),
            (ctypes.c_long * n)(*[t.numel() for t in tensors]), (ctypes.c_int * n)(*[DTYPES[t.dtype] for t in tensors]),
            cols[0], cols[1] if arity > 1 else None)


def readable(t: torch.Tensor) -> bool:
    """Whether :func:`sums` reads ``t``: a contiguous CPU tensor of fp32, bf16 or fp16."""
    # (is_cpu, not device.type: called per tensor several times a step, a third of the cost)
    return t.dtype in DTYPES and t.is_cpu and t.is_contiguous()


class RunTable:
    """The runs of a statistics pass as ctypes arrays, built once per geometry and reused every
    step: run r is ``ks[r]`` chunks of ``lens[r]`` elements of tensor ``rt[r]`` from element
    ``starts[r]`` (partials in run order). ``need[t]``: elements tensor t must have."""

    def __init__(self, runs: Sequence[tuple], n_tensors: int):
        """``runs``: (tensor position, start, k, length) per run."""
        nr = len(runs)
        self.nr = nr
        self.n_tensors = n_tensors
        self.rt = (ctypes.c_int * nr)(*[r[0] for r in runs])
        self.starts = (ctypes.c_long * nr)(*[r[1] for r in runs])
        self.ks = (ctypes.c_long * nr)(*[r[2] for r in runs])
        self.lens = (ctypes.c_long * nr)(*[r[3] for r in runs])
        self.count = sum(r[2] for r in runs)
        self.need = [0] * n_tensors
        for t, a, k, length in runs:
            self.need[t] = max(self.need[t], a + k * length)


class MapTable(RunTable):
    """The runs of a statistics pass over the tensors a map runs on (:func:`run_sums`), built
    once per geometry: a :class:`RunTable` whose runs tile each tensor they name (``[0, numel)``,
    no gap, no overlap: checked here, so every element is mapped once); ``whole[k]``: tensor k
    is in no run (mapped on its own). ``numel``: every tensor's length."""

    def __init__(self, runs: Sequence[tuple], numel: Sequence[int]):
        super().__init__(runs, len(numel))
        self.numel = list(numel)
        spans: dict = {}
        for t, a, k, length in runs:
            spans.setdefault(t, []).append((a, a + k * length))
        for t, sp in spans.items():
            at = 0
            for a, b in sorted(sp):
                if a != at:
                    raise ValueError(f"runs of tensor {t} do not tile it (gap or overlap at element {at})")
                at = b
            if at != self.numel[t]:
                raise ValueError(f"runs of tensor {t} cover {at} of its {self.numel[t]} elements")
        self.whole = (ctypes.c_ubyte * len(numel))(*[0 if t in spans else 1 for t in range(len(numel))])


def run_sums(kernel: str, tensors: Sequence[torch.Tensor], params: Sequence[Sequence[float]], on: Sequence[int],
             table: MapTable, ls: float = 1.0, lib: Optional[ctypes.CDLL] = None) -> Optional[torch.Tensor]:
    """Kernel ``kernel`` in place on every tensor k with ``on[k]`` 1 or True (``params[j][k]``:
    its parameter j; ignored elsewhere), with loss scale ``ls``, and the float64 sums of
    squares of ``table``'s chunks of what it stored (the partials :func:`sums` takes after
    :func:`run`, bit for bit), in one call (``_maps.c``, ms_run_sums). ``on[k]`` 0 / False:
    tensor k is only read; 2: neither mapped nor read, its chunks' partials are 0. None (nothing touched:
    the caller takes :func:`run` and :func:`sums`, or the torch ops) when the kernels are
    disabled or unavailable, a tensor is not :func:`supports`-ed or not of ``table``'s
    lengths, or this CPU does not run the map. ``lib``: another build (tests' controls)."""
    if lib is None:
        if not enabled() or _load() is None:
            return None
        lib = _lib
    n = len(tensors)
    if (n != table.n_tensors or len(on) != n or not all(supports(t) and t.numel() == m
                                                        for t, m in zip(tensors, table.numel))):
        return None
    flags = (ctypes.c_ubyte * n)(*[int(f) if f in (0, 1, 2) else 1 for f in on])
    out = torch.empty(table.count, dtype=torch.float64)
    rc = lib.ms_run_sums(*_map_args(kernel, tensors, params), flags, table.whole, float(ls), table.nr, table.rt,
                         table.starts, table.ks, table.lens, out.data_ptr() if table.count else None)
    if rc == 1:
        return None
    if rc:
        raise RuntimeError(f"ms_run_sums failed ({rc})")
    return out


def _tensor_arrays(tensors: Sequence[torch.Tensor], table: RunTable):
    """(data pointers, dtype codes) as ctypes arrays, or None when a tensor is not
    :func:`readable` or shorter than ``table``'s runs need."""
    if len(tensors) != table.n_tensors or not all(readable(t) and t.numel() >= m
                                                  for t, m in zip(tensors, table.need)):
        return None
    n = len(tensors)
    return ((ctypes.c_void_p * n)(*[t.data_ptr() for t in tensors]),
            (ctypes.c_int * n)(*[DTYPES[t.dtype] for t in tensors]))


def sums(tensors: Sequence[torch.Tensor], table: RunTable, sq: bool = True, ab: bool = False,
         lib: Optional[ctypes.CDLL] = None) -> Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
    """float64 partials of ``table``'s chunks of ``tensors``: (sum x^2 per chunk if ``sq``,
    sum |x| per chunk if ``ab``), exact squares summed in float64 in a fixed order (``_maps.c``,
    ms_sums). None (the caller takes the torch-op path) when the kernels are disabled or
    unavailable or a tensor is not :func:`readable`. ``lib``: another build (tests' controls)."""
    if lib is None:
        if not enabled() or _load() is None:
            return None
        lib = _lib
    arrays = _tensor_arrays(tensors, table)
    if arrays is None:
        return None
    ptrs, codes = arrays
    out_sq = torch.empty(table.count, dtype=torch.float64) if sq else None
    out_ab = torch.empty(table.count, dtype=torch.float64) if ab else None
    if table.count:
        rc = lib.ms_sums(table.nr, ptrs, codes, table.rt, table.starts, table.ks, table.lens,
                         out_sq.data_ptr() if sq else None, out_ab.data_ptr() if ab else None)
        if rc:
            raise RuntimeError(f"ms_sums failed ({rc})")
    return out_sq, out_ab


def clamp_sums(tensors: Sequence[torch.Tensor], table: RunTable, bounds: Sequence[float], sq: bool = True
               ) -> Optional[Tuple[Optional[torch.Tensor], torch.Tensor]]:
    """(sum x^2 per chunk if ``sq``, sum w^2 per chunk) of ``table``'s chunks, w the value the
    ``clamp`` map stores for x at loss scale 1 with run r's bound ``bounds[r]`` (inf: x): the
    partials :func:`sums` takes of the clamped tensors, bit for bit, read before the clamp
    (``_maps.c``, ms_clamp_sums). None as :func:`sums`."""
    if not enabled() or _load() is None or len(bounds) != table.nr:
        return None
    arrays = _tensor_arrays(tensors, table)
    if arrays is None:
        return None
    ptrs, codes = arrays
    cl = (ctypes.c_double * table.nr)(*[float(b) for b in bounds])
    out_sq = torch.empty(table.count, dtype=torch.float64) if sq else None
    out_cl = torch.empty(table.count, dtype=torch.float64)
    if table.count:
        rc = _lib.ms_clamp_sums(table.nr, ptrs, codes, table.rt, table.starts, table.ks, table.lens, cl,
                                out_sq.data_ptr() if sq else None, out_cl.data_ptr())
        if rc:
            raise RuntimeError(f"ms_clamp_sums failed ({rc})")
    return out_sq, out_cl


class RowTable:
    """Slices of rows as ctypes arrays, built once per geometry: slice k has ``lens[k]``
    elements of dtype ``dtypes[k]`` starting at element ``offsets[k]`` of a matrix of rows of
    ``row_lens[k]`` elements, its first row's factor at ``firsts[k]`` of the factor vector."""

    def __init__(self, dtypes: Sequence[torch.dtype], lens: Sequence[int], offsets: Sequence[int],
                 row_lens: Sequence[int], firsts: Sequence[int]):
        n = len(lens)
        self.n = n
        self.dtypes = list(dtypes)
        self.numel = list(lens)
        self.codes = (ctypes.c_int * n)(*[DTYPES[d] for d in dtypes])
        self.lens = (ctypes.c_long * n)(*lens)
        self.heads = (ctypes.c_long * n)(*[(-a) % r for a, r in zip(offsets, row_lens)])
        self.row_lens = (ctypes.c_long * n)(*row_lens)
        self.firsts = (ctypes.c_long * n)(*firsts)
        #: factors the vector must have: the last row of every slice
        self.need = max([f + ((a + m - 1) // r - a // r) + 1 for f, a, m, r in
                         zip(firsts, offsets, lens, row_lens) if m] or [0])


def rows(tensors: Sequence[torch.Tensor], table: RowTable, factors: torch.Tensor,
         lib: Optional[ctypes.CDLL] = None) -> bool:
    """Every element of ``tensors[k]`` times its row's factor from ``factors`` (float64, CPU),
    rounded to fp32, the product in fp32 rounded once to the storage dtype, in place, one call
    (``_maps.c``, ms_rows). False (nothing touched) when the kernels are disabled or unavailable,
    a tensor is not :func:`readable` or not of ``table``'s geometry, or ``factors`` is not a
    contiguous float64 CPU vector of at least ``table.need`` factors. ``lib``: another build."""
    if lib is None:
        if not enabled() or _load() is None:
            return False
        lib = _lib
    if (len(tensors) != table.n or factors.dtype != torch.float64 or factors.device.type != "cpu"
            or not factors.is_contiguous() or factors.numel() < table.need
            or not all(readable(t) and t.dtype == d and t.numel() == m
                       for t, d, m in zip(tensors, table.dtypes, table.numel))):
        return False
    if table.n:
        ptrs = (ctypes.c_void_p * table.n)(*[t.data_ptr() for t in tensors])
        rc = lib.ms_rows(table.n, ptrs, table.codes, table.lens, table.heads, table.row_lens, table.firsts,
                         factors.data_ptr())
        if rc:
            raise RuntimeError(f"ms_rows failed ({rc})")
    return True
