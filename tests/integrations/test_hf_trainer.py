"""Hugging Face Trainer + DeepSpeed (ZeRO-2 and ZeRO-3, 2 CPU processes, deepspeed launcher) with a
``gradient_shaping`` section, after ``megatron_shaping.patch_deepspeed()``.

One launch of tests/integrations/hf_worker.py runs every scenario for both stages (see its
docstring); the tests below check its record:

(a) the Trainer's per-step shaping statistics equal those of the same model, data and seed run
    through ``megatron_shaping.initialize`` and a hand-written DeepSpeed loop;
(b) a run resumed from a Trainer checkpoint continues bit-exactly, shaper state included, and
    the same resume without the shaper state does not (and stops unless allowed);
(c) ShapingCallback puts the figures into ``trainer.state.log_history`` and the ``report_to``
    loggers (TensorBoard here);
(d) ObserveLossMixin feeds the training losses (not the evaluation ones) to the spike rule;
(e) Accelerate without the Trainer (``Accelerator`` + ``DeepSpeedPlugin``, ``prepare``,
    ``accumulate``, ``backward``) shapes as the hand-written loop does, with and without
    gradient accumulation (where Accelerate, not DeepSpeed, sets the accumulation boundary).
"""
import json
import math
import os

import pytest

from tests.distributed.launch import run_deepspeed

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = (2, 3)
STEPS, SAVE = 6, 3
GAS = 2                    # hf_worker.GAS
FIGURES = ("shaping/grad_norm_before", "shaping/grad_norm_after", "shaping/shaped_fraction", "shaping/skipped_steps")

# Tolerance for (a). Both runs feed the same micro batches through the same model code and the same
# DeepSpeed engine code in the same processes, so the reduced gradients, and the float64 statistics
# computed from them, should be bit-identical (measured: 0.0 at ZeRO-2 and ZeRO-3). 1e-9 relative
# is kept rather than 0 so that a harmless reordering of a float64 sum (~1e-16) would not fail
# the test, while anything that changes the gradient itself (a different loss normalisation:
# ~1e-7 in float32, a factor 2 from the Trainer's token averaging, another shaper state) does.
TOL = 1e-9
#: The power of (a): beta1 0.9 instead of 0.6 moves the statistics by 0.30 (relative); a resume
#: without the shaper state moves them by 0.26.
POWER = 1e-3


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_trainer")
    run_deepspeed(2, os.path.join(HERE, "hf_worker.py"), "--out", str(out), "--stages",
                  ",".join(map(str, STAGES)), timeout=1500)
    res = {}
    for st in STAGES:
        with open(out / f"stage{st}.json") as f:
            res[st] = json.load(f)
        assert "error" not in res[st], res[st]["error"]
    return res


def max_rel(a, b):
    """Largest relative difference over per-step, per-group statistics (sums of squares before
    and after shaping, and factors)."""
    assert len(a) == len(b) and a, (len(a), len(b))
    worst = 0.0
    for sa, sb in zip(a, b):
        for key in ("before", "factor", "after"):
            assert len(sa[key]) == len(sb[key])
            for x, y in zip(sa[key], sb[key]):
                worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-300))
    return worst


@pytest.mark.parametrize("stage", STAGES)
def test_trainer_statistics_equal_the_manual_loop(record, stage):
    r = record[stage]
    assert r["hf"]["attached"], "the patched deepspeed.initialize did not attach the shaper in the Trainer"
    assert r["batches"] == STEPS
    hf, man, other = r["hf"]["steps"], r["manual"]["steps"], r["manual_other"]["steps"]
    assert len(hf) == len(man) == len(other) == STEPS
    # the shaper is active: every group is rescaled (GradientStabilizer), not a no-op
    assert all(s["figures"]["shaping/shaped_fraction"] == 1.0 for s in hf)
    assert max(abs(f - 1.0) for s in hf for f in s["factor"]) > 0.1

    diff = max_rel(hf, man)
    assert diff <= TOL, f"ZeRO-{stage}: Trainer vs manual loop statistics differ by {diff:.3g} > {TOL}"
    assert r["manual"]["param_diff_vs_hf"] <= TOL
    # power: beta1 0.9 instead of 0.6 moves the statistics far outside the tolerance, and a run
    # without shaping ends with other parameters
    assert max_rel(hf, other) > POWER
    assert r["manual_off"]["param_diff_vs_hf"] > 1e-4          # measured 4.4e-3


