"""ShapingSession state: saved by group name, restored by name, mismatches named."""
import pytest
import torch

from megatron_shaping.core import ShapingSession, shaper_from_spec
from megatron_shaping.shapers import Chain, chain
from megatron_shaping.shapers.norm_clip import NormClip
from megatron_shaping.stats.layout import ParamInfo
from megatron_shaping.stats.slices import GradSlice, SliceSet

PARAMS = [ParamInfo("a.weight", (3, 4)), ParamInfo("b.weight", (5,)), ParamInfo("c.weight", (2, 2))]


def step(session, grads):
    g = session.grouping
    slices = [GradSlice(grad=grads[p.name].view(-1), group=g.group(p.name)) for p in session.grouping.params]
    return session.step(SliceSet(slices, session.layout))


def grads(seed):
    gen = torch.Generator().manual_seed(seed)
    return {p.name: torch.randn(p.shape, generator=gen, dtype=torch.float64) * (1 + i)
            for i, p in enumerate(PARAMS)}


def test_mixed_granularity_chain_round_trips():
    spec = {"type": "chain", "shapers": [{"type": "gradient_stabilizer"},
                                         {"type": "zclip", "params": {"warmup_steps": 2}, "granularity": "global"}]}
    a = ShapingSession(shaper_from_spec(spec), PARAMS)
    for s in range(4):
        step(a, grads(s))
    sd = a.state_dict()
    assert sd["members"][1]["groups"] == ["global"]
    b = ShapingSession(shaper_from_spec(spec), PARAMS)
    b.load_state_dict(sd)
    ga, gb = grads(9), grads(9)
    step(a, ga)
    step(b, gb)
    for n in ga:
        assert torch.equal(ga[n], gb[n])


def test_state_follows_parameter_names_not_order():
    a = ShapingSession(shaper_from_spec({"type": "gradient_stabilizer"}), PARAMS)
    for s in range(3):
        step(a, grads(s))
    reordered = [PARAMS[2], PARAMS[0], PARAMS[1]]
    b = ShapingSession(shaper_from_spec({"type": "gradient_stabilizer"}), reordered)
    b.load_state_dict(a.state_dict())
    for name in ("a.weight", "b.weight", "c.weight"):
        ia, ib = a.layout.names.index(name), b.layout.names.index(name)
        assert a.state[0].m[ia] == b.state[0].m[ib] and a.state[0].v[ia] == b.state[0].v[ib]


@pytest.mark.parametrize("change,needle", [
    (lambda: ShapingSession(shaper_from_spec({"type": "spamp"}), PARAMS), "saved shaper"),
    (lambda: ShapingSession(shaper_from_spec({"type": "gradient_stabilizer"}), PARAMS[:2]), "other layers"),
    (lambda: ShapingSession(shaper_from_spec({"type": "gradient_stabilizer"}), PARAMS, "global"), "granularity"),
])
def test_mismatch_is_named(change, needle):
    a = ShapingSession(shaper_from_spec({"type": "gradient_stabilizer"}), PARAMS)
    step(a, grads(0))
    with pytest.raises(ValueError, match=needle):
        change().load_state_dict(a.state_dict(), source="ckpt/x.pt")


def test_not_a_state_or_other_version():
    s = ShapingSession(shaper_from_spec({"type": "gradient_stabilizer"}), PARAMS)
    with pytest.raises(ValueError, match="no format_version"):
        s.load_state_dict({"foo": 1})
    sd = s.state_dict()
    sd["format_version"] = 99
    with pytest.raises(ValueError, match="format_version 99"):
        s.load_state_dict(sd)


@pytest.mark.parametrize("drop,named", [
    (lambda sd: sd.pop("members"), "['members']"),
    (lambda sd: sd.pop("granularity"), "['granularity']"),
    (lambda sd: sd["members"][0].pop("fields"), "['members[0].fields']"),
])
def test_a_missing_key_is_named_with_the_source(drop, named):
    s = ShapingSession(shaper_from_spec({"type": "gradient_stabilizer"}), PARAMS)
    sd = s.state_dict()
    drop(sd)
    with pytest.raises(ValueError) as e:
        s.load_state_dict(sd, source="ckpt/x.pt")
    assert str(e.value) == f"ckpt/x.pt: shaper state lacks {named}"


def test_a_single_shaper_is_a_chain_of_one():
    s = ShapingSession(shaper_from_spec({"type": "spamp"}), PARAMS)
    assert isinstance(s.shaper, Chain) and len(s.shaper.shapers) == 1 and repr(s.shaper) == repr(s.shaper.shapers[0])
    assert isinstance(s.state, tuple) and type(s.state[0]).__name__ == "SPAMPState"
    step(s, grads(0))
    assert isinstance(s.state, tuple) and len(s.state) == 1 and s.state[0].count.tolist() == [1.0, 1.0, 1.0]


def test_member_granularity_lives_in_the_chain():
    spec = {"type": "chain", "shapers": [{"type": "gradient_stabilizer"},
                                         {"type": "zclip", "params": {"warmup_steps": 2}, "granularity": "global"}]}
    sh = shaper_from_spec(spec)
    assert sh.granularities == (None, "global") and not hasattr(sh.shapers[1], "granularity")
    s = ShapingSession(sh, PARAMS)
    assert s.granularity == "tensor" and s.shaper.granularities == ("tensor", "global")
    assert [list(m.state_layout(s.layout).names) for m in s.shaper.shapers] == [[p.name for p in PARAMS], ["global"]]
    nested = chain(chain(NormClip(), granularities=["block"]), NormClip(), granularities=["tensor", "global"])
    assert nested.granularities == ("block", "global")
    with pytest.raises(ValueError, match="granularities"):
        chain(NormClip(), granularities=["tensor", "global"])
