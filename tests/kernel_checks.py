"""Helpers of the CPU kernel tests (tests/stats/test_stats_*kernel*.py): deliberately broken
builds of ``_maps.c`` for the controls, and a run on every instruction-set variant."""
import ctypes
from typing import Callable, Dict

from megatron_shaping.stats import kernels


def control_builds(tmp_path_factory, macro: str) -> Callable[[int], ctypes.CDLL]:
    """``get(n)``: the kernel source built with ``-D<macro>=n`` (a broken variant, never the
    package's library) and loaded beside the real one; each variant built once."""
    built: Dict[int, ctypes.CDLL] = {}

    def get(n: int) -> ctypes.CDLL:
        if n not in built:
            path = tmp_path_factory.mktemp(macro.lower()) / f"{macro.lower()}{n}.so"
            kernels.build(path, [f"-D{macro}={n}"])
            built[n] = kernels.bind(ctypes.CDLL(str(path)))
        return built[n]
    return get


def per_isa(fn: Callable[[], object]) -> Dict[int, object]:
    """``{instruction-set level: fn()}`` for every variant this CPU runs (``kernels.isa``:
    0 baseline, 1 AVX2+FMA, 2 AVX-512), the best variant restored afterwards."""
    out: Dict[int, object] = {}
    try:
        for cap in (2, 1, 0):
            level = kernels.isa(cap)
            if level not in out:       # (a CPU without AVX-512 runs level 1 for caps 2 and 1: once)
                out[level] = fn()
    finally:
        kernels.isa(-1)
    return out
