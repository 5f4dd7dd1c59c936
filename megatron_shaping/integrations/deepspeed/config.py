"""The ``"gradient_shaping"`` section of a DeepSpeed JSON config.

    "gradient_shaping": {
        "type": "gradient_stabilizer",          # or spamp, norm_clip, ..., or "chain"
        "granularity": "tensor",                # tensor | block | global (default: the method's)
        "params": {"beta1": 0.6, "beta2": 0.999}
    }

Follows DeepSpeed's section convention (``deepspeed/runtime/zero/config.py``): a pydantic
``DeepSpeedConfigModel`` with unknown keys forbidden, built by ``get_gradient_shaping_config``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional

from deepspeed.runtime.config_utils import DeepSpeedConfigModel
from pydantic import ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from ...shapers import REGISTRY, build_shaper
from ...stats.layout import check_block_pattern

GRADIENT_SHAPING = "gradient_shaping"
GRADIENT_SHAPING_TYPE = "type"
GRADIENT_SHAPING_PARAMS = "params"
CHAIN = "chain"


class ShaperSpec(DeepSpeedConfigModel):
    """One member of a ``chain``."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    type: str
    """Shaper name: one of the registered methods."""

    params: Dict[str, Any] = Field(default_factory=dict)
    """Method hyperparameters, named as in the method's paper or reference code."""

    granularity: Optional[Literal["tensor", "block", "global"]] = None
    """This member's granularity; default the chain's, else the method's own."""

    @field_validator("type")
    @classmethod
    def _known_type(cls, v):
        if v not in REGISTRY:
            raise ValueError(f"unknown gradient shaper type {v!r}; allowed: {sorted(REGISTRY)}")
        return v

    @model_validator(mode="after")
    def _params_valid(self):
        # Builds the shaper once so a bad key or value stops start-up with the method's message
        # (pydantic puts this member's path, gradient_shaping.shapers.<i>, in front of it).
        build_shaper(self.type, self.params, where="params")
        return self


