"""From fully qualified parameter names to statistics groups and units.

The layout is built from the *global* list of parameters (name, whole-model shape), identical
on every rank, so group ids, unit ids and saved state keys do not depend on how the model is
sharded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..shapers.base import GroupLayout, make_layout

GRANULARITIES = ("tensor", "block", "global")
#: Default block pattern: everything under one transformer layer, named either Megatron/HF
#: style ("decoder.layers.3.", "model.layers.3.") or by its index in a DeepSpeed
#: PipelineModule or our LLaMA ("3."), and a tied module ("tied_modules.embed.").
DEFAULT_BLOCK_PATTERN = r"^(.*?layers\.\d+|\d+|tied_modules\.\w+)\."


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: Tuple[int, ...]   # whole-model shape (a TP-sharded tensor's full shape)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def rows(self) -> int:
        """Units (AGC rows) of this tensor: dim 0 for matrices, one unit for vectors/scalars."""
        return self.shape[0] if len(self.shape) >= 2 else 1


@dataclass
class ParamGrouping:
    layout: GroupLayout
    group_of: Dict[str, int]     # parameter name -> group id
    unit_base: Dict[str, int]    # parameter name -> global unit id of its row 0
    params: Tuple[ParamInfo, ...]

    def group(self, name: str) -> int:
        try:
            return self.group_of[name]
        except KeyError:
            raise KeyError(f"parameter {name!r} is not in the shaping layout "
                           f"(known: {len(self.group_of)} parameters)") from None


def group_name(name: str, granularity: str, block_pattern: str = DEFAULT_BLOCK_PATTERN) -> str:
    if granularity == "tensor":
        return name
    if granularity == "global":
        return "global"
    if granularity == "block":
        m = re.match(block_pattern, name)
        return m.group(1) if m else name
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def check_block_pattern(block_pattern: str) -> None:
    """A block pattern must compile and have a group (its first names the block)."""
    try:
        groups = re.compile(block_pattern).groups
    except re.error as e:
        raise ValueError(f"gradient_shaping.block_pattern {block_pattern!r} is not a valid regex: {e}") from None
    if groups < 1:
        raise ValueError(f"gradient_shaping.block_pattern {block_pattern!r} has no group: its first group "
                         f"names the block, e.g. {DEFAULT_BLOCK_PATTERN!r}")


def build_grouping(params: Sequence[ParamInfo], granularity: str = "tensor",
                   block_pattern: Optional[str] = None, device=None) -> ParamGrouping:
    """Group ids in first-appearance order of the parameters; units in parameter order."""
    block_pattern = block_pattern or DEFAULT_BLOCK_PATTERN
    if granularity == "block":
        check_block_pattern(block_pattern)
    names: List[str] = []
    index: Dict[str, int] = {}
    numel: List[float] = []
    group_of: Dict[str, int] = {}
    unit_group: List[int] = []
    unit_numel: List[float] = []
    unit_base: Dict[str, int] = {}
    seen = set()
    for p in params:
        if p.name in seen:
            raise ValueError(f"parameter name {p.name!r} appears twice in the shaping layout")
        seen.add(p.name)
        g = group_name(p.name, granularity, block_pattern)
        if g not in index:
            index[g] = len(names)
            names.append(g)
            numel.append(0.0)
        gid = index[g]
        group_of[p.name] = gid
        numel[gid] += p.numel
        unit_base[p.name] = len(unit_group)
        unit_group.extend([gid] * p.rows)
        unit_numel.extend([p.numel / p.rows] * p.rows)
    layout = make_layout(names, numel, unit_numel=unit_numel, device=device or "cpu", unit_group=unit_group)
    return ParamGrouping(layout, group_of, unit_base, tuple(params))