@pytest.mark.parametrize("stage", STAGES)
def test_trainer_grad_norm_is_the_shaped_norm(record, stage):
    """Which grad norm the Trainer logs under DeepSpeed (transformers 37566 / accelerate 3807):
    DeepSpeed's, computed in its clipping pass after shaping, i.e. shaping/grad_norm_after."""
    logs = [e for e in record[stage]["hf"]["log_history"] if "loss" in e]
    assert len(logs) == STEPS
    for e in logs:
        assert e["grad_norm"] == pytest.approx(e["shaping/grad_norm_after"], rel=1e-6)
        # and the unshaped norm is a different number here (GradientStabilizer rescales)
        assert abs(e["grad_norm"] - e["shaping/grad_norm_before"]) > 0.1 * e["grad_norm"]


@pytest.mark.parametrize("stage", STAGES)
def test_resume_from_trainer_checkpoint_is_bit_exact(record, stage):
    r = record[stage]
    assert f"global_step{SAVE}/gradient_shaping_state.pt" in r["ckpt_files"]
    hf_tail, resumed = r["hf"]["steps"][SAVE:], r["resumed"]["steps"]
    assert len(resumed) == STEPS - SAVE
    assert r["resumed"]["last_load"]["fresh"] is False
    for a, b in zip(hf_tail, resumed):
        for key in ("before", "factor", "after"):
            assert a[key] == b[key], f"ZeRO-{stage}: resumed run's {key} statistics differ from the uninterrupted run"
    assert r["resumed"]["param_diff_vs_hf"] == 0.0

    # Control: the same checkpoint without the shaper state (allow_fresh_state) continues with
    # the same weights and optimizer, but other shaping statistics and other parameters.
    fresh = r["fresh"]
    assert fresh["last_load"]["fresh"] is True
    assert max_rel(hf_tail, fresh["steps"]) > POWER
    assert fresh["param_diff_vs_hf"] > 1e-5                    # measured 4.1e-4
    # and without allow_fresh_state the resume stops instead of silently losing the state
    assert r["missing"]["error"] == "ShaperStateMissing", r["missing"]
    assert "allow_fresh_state" in r["missing"]["message"]


@pytest.mark.parametrize("stage", STAGES)
def test_shaping_figures_reach_log_history_and_tensorboard(record, stage):
    r = record[stage]
    steps = r["hf"]["steps"]
    logs = [e for e in r["hf"]["log_history"] if "loss" in e]
    assert [e["step"] for e in logs] == list(range(1, STEPS + 1))
    for e, s in zip(logs, steps):
        for key in FIGURES:
            assert key in e, f"{key} missing from log_history at step {e['step']}"
            assert e[key] == s["figures"][key]
        # independent of log_dict: the global norm from the per-group sums of squares
        assert e["shaping/grad_norm_before"] == pytest.approx(math.sqrt(sum(s["before"])), rel=1e-12)
        assert e["shaping/grad_norm_after"] == pytest.approx(math.sqrt(sum(s["after"])), rel=1e-12)
        assert e["shaping/skipped_steps"] == 0.0
    # the summary log at the end of training is left alone
    assert not any(k.startswith("shaping/") for e in r["hf"]["log_history"] if "train_runtime" in e for k in e)
    # resumed runs log the figures too
    assert all("shaping/grad_norm_before" in e for e in r["resumed"]["log_history"] if "loss" in e)

    tb = r["tensorboard"]
    for key in FIGURES:
        tag = f"train/{key}"
        assert tag in tb, f"{tag} not written by the report_to=tensorboard logger: {sorted(tb)}"
        assert [s for s, _ in tb[tag]] == list(range(1, STEPS + 1))
        for (_, v), e in zip(tb[tag], logs):
            assert v == pytest.approx(e[key], rel=1e-6)          # TensorBoard stores float32


@pytest.mark.parametrize("gas", (1, GAS))
@pytest.mark.parametrize("stage", STAGES)
def test_accelerate_without_trainer_equals_the_manual_loop(record, stage, gas):
    """(e) The engine ``accelerator.prepare`` builds has the shaper attached, Accelerate's
    ``sync_gradients`` puts the boundary every ``gas`` micro batches, and the per-step statistics
    and final parameters equal those of ``megatron_shaping.initialize`` with the same config and
    DeepSpeed's own boundary (same tolerance as (a))."""
    r = record[stage][f"accelerate_gas{gas}"]
    assert r["attached"], "accelerator.prepare built an engine without the shaper"
    assert r["dp_world"] == 2
    assert r["boundaries"] == [(i + 1) % gas == 0 for i in range(STEPS)]
    assert len(r["steps"]) == len(r["manual_steps"]) == STEPS // gas
    diff = max_rel(r["steps"], r["manual_steps"])
    assert diff <= TOL, f"ZeRO-{stage}, GAS {gas}: Accelerate vs manual loop statistics differ by {diff:.3g}"
    assert r["param_diff"] <= TOL
    # power: another beta1 moves the statistics of the same steps far outside TOL (the GAS 1
    # run), and accumulating two micro batches per step ends with other parameters
    if gas == 1:
        assert max_rel(r["steps"], record[stage]["manual_other"]["steps"]) > POWER
    else:
        assert r["param_diff_vs_gas1"] > 1e-4


