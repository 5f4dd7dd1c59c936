"""Deliberately broken variants of the sharded shaping path (mutation controls).

Each mutant patches one :class:`~megatron_shaping.integrations.deepspeed.engine.DeepSpeedShaping`
*instance* inside a test worker process, never the package's modules: the single-process
reference that runs in the same process keeps the correct code. The equivalence comparisons
must report every mutant far outside their tolerance (tests/distributed/test_deepspeed_equivalence.py);
a mutant they did not catch would mean the suite cannot see that class of sharding bug.

A mutant is only meaningful where the bug it models can change a result: ``APPLIES`` says
where (a mutant outside its domain is *equivalent* to the correct code, e.g. "replicas counted
on every rank" when ZeRO 1-3 keep no replicas, or "loss scale not divided out" when the scale
is 1); the scenarios in scenarios.py only run mutants inside their domain.

Usage in a worker: ``install(engine.gradient_shaping, name, rank, world)`` right after the
engine is built. Other suites (TP/PP) may register more mutants with :func:`register`.
"""
from __future__ import annotations

from typing import Callable, Dict


def _wrap_slice_set(shaping, edit: Callable) -> None:
    """Let ``edit(slice_set)`` change every SliceSet the hook builds (statistics and application)."""
    orig = shaping._slice_set

    def slice_set():
        ss, pieces = orig()
        edit(ss)
        return ss, pieces
    shaping._slice_set = slice_set


def local_stats(shaping, rank, world):
    """Statistics from this rank's slices only: the all-reduce is dropped."""
    shaping._all_reduce = lambda vec: None


def replicas_counted(shaping, rank, world):
    """Data-parallel replicas (ZeRO-0 / BF16_Optimizer grads on DP rank > 0) counted on every rank."""
    orig = shaping._counted

    def counted(p):
        saved = shaping.dp_rank
        shaping.dp_rank = 0
        try:
            return orig(p)
        finally:
            shaping.dp_rank = saved
    shaping._counted = counted


def rank_skips_apply(shaping, rank, world):
    """The last rank computes the plan (and takes part in every reduction) but never applies it."""
    if rank == world - 1:
        def edit(ss):
            ss.apply = lambda *args, **kwargs: None
        _wrap_slice_set(shaping, edit)


def loss_scale_not_divided(shaping, rank, world):
    """Statistics and the elementwise map treat the loss-scaled gradient as the true one
    (DeepSpeed still unscales by the right value afterwards)."""
    orig_shape = shaping.shape

    def edit(ss):
        ss.loss_scale = 1.0
    _wrap_slice_set(shaping, edit)

    def shape():
        ok = orig_shape()
        shaping.last_loss_scale = shaping.adapter.backward_scale()   # keep DeepSpeed's unscale right
        return ok
    shaping.shape = shape


def map_on_scaled(shaping, rank, world):
    """The elementwise map runs on the loss-scaled values (statistics are right)."""
    def edit(ss):
        orig_map = ss._map

        def bad_map(*args, **kwargs):
            saved = ss.loss_scale
            ss.loss_scale = 1.0
            try:
                orig_map(*args, **kwargs)
            finally:
                ss.loss_scale = saved
        ss._map = bad_map
    _wrap_slice_set(shaping, edit)


MUTANTS: Dict[str, Callable] = {
    "local_stats": local_stats,
    "replicas_counted": replicas_counted,
    "rank_skips_apply": rank_skips_apply,
    "loss_scale_not_divided": loss_scale_not_divided,
    "map_on_scaled": map_on_scaled,
}

#: Where each mutant can change a result (outside, it is equivalent to the correct code).
APPLIES = {
    "local_stats": "world > 1 (any stage: ZeRO-0 ranks > 0 then count nothing)",
    "replicas_counted": "world > 1 with replicated gradients: ZeRO-0, BF16_Optimizer",
    "rank_skips_apply": "world > 1",
    "loss_scale_not_divided": "a loss scale != 1 in the gradients: fp16 with ZeRO 1-3 (DeepSpeed 0.19.8 "
                              "does not scale the loss for ZeRO-0's FP16 optimizers)",
    "map_on_scaled": "an elementwise map (SPAMP, value_clip, entrywise_shrink) and a loss scale != 1",
}


def register(name: str, fn: Callable, applies: str) -> None:
    MUTANTS[name] = fn
    APPLIES[name] = applies


def install(shaping, name: str, rank: int, world: int) -> None:
    if name not in MUTANTS:
        raise KeyError(f"unknown mutant {name!r} (known: {sorted(MUTANTS)})")
    MUTANTS[name](shaping, rank, world)
