"""Gradient shapers as pure maths: ``init(layout) -> state``, ``update(stats, state) -> (plan, state)``.

No collectives and no DeepSpeed import here (tests/shapers/test_imports.py enforces it).
"""
from __future__ import annotations

import importlib
from typing import Any, Dict

from .base import (ALL_STATS, Chain, Elementwise, GroupLayout, Plan, Shaper, Stats, StepRecord, as_chain, chain,
                   derive_stats, make_layout, run_shapers)

#: config ``type`` -> (module, class). One module per method.
REGISTRY: Dict[str, tuple] = {
    "gradient_stabilizer": ("gradient_stabilizer", "GradientStabilizer"),
    "spamp": ("spamp", "SPAMP"),
    "norm_clip": ("norm_clip", "NormClip"),
    "value_clip": ("value_clip", "ValueClip"),
    "agc": ("agc", "AGC"),
    "zclip": ("zclip", "ZClip"),
    "adagc": ("adagc", "AdaGC"),
    "entrywise_shrink": ("entrywise_shrink", "EntrywiseShrink"),
}


def shaper_class(name: str):
    try:
        module, cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown gradient shaper type {name!r}; allowed: {sorted(REGISTRY)}") from None
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def build_shaper(name: str, params: Dict[str, Any] = None) -> Shaper:
    """A shaper from its config ``type`` and ``params`` (unknown params are an error)."""
    cls = shaper_class(name)
    params = dict(params or {})
    unknown = sorted(set(params) - set(cls.hparams))
    if unknown:
        raise ValueError(f"gradient_shaping.params: unknown key(s) {unknown} for type {name!r}; "
                         f"allowed: {list(cls.hparams)}")
    return cls(**params)


__all__ = ["ALL_STATS", "Chain", "Elementwise", "GroupLayout", "Plan", "Shaper", "Stats", "StepRecord", "as_chain",
           "chain", "derive_stats", "make_layout", "run_shapers", "REGISTRY", "shaper_class", "build_shaper"]
