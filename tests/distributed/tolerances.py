"""The statistics' summation bounds both equivalence suites (ZeRO: test_deepspeed_equivalence.py,
TP/PP: tp_pp_worker.py) compare sharded and unsharded per-group statistics with.

A sharded run cuts each group's gradient into other pieces (ZeRO partitions, TP shards) than
the unsharded reference, so its sums differ by summation roundings only. How many depends on
the statistics path, which every worker reports (``kernels.available()``):

* KERNEL_STATS_RTOL, the CPU sum kernel (stats/_maps.c, the default where a C compiler exists):
  the square of an fp32 (or 16-bit) value is exact in float64 and the squares are summed in
  float64, so two cuts differ by at most n * 2^-53 for n summed elements: 3e-14 for the ZeRO
  suite's 280-element model, < 1e-12 for the TP/PP model's few thousand per group.
* TORCH_STATS_RTOL, the torch path (no compiler, MEGATRON_SHAPING_KERNELS=0): fp32 partial sums
  of runs of <= 2048 entries (stats/slices.py, CHUNK) are added in float64; each partial is off
  by at most about log2(2048) * 2^-24 = 6.6e-7 (PyTorch's cascade summation), two cuts by
  1.3e-6, rounded up (~5e-7 observed).

Each suite derives its gradient, factor and state bounds from these (see their docstrings).
"""
KERNEL_STATS_RTOL = 1e-12
TORCH_STATS_RTOL = 2e-6


def stats_rtol(kernels_everywhere: bool) -> float:
    """The bound for statistics computed by the sum kernel on every rank, else the torch path's."""
    return KERNEL_STATS_RTOL if kernels_everywhere else TORCH_STATS_RTOL
