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


def latest_of(tmp_path, others, content="global_step7"):
    """_agreed_latest on rank 0 with ``latest`` holding ``content`` (None: no file) and the
    other ranks' readings ``others`` as the gather would bring them."""
    if content is not None:
        (tmp_path / "latest").write_text(content + "\n")
    ck = ShapingCheckpointing.__new__(ShapingCheckpointing)
    ck._gather = lambda obj: [obj] + list(others)
    return ck._agreed_latest(str(tmp_path), universal=False)


def test_latest_is_agreed_before_anything_branches_on_it(tmp_path):
    assert latest_of(tmp_path, [("tag", "global_step7")] * 3) == "global_step7"
    assert latest_of(tmp_path / "..", [("none", None)], content=None) is None     # nowhere: DeepSpeed's path
    # a rank without the file returned through DeepSpeed's no-checkpoint path (no collective)
    # while the others waited in the outcome gather: a hang; now every rank raises alike
    with pytest.raises(ShaperStateError, match=r"do not agree.*rank 0: global_step7; rank 1: no file"):
        latest_of(tmp_path, [("none", None)])
    with pytest.raises(ShaperStateError, match=r"rank 1: global_step9"):
        latest_of(tmp_path, [("tag", "global_step9")])
    # every rank failed to read it alike (permissions): said so, not "no checkpoint"
    ck = ShapingCheckpointing.__new__(ShapingCheckpointing)
    ck._gather = lambda obj: [("error", "PermissionError: denied")] * 2
    with pytest.raises(ShaperStateError, match=r"latest: cannot be read \(PermissionError"):
        ck._agreed_latest(str(tmp_path), universal=False)


def test_saving_again_under_a_tag_removes_the_old_state_file_first(one_rank, tmp_path):
    """Accelerate's save_state(dir) saves under one tag ('pytorch_model') every time: a save that
    died after DeepSpeed began rewriting the tag left the previous save's shaper state beside
    half-written model files, and it passed validation. Now the old state file goes before
    DeepSpeed writes; the tag then holds none (a load refuses it) until the save completes."""
    import torch
    import megatron_shaping
    from megatron_shaping.checkpoint import STATE_FILE
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "zero_optimization": {"stage": 1}, "gradient_shaping": {"type": "norm_clip"}}
    engine = megatron_shaping.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]
    for _ in range(2):
        engine.backward(engine(torch.ones(2, 4)).square().sum())
        engine.step()
    engine.save_checkpoint(str(tmp_path), tag="pytorch_model")
    state = tmp_path / "pytorch_model" / STATE_FILE
    assert state.is_file()
    ck = engine.gradient_shaping.checkpointing

    def dies(*a, **k):
        raise OSError("killed mid-save")

    real, ck._orig_save = ck._orig_save, dies
    try:
        with pytest.raises(OSError, match="killed mid-save"):
            engine.save_checkpoint(str(tmp_path), tag="pytorch_model")
    finally:
        ck._orig_save = real
    assert not state.exists()
    with pytest.raises(ShaperStateMissing, match="file not found"):
        engine.load_checkpoint(str(tmp_path), tag="pytorch_model")
    engine.save_checkpoint(str(tmp_path), tag="pytorch_model")      # a completed save has it again
    assert state.is_file()
    engine.destroy()