# ---------------------------------------------------------------------------- in-process, no launch
class _Shaping:
    def __init__(self):
        self.calls = 0

    def log_dict(self):
        self.calls += 1
        return {"shaping/grad_norm_before": 2.0, "shaping/grad_norm_after": 1.0, "shaping/shaped_fraction": 0.5,
                "shaping/skipped_steps": 0.0}


class _Engine:
    def __init__(self):
        self.gradient_shaping = _Shaping()


def test_callback_order_decides_what_the_loggers_see():
    """add_shaping_callback puts the callback ahead of the report_to loggers; appended after
    them (Trainer(callbacks=[...])), the loggers would log without the figures."""
    from transformers import TrainerCallback, TrainerControl, TrainerState
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

    from megatron_shaping.integrations.hf import ShapingCallback, add_shaping_callback

    class Reporter(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_log(self, args, state, control, logs=None, **kw):
            self.seen.append(dict(logs))

    def run(install):
        rep = Reporter()
        handler = CallbackHandler([DefaultFlowCallback, rep], None, None, None, None)
        trainer = type("T", (), {"callback_handler": handler})()
        install(trainer, handler)
        state = TrainerState()
        state.global_step = 7
        logs = {"loss": 1.5, "grad_norm": 1.0}
        state.log_history.append({**logs, "step": 7})                 # what Trainer.log does first
        handler.on_log(None, state, TrainerControl(), logs)
        summary = {"train_runtime": 1.0, "train_loss": 1.5}
        handler.on_log(None, state, TrainerControl(), summary)
        return rep.seen, state.log_history

    seen, hist = run(lambda t, h: add_shaping_callback(t, engine=_Engine(), patch=False))
    assert seen[0]["shaping/grad_norm_before"] == 2.0 and seen[0]["shaping/shaped_fraction"] == 0.5
    assert hist[-1]["shaping/grad_norm_after"] == 1.0 and hist[-1]["step"] == 7
    assert not any(k.startswith("shaping/") for k in seen[1])          # summary untouched

    seen, hist = run(lambda t, h: h.add_callback(ShapingCallback(engine=_Engine(), patch=False)))
    assert "shaping/grad_norm_before" not in seen[0]                   # too late for the logger
    assert hist[-1]["shaping/grad_norm_before"] == 2.0                 # log_history still fixed up

    # installing twice keeps one callback
    handler = CallbackHandler([DefaultFlowCallback], None, None, None, None)
    trainer = type("T", (), {"callback_handler": handler})()
    add_shaping_callback(trainer, engine=_Engine(), patch=False)
    add_shaping_callback(trainer, engine=_Engine(), patch=False)
    assert sum(isinstance(c, ShapingCallback) for c in handler.callbacks) == 1


def test_observe_loss_mixin_feeds_the_training_losses_to_the_loss_rule(record):
    """(d) ``ObserveLossMixin``: the spike rule's loss history holds each step's training loss
    (the mean over ranks of what the Trainer backpropagated), none of the evaluation losses
    computed every 2 steps; the plain Trainer feeds it nothing (the rule then tests no loss)."""
    r = record[2]["loss_rule"]
    mixin, plain, gas = r["mixin"], r["plain"], r["mixin_gas"]
    assert mixin["evals"] >= 2 and plain["evals"] >= 2, "the evaluations the losses must not reach did not run"
    assert len(mixin["expected"]) == STEPS
    assert mixin["history"] == pytest.approx(mixin["expected"], rel=1e-6), (mixin["history"], mixin["expected"])
    assert plain["history"] == [], plain["history"]
    assert mixin["skips"] == 0 and plain["skips"] == 0 and gas["skips"] == 0
    # With accumulation, each micro batch's loss is its share of the step's: the rule must see
    # the step's loss on every step, also on the epoch's short last step (3, 3, 3, 3, 3, 1 micro
    # batches). Averaging the shares gave the step's loss / 3, then / 1 on the short step: a 3x
    # jump the z-test reads as a spike.
    assert gas["micro"] == [3, 3, 3, 3, 3, 1], gas["micro"]
    assert gas["shaped_steps"] == gas["global_steps"] == STEPS, gas
    assert gas["history"] == pytest.approx(gas["expected"], rel=1e-6), (gas["history"], gas["expected"])
    # and where the loss takes no token count, each micro batch's loss is its own mean
    mean = r["mixin_gas_mean"]
    assert mean["micro"] == [3, 3, 3, 3, 3, 1] and mean["skips"] == 0
    assert mean["history"] == pytest.approx(mean["expected"], rel=1e-6), (mean["history"], mean["expected"])
