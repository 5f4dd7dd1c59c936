"""The methods the DeepSpeed suites run (equivalence, checkpoints): every registered shaper, with
hyperparameters that make it act within a few steps of the tests' small models.

One table for all suites. The list of methods comes from ``megatron_shaping.shapers.REGISTRY``
(registry order); ``ACTING`` only overrides defaults, and only for methods whose defaults would
barely act in a few steps (short warmups, small thresholds). entrywise_shrink uses threshold 3:
the default 10 moves the largest bf16 entries by ~20 ulps only. A method without an entry runs
with its defaults (``default_params``).
"""
from megatron_shaping.shapers import REGISTRY, default_params

#: method -> the hyperparameters that differ from its defaults in the tests.
ACTING = {
    "spamp": {"alpha_min": 0.7},
    "norm_clip": {"max_norm": 0.05},
    "value_clip": {"clip_value": 0.002},
    "agc": {"clipping": 0.01},
    "zclip": {"warmup_steps": 2, "max_grad_norm": None, "z_thresh": 0.5},
    "adagc": {"warmup_steps": 2, "warmup_max_norm": 0.05},
    "entrywise_shrink": {"threshold": 3.0},
}


def _check_acting():
    for name, params in ACTING.items():
        if name not in REGISTRY:
            raise KeyError(f"tests/shaper_specs.py: {name!r} is not a registered method")
        unknown = sorted(set(params) - set(default_params(name)))
        if unknown:
            raise KeyError(f"tests/shaper_specs.py: {name} has no hyperparameter(s) {unknown}")


_check_acting()


def registered_specs():
    """A new dict: method -> its ``gradient_shaping`` section for the tests, every registered method."""
    return {name: {"type": name, "params": dict(ACTING.get(name, {}))} for name in REGISTRY}
