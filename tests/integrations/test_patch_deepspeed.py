"""megatron_shaping.patch_deepspeed(): every deepspeed.initialize call attaches the shaper of its
config, in every form DeepSpeed accepts the config; idempotent, undoable, no double attach.

In-process, one rank (gloo), a tiny ZeRO-0 fp32 engine (a few ms per deepspeed.initialize once
DeepSpeed's comm op is built).
"""
import argparse
import base64
import json
import logging
import os
import sys
import types

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

import megatron_shaping  # noqa: E402
from tests.distributed.launch import init_world_of_one  # noqa: E402

SHAPING = {"type": "norm_clip", "params": {"max_norm": 0.01}}


def config(shaping=SHAPING, **extra):
    c = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10 ** 9,
         "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
         "zero_optimization": {"stage": 0}}
    if shaping is not None:
        c["gradient_shaping"] = shaping
    c.update(extra)
    return c


_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE")


@pytest.fixture(scope="module")
def ds():
    """A world of one (gloo; reused if another test made one). DeepSpeed reads the rank from the
    environment: set for this module, restored after it (later tests launch subprocesses)."""
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    init_world_of_one()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29500"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
    import deepspeed
    yield deepspeed
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def patched(ds):
    real = ds.initialize
    megatron_shaping.patch_deepspeed()
    yield ds
    megatron_shaping.unpatch_deepspeed()
    assert ds.initialize is real


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def step(engine):
    loss = engine(torch.ones(2, 4)).pow(2).sum()
    engine.backward(loss)
    engine.step()


def assert_shaping(engine, shaper="NormClip"):
    gs = engine.gradient_shaping
    assert gs is not None, "gradient_shaping not attached"
    assert shaper in repr(gs.session.shaper)
    # attached before the caller could load a checkpoint: load/save already go through the shaper
    assert engine.load_checkpoint.__self__ is gs.checkpointing
    assert engine.save_checkpoint.__self__ is gs.checkpointing
    step(engine)
    assert gs.session.steps == 1
    figures = gs.log_dict()
    # max_norm 0.01 is far below this model's gradient norm: the step was really shaped
    assert figures["shaping/grad_norm_before"] > 0.1
    assert figures["shaping/grad_norm_after"] == pytest.approx(0.01, rel=1e-6)


def test_unpatched_deepspeed_ignores_the_section(ds):
    """The bug the patch fixes: plain deepspeed.initialize drops the section silently."""
    from megatron_shaping.integrations.deepspeed import is_deepspeed_patched
    assert not is_deepspeed_patched()
    engine, *_ = ds.initialize(model=model(), config=config())
    assert getattr(engine, "gradient_shaping", None) is None


