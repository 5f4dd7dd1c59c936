"""Fused CPU kernels for the elementwise maps: one pass per tensor, in place, no temporary.

The C source is ``_maps.c`` next to this file (what each map computes is documented there). It
is compiled on first use with the system C compiler (``$CC``, else ``cc``) into a shared library
cached on disk (``$MEGATRON_SHAPING_KERNEL_DIR``, else ``~/.cache/megatron_shaping/kernels``,
one file per source and flags hash; 1.5-6.5 s to build on a loaded 2-core host) and called
through ctypes on the tensors' data pointers. Flags every x86-64 / aarch64 machine runs: ``-O3`` without
fast-math, ``-ffp-contract=off`` (no FMA contraction), ``-fno-trapping-math -fno-math-errno``
(only exception flags and errno, which let the loops vectorise); on x86-64 the loops are also
compiled for AVX2+FMA and AVX-512 and chosen at run time by the CPU (:func:`isa`; the same
operations in every variant, so the same results).

:func:`run` returns False (the caller takes the torch-op path) when the kernels are disabled
(``MEGATRON_SHAPING_KERNELS=0``), the build failed (one logged warning), or a tensor is not a
contiguous CPU tensor of fp32, bf16 or fp16.
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
from typing import List, Optional, Sequence

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


def build(path: Path) -> None:
    """Compile the source to ``path`` (written under a temporary name, then renamed: ranks that
    build at the same time each get a whole file)."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
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
        lib = ctypes.CDLL(str(path))
        dp = ctypes.POINTER(ctypes.c_double)
        lib.ms_run.restype = ctypes.c_int
        lib.ms_run.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.POINTER(ctypes.c_void_p),
                               ctypes.POINTER(ctypes.c_long), ctypes.POINTER(ctypes.c_int), dp, dp, ctypes.c_double]
        lib.ms_level.restype = ctypes.c_int
        lib.ms_cap_level.restype = ctypes.c_int
        lib.ms_cap_level.argtypes = [ctypes.c_int]
        _lib = lib
    except (OSError, RuntimeError, AttributeError) as e:
        _failed = True
        logger.warning("megatron_shaping: fused map kernels unavailable, using torch ops (%s)", e)
    return _lib


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
    return t.device.type == "cpu" and t.dtype in DTYPES and t.is_contiguous() and not t.requires_grad


def run(kernel: str, tensors: Sequence[torch.Tensor], params: Sequence[Sequence[float]], ls: float = 1.0) -> bool:
    """Kernel ``kernel`` in place on every tensor (``params[j][i]``: parameter j of tensor i),
    with loss scale ``ls``. True if it ran; False (nothing touched) if the caller must take
    the torch-op path."""
    if not tensors:
        return True
    if not enabled() or not all(supports(t) for t in tensors) or _load() is None:
        return False
    n = len(tensors)
    ptrs = (ctypes.c_void_p * n)(*[t.data_ptr() for t in tensors])
    lens = (ctypes.c_long * n)(*[t.numel() for t in tensors])
    codes = (ctypes.c_int * n)(*[DTYPES[t.dtype] for t in tensors])
    index, arity = MAPS[kernel]
    cols: List = [(ctypes.c_double * n)(*[float(v) for v in col]) for col in params]
    if len(cols) != arity or any(len(c) != n for c in cols):
        raise ValueError(f"kernel {kernel}: {arity} parameters per tensor expected")
    rc = _lib.ms_run(index, n, ptrs, lens, codes, cols[0], cols[1] if arity > 1 else None, float(ls))
    if rc == 1:       # not on this CPU (the power map without hardware FMA): nothing was touched
        return False
    if rc:
        raise RuntimeError(f"kernel {kernel} failed ({rc})")
    return True
