"""The "gradient_shaping" section of the DeepSpeed config: parsing and error messages."""
import pytest

from megatron_shaping.integrations.deepspeed.config import GradientShapingConfig, get_gradient_shaping_config


def cfg(**section):
    return get_gradient_shaping_config({"train_batch_size": 8, "gradient_shaping": section})


def test_absent_or_disabled_section_is_none():
    assert get_gradient_shaping_config({"train_batch_size": 8}) is None
    assert cfg(type="gradient_stabilizer", enabled=False) is None


def test_issue_example_parses():
    c = cfg(type="gradient_stabilizer", granularity="tensor", params={"beta1": 0.6, "beta2": 0.999})
    assert isinstance(c, GradientShapingConfig)
    assert c.spec() == {"type": "gradient_stabilizer", "params": {"beta1": 0.6, "beta2": 0.999}}
    assert c.granularity == "tensor" and c.log_interval == 0 and c.nonfinite == "skip"


def test_defaults():
    c = cfg(type="spamp")
    assert c.granularity is None and c.params == {} and c.allow_fresh_state is False
    assert c.skip is None and c.log_update_size is True          # skipping off unless asked


def test_skip_section():
    c = cfg(type="spamp", skip={})
    # OLMo-core SkipStepOptimizer: rolling_interval_length 128, sigma_factor 6
    assert (c.skip.grad_norm_z, c.skip.loss_z, c.skip.window, c.skip.min_history, c.skip.max_grad_norm) == \
        (6.0, None, 128, None, None)
    c = cfg(type="spamp", skip={"grad_norm_z": None, "max_grad_norm": 10, "window": 16, "min_history": 16})
    assert c.skip.max_grad_norm == 10.0 and c.skip.grad_norm_z is None
    assert cfg(type="spamp", skip={"enabled": False, "grad_norm_z": None}).skip.enabled is False


def test_bad_key_in_a_chain_members_params_is_named_at_its_path():
    with pytest.raises(ValueError) as e:
        cfg(type="chain", shapers=[{"type": "norm_clip"}, {"type": "agc", "params": {"bogus": 1}}])
    msg = str(e.value)
    assert "gradient_shaping.shapers.1" in msg and "params: unknown key(s) ['bogus']" in msg, msg
    assert "gradient_shaping.params" not in msg, msg     # not the top-level params, which are unset


@pytest.mark.parametrize("section,needles", [
    ({"type": "gradient_stabiliser"}, ["gradient_shaping.type", "gradient_stabiliser", "gradient_stabilizer"]),
    ({"type": "spamp", "alpha": 0.5}, ["gradient_shaping.alpha", "unknown key", "0.5", "'params'", "'skip'"]),
    ({"type": "gradient_stabilizer", "params": {"beta1": 1.5}}, ["beta1", "1.5"]),
    ({"type": "gradient_stabilizer", "params": {"beta3": 0.5}}, ["beta3", "beta1", "beta2", "eps"]),
    ({"type": "norm_clip", "params": {"max_norm": -1.0}}, ["max_norm", "-1"]),
    ({"type": "spamp", "params": {"mode": "cubic"}}, ["mode", "cubic"]),
    ({"type": "spamp", "granularity": "layer"}, ["gradient_shaping.granularity", "layer", "tensor"]),
    ({"type": "spamp", "log_interval": -1}, ["gradient_shaping.log_interval", "-1"]),
    ({"type": "spamp", "nonfinite": "ignore"}, ["gradient_shaping.nonfinite", "ignore", "skip"]),
    ({"type": "chain"}, ["shapers"]),
    ({"type": "chain", "shapers": [{"type": "agc", "params": {"clip": 1}}]}, ["clip", "agc"]),
    ({"type": "chain", "shapers": [{"type": "nope"}]}, ["nope"]),
    ({"type": "gradient_stabilizer", "shapers": [{"type": "agc"}]}, ["shapers", "chain"]),
    ({"type": "gradient_stabilizer", "granularity": "block", "block_pattern": "(["}, ["block_pattern", "(["]),
    # no group to name the block (raised IndexError once the engine was built); a chain member's
    # block granularity checks the pattern too
    ({"type": "gradient_stabilizer", "granularity": "block", "block_pattern": r"^\d+\."},
     ["block_pattern", "no group", "first group"]),
    ({"type": "chain", "block_pattern": "(", "shapers": [{"type": "agc", "granularity": "block"}]},
     ["block_pattern", "'('", "not a valid regex"]),
    # a string or number for a switch: pydantic's lax mode read "no" / 0 / "off" as false and
    # turned shaping off without a word
    ({"type": "spamp", "enabled": "no"}, ["gradient_shaping.enabled", "'no'"]),
    ({"type": "spamp", "enabled": 0}, ["gradient_shaping.enabled", "0"]),
    ({"type": "spamp", "allow_fresh_state": "yes"}, ["gradient_shaping.allow_fresh_state", "'yes'"]),
    ({"type": "spamp", "skip": {"enabled": "off", "grad_norm_z": 6}}, ["gradient_shaping.skip.enabled", "'off'"]),
    # DeepSpeedConfigModel's own keyword as a key (raised a TypeError)
    ({"type": "spamp", "strict": False}, ["gradient_shaping.strict", "unknown key", "'type'"]),
    ({"type": "spamp", "skip": {"grad_norm_z": None}}, ["gradient_shaping.skip", "no rule", "loss_z", "max_grad_norm"]),
    ({"type": "spamp", "skip": {"windw": 64}}, ["gradient_shaping.skip.windw", "unknown key", "'window'"]),
    ({"type": "chain", "shapers": [{"type": "agc", "param": {}}]},
     ["gradient_shaping.shapers.0.param", "unknown key", "'params'", "'granularity'"]),
    ({"type": "spamp", "skip": {"window": 1}}, ["gradient_shaping.skip.window", "1"]),
    ({"type": "spamp", "skip": {"window": 8, "min_history": 9}}, ["min_history", "9", "window", "8"]),
    ({"type": "spamp", "skip": {"grad_norm_z": -6}}, ["gradient_shaping.skip.grad_norm_z", "-6"]),
    ({"type": "spamp", "skip": {"max_grad_norm": 0}}, ["gradient_shaping.skip.max_grad_norm", "0"]),
    ({"type": "spamp", "skip": 6.0}, ["gradient_shaping.skip", "6.0"]),
])
def test_bad_sections_name_key_value_and_allowed(section, needles):
    with pytest.raises(ValueError) as e:
        cfg(**section)
    msg = str(e.value)
    for n in needles:
        assert n in msg, f"{n!r} not in error message:\n{msg}"


def test_section_must_be_an_object():
    with pytest.raises(ValueError, match="gradient_shaping.*object"):
        get_gradient_shaping_config({"gradient_shaping": "gradient_stabilizer"})


def test_chain_members_keep_their_granularity():
    c = cfg(type="chain", shapers=[{"type": "agc"}, {"type": "norm_clip", "params": {"max_norm": 1.0},
                                                     "granularity": "global"}])
    assert c.spec()["shapers"][1]["granularity"] == "global"


def test_initialize_rejects_bad_section_before_building_the_engine(monkeypatch):
    import deepspeed
    import megatron_shaping

    def boom(*a, **k):
        raise AssertionError("deepspeed.initialize must not run with an invalid gradient_shaping section")

    monkeypatch.setattr(deepspeed, "initialize", boom)
    with pytest.raises(ValueError, match="gradient_shaping.type"):
        megatron_shaping.initialize(model=None, config={"train_batch_size": 1, "gradient_shaping": {"type": "x"}})