def config_forms(init, tmp_path):
    """Every way a ``deepspeed.initialize``-like ``init`` can be handed its config."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config()))
    b64 = base64.urlsafe_b64encode(json.dumps(config()).encode()).decode()
    return {
        "config=dict": lambda m: init(model=m, config=config()),
        "config=path": lambda m: init(model=m, config=str(path)),
        "config=base64": lambda m: init(model=m, config=b64),
        "config_params=dict": lambda m: init(model=m, config_params=config()),
        "config_params=path": lambda m: init(model=m, config_params=str(path)),
        "args.deepspeed_config": lambda m: init(argparse.Namespace(deepspeed_config=str(path), local_rank=0),
                                                         m),
        "args.deepscale_config": lambda m: init(
            args=argparse.Namespace(deepscale_config=str(path), deepspeed_config=None, local_rank=0), model=m),
        # Megatron-DeepSpeed: args (deepspeed_config cleared) and the dict in config=
        "megatron-deepspeed": lambda m: init(model=m, args=argparse.Namespace(deepspeed_config=None),
                                                      model_parameters=m.parameters(), config=config()),
    }


@pytest.mark.parametrize("front", ["patched deepspeed.initialize", "megatron_shaping.initialize"])
def test_every_config_form(ds, front, tmp_path):
    if front == "megatron_shaping.initialize":
        init = megatron_shaping.initialize
    else:
        megatron_shaping.patch_deepspeed()
        init = ds.initialize
    try:
        forms = config_forms(init, tmp_path)
        for name, call in forms.items():
            engine, *_ = call(model())
            try:
                assert_shaping(engine)
            except AssertionError as e:
                raise AssertionError(f"{front}, {name}: {e}") from None
    finally:
        megatron_shaping.unpatch_deepspeed()


def test_absent_or_disabled_section_builds_a_plain_engine(patched):
    for cfg in (config(shaping=None), config(shaping=dict(SHAPING, enabled=False))):
        engine, *_ = patched.initialize(model=model(), config=cfg)
        assert getattr(engine, "gradient_shaping", None) is None
        step(engine)      # trains as unpatched DeepSpeed does


def test_bad_section_stops_before_deepspeed_builds_the_engine(ds, monkeypatch):
    calls = []
    real = ds.initialize

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ds, "initialize", counting)
    megatron_shaping.patch_deepspeed()
    try:
        with pytest.raises(ValueError, match="max_norm"):
            ds.initialize(model=model(), config=config(shaping={"type": "norm_clip", "params": {"max_norm": -1}}))
        assert calls == []
        ds.initialize(model=model(), config=config())
        assert calls == [1]          # the patch wraps whatever deepspeed.initialize was
    finally:
        megatron_shaping.unpatch_deepspeed()
    assert ds.initialize is counting


def test_idempotent_and_undone(ds):
    real = ds.initialize
    megatron_shaping.patch_deepspeed()
    wrapper = ds.initialize
    assert wrapper is not real
    megatron_shaping.patch_deepspeed()
    assert ds.initialize is wrapper            # not wrapped twice
    engine, *_ = ds.initialize(model=model(), config=config())
    assert_shaping(engine)
    megatron_shaping.unpatch_deepspeed()
    assert ds.initialize is real
    megatron_shaping.unpatch_deepspeed()       # unpatching twice is harmless
    assert ds.initialize is real
    engine, *_ = wrapper(model=model(), config=config())   # a stale reference passes through
    assert getattr(engine, "gradient_shaping", None) is None
    megatron_shaping.patch_deepspeed()         # and patching again works
    try:
        assert ds.initialize is wrapper
    finally:
        megatron_shaping.unpatch_deepspeed()


def test_earlier_from_import_is_rebound_and_restored(ds):
    real = ds.initialize
    mod = types.ModuleType("user_training_script")
    mod.initialize = ds.initialize             # from deepspeed import initialize
    mod.ds_init = ds.initialize                # from deepspeed import initialize as ds_init
    sys.modules[mod.__name__] = mod
    try:
        megatron_shaping.patch_deepspeed()
        assert mod.initialize is ds.initialize and mod.ds_init is ds.initialize
        engine, *_ = mod.ds_init(model=model(), config=config())
        assert_shaping(engine)
        megatron_shaping.unpatch_deepspeed()
        assert mod.initialize is real and mod.ds_init is real
        megatron_shaping.patch_deepspeed(rebind_imported=False)
        assert mod.initialize is real
    finally:
        megatron_shaping.unpatch_deepspeed()
        del sys.modules[mod.__name__]


def test_megatron_shaping_initialize_attaches_once_when_patched(patched):
    """megatron_shaping.initialize calls the original deepspeed.initialize: a second attach
    would raise 'already attached'; the hook must wrap DeepSpeed's own step, not a shaper's."""
    engine, *_ = megatron_shaping.initialize(model=model(), config=config())
    gs = engine.gradient_shaping
    assert gs._orig_take_model_step.__func__ is type(engine)._take_model_step
    assert_shaping(engine)
    from megatron_shaping.integrations.deepspeed.patch import engine_for_module
    assert engine_for_module(engine.module) is engine


def test_positional_parameter_order_matches_deepspeed(ds):
    import inspect

    from megatron_shaping.integrations.deepspeed.patch import INITIALIZE_PARAMS, original_initialize
    assert tuple(inspect.signature(original_initialize()).parameters) == INITIALIZE_PARAMS


@pytest.mark.parametrize("zero,dtype", [(0, None), (0, "bf16"), (3, None)], ids=["zero0", "zero0-bf16", "zero3"])
def test_an_engine_without_an_optimizer_is_built_and_left_unshaped(patched, zero, dtype):
    """The same config builds engines without an optimizer: the HF Trainer's evaluate() before
    train() under ZeRO-3 (deepspeed_init(inference=True) drops 'optimizer'), TRL's reference
    models, teacher models. Attaching raised 'does not support the optimizer path
    DeepSpeedZeRoOffload' (ZeRO-3) / 'NoneType' (ZeRO-0), or shaped a BF16_Optimizer around no
    optimizer (ZeRO-0 bf16)."""
    from megatron_shaping.integrations.deepspeed.engine import attach
    c = config(zero_optimization={"stage": zero}, **({"bf16": {"enabled": True}} if dtype else {}))
    del c["optimizer"]
    engine, *_ = patched.initialize(model=model(), config=c)
    assert getattr(engine, "gradient_shaping", None) is None
    with torch.no_grad():
        out = engine(torch.ones(2, 4, dtype=torch.bfloat16 if dtype else torch.float32))
    assert out.shape == (2, 3)
    # asked for explicitly, it says why
    with pytest.raises(RuntimeError, match="built without an optimizer"):
        attach(engine, {"gradient_shaping": SHAPING})


@pytest.mark.parametrize("clipping,warned", [(None, True), (1.0, False), (0.0, False)])
def test_deepspeeds_implicit_default_clipping_is_named(patched, caplog, clipping, warned):
    """Without a gradient_clipping key DeepSpeed clips at its default 1.0 after shaping: said
    (a user replacing clipping with a shaper rarely means both); an explicit value is not."""
    extra = {} if clipping is None else {"gradient_clipping": clipping}
    with caplog.at_level(logging.WARNING, logger="megatron_shaping"):
        engine, *_ = patched.initialize(model=model(), config=config(**extra))
    assert engine.gradient_shaping.clip == (1.0 if clipping is None else clipping)
    said = [r.getMessage() for r in caplog.records if "sets no gradient_clipping" in r.getMessage()]
    assert bool(said) == warned, said
    if warned:
        assert 'set "gradient_clipping": 0.0' in said[0] and "default 1 " in said[0]
