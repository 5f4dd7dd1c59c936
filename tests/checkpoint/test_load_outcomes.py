"""How ShapingCheckpointing.load_checkpoint decides from every rank's reading of the shaper state
(in-process: the gathered outcomes as the ranks would send them; the launched scenarios are in
test_deepspeed_checkpoints.py)."""
import pickle
from types import SimpleNamespace

import pytest

from megatron_shaping.checkpoint import ShaperStateCorrupt, ShaperStateError, ShaperStateMismatch, ShaperStateMissing
from megatron_shaping.integrations.deepspeed.checkpointing import ShapingCheckpointing, _Outcome


def agree(outcomes, allow_fresh=False, rank=0):
    ck = ShapingCheckpointing.__new__(ShapingCheckpointing)       # the decision needs no engine
    ck.engine = SimpleNamespace(global_rank=rank, local_rank=rank)
    return ck._agree(outcomes, "ckpt", "ckpt/t/state.pt", allow_fresh)


def test_outcomes_travel_through_all_gather_object():
    o = _Outcome("t", "error", "damaged", ShaperStateCorrupt)
    assert pickle.loads(pickle.dumps(o)) == o


def test_decisions():
    ok = _Outcome("t", "ok", "d1")
    missing = _Outcome("t", "missing", "ckpt/t/state.pt: absent")
    assert agree([ok, ok]) is False
    assert agree([_Outcome("t", "skip")] * 2) is False
    assert agree([missing, missing], allow_fresh=True) is True
    with pytest.raises(ShaperStateMissing, match="absent"):
        agree([missing, missing])
    # The error of the rank that read it, with its class, raised on every rank alike.
    for cls in (ShaperStateCorrupt, ShaperStateMismatch, FileNotFoundError):
        with pytest.raises(cls, match=r"^bad \(read on rank 1\)$"):
            agree([ok, _Outcome("t", "error", "bad", cls)])
        with pytest.raises(cls, match=r"^bad$"):
            agree([ok, _Outcome("t", "error", "bad", cls)], rank=1)
    with pytest.raises(ShaperStateError, match="different checkpoint tags"):
        agree([ok, _Outcome("u", "ok", "d1")])
    with pytest.raises(ShaperStateError, match="digests differ"):
        agree([ok, _Outcome("t", "ok", "d2")])
    with pytest.raises(ShaperStateError, match="readable on some ranks only"):
        agree([ok, missing], allow_fresh=True)
