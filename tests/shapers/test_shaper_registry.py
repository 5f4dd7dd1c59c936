"""Registry, config keys and documentation conformance of every shaper."""
import inspect

import pytest

from megatron_shaping.shapers import REGISTRY, build_shaper, shaper_class
from megatron_shaping.shapers.base import STAT_DTYPE, make_layout


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_class_attributes_and_hparams_match_the_constructor(name):
    cls = shaper_class(name)
    assert cls.name == name
    assert cls.default_granularity in ("tensor", "block", "global")
    sig = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    assert list(cls.hparams) == sig[:len(cls.hparams)], "hparams must follow the constructor order"
    shaper = build_shaper(name, {})
    for k in cls.hparams:
        assert hasattr(shaper, k)
    assert repr(shaper).startswith(cls.__name__ + "(")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_docstring_has_formula_defaults_and_references(name):
    doc = inspect.getmodule(shaper_class(name)).__doc__
    assert "References:" in doc and "efault" in doc and "<-" in doc


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_state_fields_are_float64_per_group(name):
    shaper = build_shaper(name, {})
    state = shaper.init(make_layout(["a", "b", "c"], [4, 2, 1]))
    assert state._fields and all(t.dtype == STAT_DTYPE and t.shape[0] == 3 for t in state)


def test_unknown_keys_and_types_are_rejected_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['maxnorm'\].*allowed: \['max_norm'\]"):
        build_shaper("norm_clip", {"maxnorm": 1.0})
    with pytest.raises(ValueError, match="unknown gradient shaper type 'clip'"):
        build_shaper("clip", {})


def test_bad_values_name_parameter_value_and_range():
    with pytest.raises(ValueError, match=r"spamp: alpha_min must be a number in \(0.0, 1.0\], got 1.5"):
        build_shaper("spamp", {"alpha_min": 1.5})
    with pytest.raises(ValueError, match=r"zclip: mode must be one of \['zscore', 'percentile'\], got 'Z'"):
        build_shaper("zclip", {"mode": "Z"})


def test_null_max_grad_norm_is_accepted_for_zclip():
    assert build_shaper("zclip", {"max_grad_norm": None}).max_grad_norm is None


def _numeric_hparams():
    for name in sorted(REGISTRY):
        cls = shaper_class(name)
        sig = inspect.signature(cls.__init__).parameters
        for k in cls.hparams:
            d = sig[k].default
            if isinstance(d, (int, float)) and not isinstance(d, bool):
                yield name, k


@pytest.mark.parametrize("name,key", list(_numeric_hparams()))
@pytest.mark.parametrize("bad", ["0.9", [0.9], True, float("nan")], ids=["str", "list", "bool", "nan"])
def test_every_numeric_parameter_rejects_a_non_number_naming_shaper_and_key(name, key, bad):
    # A value of the wrong type (a string from a hand-edited JSON, a list, a bool) or NaN must
    # stop the config with the shaper and the key named, never a raw TypeError from a
    # comparison or a NaN carried into the state (gradient_stabilizer compared raw values).
    with pytest.raises(ValueError, match=rf"^{name}: {key} must be "):
        build_shaper(name, {key: bad})


@pytest.mark.parametrize("name", [n for n in sorted(REGISTRY) if "eps" in shaper_class(n).hparams])
def test_eps_must_be_finite(name):
    with pytest.raises(ValueError, match=rf"{name}: eps must be"):
        build_shaper(name, {"eps": float("inf")})
