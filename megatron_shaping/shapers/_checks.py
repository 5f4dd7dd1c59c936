"""Constructor argument checks shared by the shapers.

Every failure is a ValueError naming the shaper, the parameter, the value given and what is
allowed, so a bad ``gradient_shaping.params`` entry is found from the message alone.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def positive(shaper: str, name: str, value: Any, allow_inf: bool = True) -> float:
    """A number > 0 (and finite unless ``allow_inf``)."""
    if not _is_number(value) or not value > 0 or (not allow_inf and math.isinf(value)):
        allowed = "a number > 0" + (" (inf allowed)" if allow_inf else ", finite")
        raise ValueError(f"{shaper}: {name} must be {allowed}, got {value!r}")
    return float(value)


def in_range(shaper: str, name: str, value: Any, lo: float, hi: float, lo_open: bool = False,
             hi_open: bool = False) -> float:
    """A number in [lo, hi], with either end open on request."""
    ok = _is_number(value) and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{shaper}: {name} must be a number in {interval}, got {value!r}")
    return float(value)


def integer(shaper: str, name: str, value: Any, minimum: int = 0) -> int:
    """An int >= minimum (a float with an integral value is accepted: JSON has no ints in places)."""
    if isinstance(value, bool) or not _is_number(value) or math.isinf(value) or int(value) != value \
            or value < minimum:
        raise ValueError(f"{shaper}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def choice(shaper: str, name: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ValueError(f"{shaper}: {name} must be one of {list(allowed)}, got {value!r}")
    return value.lower()


def boolean(shaper: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{shaper}: {name} must be true or false, got {value!r}")
    return value


def optional_positive(shaper: str, name: str, value: Optional[Any]) -> Optional[float]:
    """None, or a number > 0 (inf allowed)."""
    if value is None:
        return None
    if not _is_number(value) or not value > 0:
        raise ValueError(f"{shaper}: {name} must be null/None or a number > 0, got {value!r}")
    return float(value)