class SpikeSkipConfig(DeepSpeedConfigModel):
    """``gradient_shaping.skip``: skip the optimizer update on a spike (megatron_shaping/spike_skip.py).
    Defaults from OLMo-core's ``SkipStepOptimizer`` (``rolling_interval_length`` 128,
    ``sigma_factor`` 6, active after ``max(20, window // 2)`` values)."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    enabled: StrictBool = True
    """Turn the rule off without deleting the sub-section."""

    grad_norm_z: Optional[float] = Field(6.0, gt=0)
    """Skip when the global gradient norm before shaping exceeds mean + z * std of the window
    (OLMo-core's ``sigma_factor`` 6). null: no grad-norm z rule."""

    loss_z: Optional[float] = Field(None, gt=0)
    """The same test on the loss handed in with ``engine.gradient_shaping.observe_loss(loss)``
    (read from the last stage automatically under pipeline parallelism). null: off (OLMo-core
    applies 6 to both; the loss needs the caller's help, hence off by default)."""

    window: int = Field(128, ge=2)
    """Previous steps in the rolling window (OLMo-core's ``rolling_interval_length``)."""

    min_history: Optional[int] = Field(None, ge=2)
    """Previous values the window must hold before a z rule acts. Default
    ``min(window, max(20, window // 2) - 1)``: OLMo-core's warm-up (63 at window 128)."""

    max_grad_norm: Optional[float] = Field(None, gt=0)
    """Also skip any step whose global gradient norm before shaping exceeds this fixed value
    (active from the first step). null: off."""

    @model_validator(mode="after")
    def _check(self):
        if self.enabled and self.grad_norm_z is None and self.loss_z is None and self.max_grad_norm is None:
            raise ValueError("gradient_shaping.skip has no rule: set grad_norm_z, loss_z or max_grad_norm "
                             "(or enabled: false)")
        if self.min_history is not None and self.min_history > self.window:
            raise ValueError(f"gradient_shaping.skip.min_history ({self.min_history}) cannot exceed "
                             f"gradient_shaping.skip.window ({self.window})")
        return self


class GradientShapingConfig(DeepSpeedConfigModel):
    """Sets parameters for gradient shaping (megatron-shaping)."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    enabled: StrictBool = True
    """Turn shaping off without deleting the section."""

    type: str
    """Shaper name (``gradient_stabilizer``, ``spamp``, ``norm_clip``, ``value_clip``, ``agc``,
    ``zclip``, ``adagc``, ``entrywise_shrink``) or ``chain`` (then ``shapers`` lists members)."""

    params: Dict[str, Any] = Field(default_factory=dict)
    """Method hyperparameters (see docs/SHAPERS.md); unknown names are an error."""

    shapers: List[ShaperSpec] = Field(default_factory=list)
    """For ``type: chain``: the members, applied in order."""

    granularity: Optional[Literal["tensor", "block", "global"]] = None
    """What one statistic covers: one tensor, one block (``block_pattern``) or the whole model.
    Default: the method's own (``global`` for norm_clip and zclip, ``tensor`` otherwise)."""

    block_pattern: Optional[str] = None
    """Regex whose first group names a block, for ``granularity: block``. Default
    ``^(.*?layers\\.\\d+|\\d+|tied_modules\\.\\w+)\\.``: one transformer layer, whether named
    ``...layers.3.`` or by its pipeline index ``3.``; unmatched tensors form their own block."""

    log_interval: int = Field(0, ge=0)
    """Write per-layer statistics to DeepSpeed's monitors every N steps (0: off)."""

    nonfinite: Literal["skip", "error"] = "skip"
    """A step whose gradient is not finite and that no loss scaler skips (bf16, fp32):
    ``skip`` drops the step (no parameter update, shaper state untouched, counted in logs);
    ``error`` raises. fp16 steps with overflow are always skipped by DeepSpeed's loss scaler."""

    allow_fresh_state: StrictBool = False
    """Loading a checkpoint without shaper state starts the shaper fresh (logged loudly)
    instead of stopping with an error."""

    # --- monitoring (integrations/deepspeed/monitor.py, docs/MONITORING.md) -----------------
    log_per_layer: StrictBool = True
    """With ``log_interval > 0``: also write per-layer tags (6 per layer, 8 with
    ``log_update_size``). False writes only the
    global summaries, for models with many layers or monitors that dislike many tags."""

    spike_log: Optional[str] = None
    """Path of a JSONL file (appended, written by global rank 0) with one line per spike event:
    a layer whose gradient norm exceeded ``spike_threshold`` times its running statistic, a
    step skipped for a non-finite gradient or by the spike rule (``skip``), plus ``start`` and
    ``summary`` lines. Default: no spike log."""

    spike_threshold: float = Field(5.0, ge=1.0)
    """k: a layer's step is a spike when norm_before > k * running statistic (SPAMP's tau,
    GradientStabilizer's bias-corrected EMA of the norm, ZClip's EMA mean, AdaGC's gamma)."""

    skip: Optional[SpikeSkipConfig] = None
    """Spike-aware step skipping (off when absent): ``{"grad_norm_z": 6.0, "loss_z": null,
    "window": 128, "min_history": null, "max_grad_norm": null}``. A skipped step leaves
    parameters, optimizer state and shaper state untouched; see docs/MONITORING.md."""

    log_update_size: StrictBool = True
    """With ``log_interval > 0``: also write per-layer parameter norms and the update/parameter
    norm ratio of the logged steps (one copy of the local parameter shard and one extra small
    all-reduce on those steps only). Nothing at all with ``log_interval: 0``."""

    @field_validator("type")
    @classmethod
    def _known_type(cls, v):
        if v != CHAIN and v not in REGISTRY:
            raise ValueError(f"unknown gradient shaper type {v!r}; allowed: {sorted(REGISTRY) + [CHAIN]}")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.type == CHAIN:
            if not self.shapers:
                raise ValueError("gradient_shaping.type 'chain' needs a non-empty 'shapers' list")
            if self.params:
                raise ValueError("gradient_shaping.params is not used with type 'chain': put params in each "
                                 "member of 'shapers'")
        else:
            if self.shapers:
                raise ValueError("gradient_shaping.shapers is only allowed with type 'chain'")
            build_shaper(self.type, self.params)
        if self.block_pattern is not None:
            # checked whoever uses it (the section's granularity or a chain member's)
            check_block_pattern(self.block_pattern)
        return self

    def spec(self) -> Dict[str, Any]:
        """The shaper spec for :func:`megatron_shaping.core.shaper_from_spec`."""
        if self.type == CHAIN:
            return {"type": CHAIN, "shapers": [{"type": s.type, "params": dict(s.params), "granularity": s.granularity}
                                               for s in self.shapers]}
        return {"type": self.type, "params": dict(self.params)}


def _allowed_keys(loc) -> Optional[List[str]]:
    """The keys of the (sub-)section an unknown key ``loc`` was found in: the section itself,
    ``skip`` or a member of ``shapers``. None where the location is not one of these."""
    path = tuple(x for x in loc[:-1] if not isinstance(x, int))
    model = {(): GradientShapingConfig, ("skip",): SpikeSkipConfig, ("shapers",): ShaperSpec}.get(path)
    return sorted(model.model_fields) if model is not None else None


def get_gradient_shaping_config(param_dict: Dict[str, Any]) -> Optional[GradientShapingConfig]:
    """The parsed section, or None when the config has none (or it is disabled)."""
    section = param_dict.get(GRADIENT_SHAPING)
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ValueError(f"DeepSpeed config key {GRADIENT_SHAPING!r} must be an object, got {type(section).__name__}")
    if "strict" in section:
        # DeepSpeedConfigModel's own keyword: as a key it would never reach the validation
        raise ValueError(f"invalid DeepSpeed config section 'gradient_shaping':\n  {GRADIENT_SHAPING}.strict: "
                         f"unknown key (value {section['strict']!r}); allowed: {sorted(GradientShapingConfig.model_fields)}")
    try:
        cfg = GradientShapingConfig(strict=True, **section)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            where = f"{GRADIENT_SHAPING}.{loc}" if loc else GRADIENT_SHAPING
            if err["type"] == "extra_forbidden":
                allowed = _allowed_keys(err["loc"])
                lines.append(f"  {where}: unknown key (value {err.get('input')!r})"
                             + (f"; allowed: {allowed}" if allowed else ""))
            else:
                lines.append(f"  {where}: {err['msg']} (got {err.get('input')!r})")
        raise ValueError("invalid DeepSpeed config section 'gradient_shaping':\n" + "\n".join(lines)) from None
    return cfg if cfg.enabled else None
