"""Gradient shapers as pure maths: ``init(layout) -> state``, ``update(stats, state) -> (plan, state)``.

No collectives and no DeepSpeed import here (tests/shapers/test_shaper_imports.py enforces it).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Dict

from .base import (ALL_STATS, Chain, Elementwise, GroupLayout, Plan, Shaper, Stats, StepRecord, chain, derive_stats,
                   make_layout)

#: config ``type`` -> (module, class). One module per method; a module name starting with a dot
#: is relative to this package, any other is imported as it stands (a shaper outside the
#: package). This is the one list of methods: configs, grids, analyses, test matrices and the
#: docs check iterate over it, in this order (classic baselines first, then the adaptive ones).
REGISTRY: Dict[str, tuple] = {
    "norm_clip": (".norm_clip", "NormClip"),
    "value_clip": (".value_clip", "ValueClip"),
    "agc": (".agc", "AGC"),
    "zclip": (".zclip", "ZClip"),
    "adagc": (".adagc", "AdaGC"),
    "entrywise_shrink": (".entrywise_shrink", "EntrywiseShrink"),
    "spamp": (".spamp", "SPAMP"),
    "gradient_stabilizer": (".gradient_stabilizer", "GradientStabilizer"),
}


def shaper_class(name: str):
    try:
        module, cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown gradient shaper type {name!r}; allowed: {sorted(REGISTRY)}") from None
    return getattr(importlib.import_module(module, package=__name__), cls)


def build_shaper(name: str, params: Dict[str, Any] = None, where: str = "gradient_shaping.params") -> Shaper:
    """A shaper from its config ``type`` and ``params`` (unknown params are an error, named at
    ``where``: the config path of ``params``)."""
    cls = shaper_class(name)
    params = dict(params or {})
    unknown = sorted(set(params) - set(cls.hparams))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for type {name!r}; "
                         f"allowed: {list(cls.hparams)}")
    return cls(**params)


def default_params(name: str) -> Dict[str, Any]:
    """The method's hyperparameters and their defaults, in config order (its constructor's)."""
    cls = shaper_class(name)
    sig = inspect.signature(cls.__init__).parameters
    return {k: sig[k].default for k in cls.hparams}


def default_section(name: str) -> Dict[str, Any]:
    """A ``gradient_shaping`` section that spells out the method's defaults."""
    return {"type": name, "granularity": shaper_class(name).default_granularity, "params": default_params(name)}


__all__ = ["ALL_STATS", "Chain", "Elementwise", "GroupLayout", "Plan", "Shaper", "Stats", "StepRecord", "chain",
           "derive_stats", "make_layout", "REGISTRY", "shaper_class", "build_shaper",
           "default_params", "default_section"]
