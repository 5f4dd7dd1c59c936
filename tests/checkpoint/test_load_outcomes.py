"""How ShapingCheckpointing.load_checkpoint decides from every rank's reading of the shaper state
(in-process: the gathered outcomes as the ranks would send them; the launched scenarios are in
test_deepspeed_checkpoints.py)."""
import logging
import os
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


def _engine_with_a_save(tmp_path, tag="global_step2"):
    """A one-rank ZeRO-1 engine with norm_clip after 2 steps, saved under ``tag``."""
    import torch
    import megatron_shaping
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "zero_optimization": {"stage": 1}, "gradient_shaping": {"type": "norm_clip"}}
    engine = megatron_shaping.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]
    for _ in range(2):
        engine.backward(engine(torch.ones(2, 4)).square().sum())
        engine.step()
    engine.save_checkpoint(str(tmp_path), tag=tag)
    return engine


def test_saving_again_under_a_tag_removes_the_old_state_file_first(one_rank, tmp_path, caplog):
    """Accelerate's save_state(dir) saves under one tag ('pytorch_model') every time: a save that
    died after DeepSpeed began rewriting the tag left the previous save's shaper state beside
    half-written model files, and it passed validation. Now the old state file goes before
    DeepSpeed writes; the tag then holds none (a load refuses it) until the save completes."""
    from megatron_shaping.checkpoint import STATE_FILE
    engine = _engine_with_a_save(tmp_path, tag="pytorch_model")
    state = tmp_path / "pytorch_model" / STATE_FILE
    assert state.is_file()
    ck = engine.gradient_shaping.checkpointing

    def dies(*a, **k):
        raise OSError("killed mid-save")

    real, ck._orig_save = ck._orig_save, dies
    try:
        with pytest.raises(OSError, match="killed mid-save"), caplog.at_level(logging.WARNING, "megatron_shaping"):
            engine.save_checkpoint(str(tmp_path), tag="pytorch_model")
    finally:
        ck._orig_save = real
    assert not state.exists()
    assert "saving again under tag pytorch_model" in caplog.text          # said, not silent
    with pytest.raises(ShaperStateMissing, match="file not found"):
        engine.load_checkpoint(str(tmp_path), tag="pytorch_model")
    engine.save_checkpoint(str(tmp_path), tag="pytorch_model")      # a completed save has it again
    assert state.is_file()
    engine.destroy()


def test_an_empty_latest_is_named_not_read_as_a_tag(tmp_path):
    """DeepSpeed's own writes of ``latest`` are not atomic: an empty one (a crash mid-write)
    made the load look for ``<dir>/gradient_shaping_state.pt`` and report it missing."""
    with pytest.raises(ShaperStateError, match=r"latest: is empty .*tag="):
        latest_of(tmp_path, [("tag", "")], content="")


def test_a_tag_without_deepspeed_model_files_is_named(one_rank, tmp_path):
    """A tag holding the shaper state but no DeepSpeed model files (a save that died, files
    copied in part): DeepSpeed 0.19.8 stops on a bare AssertionError; the error names the
    directory and what is missing."""
    import glob as _glob
    engine = _engine_with_a_save(tmp_path)
    for p in _glob.glob(str(tmp_path / "global_step2" / "*model_states.pt")):
        os.remove(p)
    with pytest.raises(FileNotFoundError, match=r"global_step2: holds no DeepSpeed model files") as e:
        engine.load_checkpoint(str(tmp_path), tag="global_step2")
    assert isinstance(e.value.__cause__, AssertionError)
    engine.destroy()


def test_convert_to_universal_refuses_before_writing(one_rank, tmp_path, monkeypatch):
    """An existing output folder is not written into (ds_to_universal would overwrite or mix it);
    a misspelt tag and a missing ``latest`` are named; a failed conversion takes the copied
    shaper state out again, so the partial folder never looks complete."""
    from deepspeed.checkpoint import ds_to_universal

    from megatron_shaping.checkpoint import STATE_FILE
    from megatron_shaping.integrations.deepspeed.checkpointing import convert_to_universal
    engine = _engine_with_a_save(tmp_path / "ck")
    engine.destroy()
    ck = str(tmp_path / "ck")
    taken = tmp_path / "ck" / "global_step2_universal"
    taken.mkdir()
    (taken / "keep.txt").write_text("earlier")
    with pytest.raises(FileExistsError, match="global_step2_universal already exists"):
        convert_to_universal(ck, tag="global_step2")
    assert sorted(os.listdir(taken)) == ["keep.txt"]
    with pytest.raises(FileNotFoundError, match=r"global_step2O does not exist \(tags in .*'global_step2'"):
        convert_to_universal(ck, tag="global_step2O")
    assert not (tmp_path / "ck" / "global_step2O_universal").exists()
    with pytest.raises(FileNotFoundError, match="latest does not exist"):
        convert_to_universal(str(tmp_path / "nowhere"))

    def dies(args):
        assert os.path.isfile(os.path.join(args.output_folder, STATE_FILE))     # copied before
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(ds_to_universal, "main", dies)
    out = tmp_path / "ck" / "u"
    with pytest.raises(RuntimeError, match="conversion failed"):
        convert_to_universal(ck, tag="global_step2", output_dir=str(out))
    assert not (out / STATE_FILE).exists()
