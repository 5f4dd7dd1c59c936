"""LLaMA model configuration and the presets in ``configs/models/*.json``.

Field names follow Megatron's arguments (``hidden_size``, ``num_query_groups``,
``ffn_hidden_size``, ``make_vocab_size_divisible_by``) so presets read like Megatron scripts.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

#: ``configs/models`` of this repository (presets are data, not code).
PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"

FP8_BACKENDS = ("sim", "te", "auto")


@dataclass
class LlamaConfig:
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: int
    #: Key/value heads for grouped-query attention; None means multi-head attention.
    num_query_groups: Optional[int] = None
    #: Tokenizer vocabulary; the model pads it (see ``padded_vocab_size``).
    vocab_size: int = 32000
    seq_length: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    #: Pad the vocabulary to a multiple of this. Megatron multiplies it by the TP size; we do
    #: not, so that the padded vocabulary (and every weight shape) is independent of TP size.
    make_vocab_size_divisible_by: int = 128
    #: Simulated (CPU) or Transformer Engine FP8 in the transformer-layer linears.
    fp8: bool = False
    fp8_backend: str = "auto"
    #: Where the preset came from (paper/repo), for the record only.
    source: str = ""
    name: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        # types and ranges first (a preset is hand-edited JSON): "64" for a size raised an
        # unrelated TypeError, 0 a ZeroDivisionError, fp8 "false" (a non-empty string) enabled FP8
        for k in ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "num_query_groups",
                  "vocab_size", "seq_length", "make_vocab_size_divisible_by"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"model config: {k} must be an integer >= 1, got {v!r}")
        for k in ("rope_theta", "norm_eps", "init_std"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ValueError(f"model config: {k} must be a finite number > 0, got {v!r}")
        for k in ("tie_embeddings", "fp8"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"model config: {k} must be true or false, got {getattr(self, k)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                             f"num_query_groups {self.num_query_groups}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("RoPE needs an even head dimension")
        if self.fp8_backend not in FP8_BACKENDS:
            raise ValueError(f"fp8_backend must be one of {FP8_BACKENDS}, got {self.fp8_backend!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return ((self.vocab_size + m - 1) // m) * m

    def check_tensor_parallel(self, tp: int) -> None:
        """Raise a clear error when a dimension cannot be split over ``tp`` ranks."""
        dims = {"num_attention_heads": self.num_attention_heads,
                "num_query_groups": self.num_query_groups,
                "ffn_hidden_size": self.ffn_hidden_size,
                "padded_vocab_size": self.padded_vocab_size}
        bad = {k: v for k, v in dims.items() if v % tp}
        if bad:
            raise ValueError(f"model {self.name or ''} cannot be split over tensor-model-parallel "
                             f"size {tp}: {bad} not divisible by {tp}")

    def num_parameters(self) -> int:
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.padded_vocab_size
        kv = self.num_query_groups * self.head_dim
        layer = h * h * 2 + h * kv * 2 + 3 * h * f + 2 * h
        return v * h * (1 if self.tie_embeddings else 2) + self.num_layers * layer + h

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def available_presets():
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name_or_path: str, **overrides) -> LlamaConfig:
    """A preset by name (``llama-tiny``) or a JSON file path; ``overrides`` win over the file
    (None values are ignored so argparse defaults can be passed straight through)."""
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.exists()):
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.exists():
        raise FileNotFoundError(f"model preset {name_or_path!r} not found: expected a JSON file or "
                                f"one of {available_presets()} in {PRESET_DIR}")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"model preset {path} is not valid JSON: {e}") from None
    known = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"model preset {path} has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    data.setdefault("name", path.stem)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return LlamaConfig(**data)
    except ValueError as e:
        raise ValueError(f"model preset {path}: {e}") from None

