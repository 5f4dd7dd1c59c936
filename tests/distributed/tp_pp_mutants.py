"""Deliberately broken variants of the sharded shaping path under tensor and pipeline
parallelism, injected from test code into the worker process (tp_pp_worker.py).

Each mutant wraps the *real* method of :class:`DeepSpeedShaping` and removes one rule, so it
follows the package if the rule's code moves; the TP/PP equivalence comparisons must report
each of them far outside tolerance:

* ``tp_replicated_counted``: TP-replicated tensors (RMSNorm weights) counted on every TP rank
  (the sharded run pretends to be TP rank 0 when deciding what it counts);
* ``tied_counted_twice``: the tied embedding counted on both pipeline stages that hold it
  (``ds_pipe_replicated`` ignored);
* ``local_stats``: statistics of this rank's slices only (the all-reduce skipped);
* ``rank_skips_plan``: the last rank computes and reduces the statistics but does not apply
  the plan to its gradient slices.

The shaper each one runs with is the one that makes the broken rule visible: a per-tensor
norm clip for the counting mutants (a group counted twice gets a factor sqrt(2) too small)
and a global norm clip for the missing reduction (a stage, TP rank or ZeRO partition alone
sees a smaller norm; at tensor granularity a pipeline stage's tensors are complete on the
stage, so a per-tensor method would not be affected there at all).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict


@contextlib.contextmanager
def _set(obj, name: str, value):
    """``obj.name = value`` for the block, then the old value back."""
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def _replace(cls, name: str, make: Callable[[Callable], Callable]):
    return _set(cls, name, make(cls.__dict__[name]))


def _engine_class():
    from megatron_shaping.integrations.deepspeed.engine import DeepSpeedShaping
    return DeepSpeedShaping


def tp_replicated_counted(rank: int, world: int):
    def make(orig):
        def counted(self, p):
            with _set(self, "tp_rank", 0):      # every TP rank believes it is TP rank 0
                return orig(self, p)
        return counted
    return _replace(_engine_class(), "_counted", make)


def tied_counted_twice(rank: int, world: int):
    def make(orig):
        def counted(self, p):
            if not getattr(p, "ds_pipe_replicated", False):
                return orig(self, p)
            with _set(p, "ds_pipe_replicated", False):      # the non-owner stage counts the tied copy too
                return orig(self, p)
        return counted
    return _replace(_engine_class(), "_counted", make)


def local_stats(rank: int, world: int):
    def make(orig):
        def all_reduce(self, vec):
            self.collectives += 1           # counted as if it ran; vec keeps the local sums
        return all_reduce
    return _replace(_engine_class(), "_all_reduce", make)


def rank_skips_plan(rank: int, world: int):
    target = world - 1

    def make(orig):
        def slice_set(self):
            ss, pieces = orig(self)
            if rank == target:
                ss.apply = lambda scale, unit_scale, elementwise: None
            return ss, pieces
        return slice_set
    return _replace(_engine_class(), "_slice_set", make)


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    patch: Callable[[int, int], contextlib.AbstractContextManager]
    applies: Callable[[int, int, int], bool]        # (tp, pp, dp) -> has the broken rule any role
    spec: Dict = field(default_factory=dict)


# Tiny max_norm: every group is clipped, so its factor is max_norm / its norm.
TENSOR_CLIP = {"type": "norm_clip", "granularity": "tensor", "params": {"max_norm": 1e-4}}
GLOBAL_CLIP = {"type": "norm_clip", "granularity": "global", "params": {"max_norm": 1e-4}}

MUTANTS: Dict[str, Mutant] = {m.name: m for m in (
    Mutant("tp_replicated_counted", "TP-replicated norm weights counted on every TP rank",
           tp_replicated_counted, lambda tp, pp, dp: tp > 1, TENSOR_CLIP),
    Mutant("tied_counted_twice", "tied embedding counted on both stages (ds_pipe_replicated ignored)",
           tied_counted_twice, lambda tp, pp, dp: pp > 1, TENSOR_CLIP),
    Mutant("local_stats", "statistics of the local slices only (no all-reduce)",
           local_stats, lambda tp, pp, dp: tp * pp * dp > 1, GLOBAL_CLIP),
    Mutant("rank_skips_plan", "the last rank does not apply the plan",
           rank_skips_plan, lambda tp, pp, dp: tp * pp * dp > 1, TENSOR_CLIP),
)}
