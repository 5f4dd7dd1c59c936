"""Shaper state in DeepSpeed checkpoints, end to end, in new processes (see plans.py for the
four ``deepspeed`` launches and ckpt_worker.py for the jobs).

* exact resume: for every shaper and ZeRO 1-3 (and 0 for two shapers; fp32 on CPU), N steps +
  save + resume in new processes + M steps gives losses, parameters and shaper state identical
  (torch.equal) to the uninterrupted N+M run (the saving run continued in its own processes;
  for two shapers also checked equal to a run that never saved); also with a step skipped
  before the save, and for LLaMA under PP2 and TP2. A negative control (shaper state dropped
  after load) must differ.
* resume elsewhere: DP 2 -> 4 and 4 -> 2 through universal checkpoints (and ZeRO 1 <-> 2 on the
  way), ZeRO 1 <-> 2 directly: parameters within fp32 tolerance of the single-process reference,
  shaper state loaded equal to the file.
* bad checkpoints: missing, older format, other method / granularity / layers / shapes,
  truncated or damaged files: clear errors naming the file; ``allow_fresh_state`` only for
  missing state; nothing on disk changes when loading.
* faults: a rank SIGKILLed in the middle of a save and of training; ``latest`` never names a
  partial checkpoint, the restarted run resumes and ends bit-identical to an uninterrupted run.
* non-finite gradients without a loss scaler are skipped and counted; fuzzed gradients keep
  the state finite.
"""
import hashlib
import json
import os
import shutil

import pytest
import torch

from tests.distributed.launch import failed, read_results, run_deepspeed

from . import plans as P

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "ckpt_worker.py")
TOL = 1e-5          # fp32 tolerance across DP layouts / ZeRO stages (observed ~2e-7)
STATE_FILE = "gradient_shaping_state.pt"


def _launch(world, plan, work, label, expect_kill=False):
    plan_path = os.path.join(work, f"plan_{label}.json")
    out_path = os.path.join(work, f"results_{label}.jsonl")
    with open(plan_path, "w") as f:
        json.dump(plan, f)
    proc = run_deepspeed(world, WORKER, "--plan", plan_path, "--out", out_path, timeout=1200, check=False,
                         log=os.path.join(work, f"log_{label}.txt"))
    results = read_results(out_path) if os.path.exists(out_path) else {}
    killed = plan[-1]["name"] if expect_kill else None
    missing = [j["name"] for j in plan if j["name"] not in results and j["name"] != killed]
    if (proc.returncode != 0) != expect_kill or missing:
        raise RuntimeError(failed(f"deepspeed launch {label} (world {world}), missing results {missing[:5]},", proc))
    return results


def _tree_hash(root, exclude=()):
    h = {}
    for d, dirs, files in os.walk(root):
        rel = os.path.relpath(d, root)
        if rel.split(os.sep)[0] in exclude:
            continue
        for fn in files:
            p = os.path.join(d, fn)
            with open(p, "rb") as f:
                h[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return h


def _convert(ckpt_dir):
    from megatron_shaping.integrations.deepspeed.checkpointing import convert_to_universal
    return convert_to_universal(ckpt_dir, inject_missing_state=True)


def _flip_tensor_byte(path):
    """Flip one byte in the middle of the largest tensor record of a torch zip file."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        pos = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x5A]))


def _make_bad(root):
    """Hand-made bad checkpoints: copies of a good one with the shaper state file damaged."""
    from megatron_shaping.checkpoint import pack_state
    good = os.path.join(root, "exact", "gradient_stabilizer_z2")
    tag = "global_step3"
    for name in ("old_format", "truncated", "bitflip", "garbage"):
        shutil.copytree(good, os.path.join(root, "bad", name))
    state = lambda name: os.path.join(root, "bad", name, tag, STATE_FILE)  # noqa: E731
    obj = torch.load(state("old_format"), weights_only=True)
    sd = dict(obj["state"], format_version=0)
    torch.save(pack_state(sd, obj["meta"]), state("old_format"))
    with open(state("truncated"), "r+b") as f:
        f.truncate(os.path.getsize(state("truncated")) // 2)
    _flip_tensor_byte(state("bitflip"))
    with open(state("garbage"), "wb") as f:
        f.write(os.urandom(777))
    # A universal checkpoint made with DeepSpeed's own ds_to_universal, which skips our file.
    src = os.path.join(root, "u2", "gs_z2")
    dst = os.path.join(root, "bad", "plain_universal")
    shutil.copytree(os.path.join(src, tag), os.path.join(dst, tag))
    import argparse
    from deepspeed.checkpoint import ds_to_universal
    ds_to_universal.main(argparse.Namespace(input_folder=os.path.join(dst, tag),
                                            output_folder=os.path.join(dst, tag + "_universal"),
                                            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                            strict=True, inject_missing_state=True))


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("ckpt_suite"))
    root = os.path.join(work, "ckpt")
    os.makedirs(os.path.join(root, "refs"))
    out = {"root": root, "results": {}, "fault": {}}
    R = out["results"]

    R.update(_launch(2, P.plan_1(root), work, "1", expect_kill=True))
    fault_dir = os.path.join(root, "fault", "run")
    out["fault"]["after_run1"] = _fault_snapshot(fault_dir)
    for u in P.UNIVERSAL:
        _convert(os.path.join(root, "u2", u))
    _make_bad(root)
    out["hash_before"] = _tree_hash(root, exclude=("fault", "u4"))

    R.update(_launch(4, P.plan_2(root), work, "2"))
    for u in P.UNIVERSAL:
        _convert(os.path.join(root, "u4", u))
    u4_before = _tree_hash(os.path.join(root, "u4"))

    R.update(_launch(2, P.plan_3(root), work, "3", expect_kill=True))
    out["fault"]["after_run2"] = _fault_snapshot(fault_dir)
    out["hash_after"] = _tree_hash(root, exclude=("fault", "u4"))
    out["u4_unchanged"] = u4_before == _tree_hash(os.path.join(root, "u4"))

    R.update(_launch(2, P.plan_4(root), work, "4"))
    return out


def _fault_snapshot(d):
    with open(os.path.join(d, "latest")) as f:
        latest = f.read().strip()
    tags = sorted(t for t in os.listdir(d) if t.startswith("global_step"))
    return {"latest": latest, "tags": tags,
            "with_state": sorted(t for t in tags if os.path.exists(os.path.join(d, t, STATE_FILE)))}


def _ok(r):
    assert "crash" not in r and "error_type" not in r, r.get("crash") or r.get("error")


# ------------------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("sh,st", list(P.exact_cases()), ids=lambda x: str(x))
def test_exact_resume(suite, sh, st):
    R = suite["results"]
    name = P.exact_name(sh, st)
    saved, resumed = R[name + "/save"], R[name]
    _ok(saved)
    assert saved["file_matches_state"] and saved["meta"]["global_steps"] == P.N
    assert saved["meta"]["zero_stage"] == st and saved["meta"]["world_size"] == 2
    if sh in P.PURE_REFERENCE:
        # the saving run, continued in the same processes, equals a run that never saved
        assert saved["losses_equal"] and saved["params_equal"] and saved["state_equal"], saved
    _ok(resumed)
    assert resumed["kind"] == "resume"
    assert resumed["load_path"], "nothing was loaded"
    assert resumed["global_steps_after_load"] == P.N
    assert resumed["loaded_state_equal_file"], "the loaded shaper state differs from the saved file"
    assert resumed["losses_equal"], f"losses differ from the uninterrupted run (max rel {resumed['loss_rel']})"
    assert resumed["params_equal"], f"parameters differ from the uninterrupted run (max rel {resumed['params_rel']})"
    assert resumed["state_equal"], f"shaper state differs from the uninterrupted run (max rel {resumed['state_rel']})"


def test_saved_file_is_the_session_state(suite):
    """The file written by save_checkpoint holds the live shaper state, with its metadata."""
    for u in P.UNIVERSAL:
        r = suite["results"][f"u2/{u}"]
        _ok(r)
        assert r["file_matches_state"]
        assert r["meta"]["global_steps"] == P.N and r["meta"]["world_size"] == 2
        assert r["meta"]["zero_stage"] == P.UNIVERSAL[u][1]


def test_exact_resume_after_skipped_step(suite):
    r = suite["results"]["exact/skip_before_save"]
    _ok(r)
    assert r["losses_equal"] and r["params_equal"] and r["state_equal"]
    assert r["skipped"] == 1, "the skip counter did not survive the checkpoint"


def test_negative_control_sees_a_dropped_state(suite):
    r = suite["results"]["exact/negative_control"]
    _ok(r)
    assert not r["state_equal"] and not r["params_equal"], \
        "resuming without the shaper state went unnoticed: the exact-resume comparison proves nothing"


@pytest.mark.parametrize("layout", ["pp2", "tp2"])
def test_exact_resume_llama_pipeline_and_tensor_parallel(suite, layout):
    r = suite["results"][f"llama/{layout}"]
    _ok(r)
    assert r["kind"] == "resume" and r["loaded_state_equal_file"]
    assert r["losses_equal"] and r["params_equal"] and r["state_equal"], r


# ------------------------------------------------------------------------------ resume elsewhere
@pytest.mark.parametrize("direction", ["u2to4", "u4to2"])
@pytest.mark.parametrize("src,stage", P.UNIVERSAL_RESUMES, ids=lambda x: str(x))
def test_universal_resume_other_world_size(suite, direction, src, stage):
    r = suite["results"][f"{direction}/{src}_to_z{stage}"]
    _ok(r)
    assert r["loaded_state_equal_file"], "shaper state did not carry over unchanged"
    assert r["global_steps_after_load"] == P.N
    assert r["params_rel"] <= TOL, r["params_rel"]
    assert r["loss_rel"] <= TOL, r["loss_rel"]
    assert r["state_rel"] <= TOL, r["state_rel"]


@pytest.mark.parametrize("change", ["z1_to_z2", "z2_to_z1"])
def test_zero_stage_change(suite, change):
    r = suite["results"][f"stage_change/{change}"]
    _ok(r)
    assert r["loaded_state_equal_file"]
    assert r["params_rel"] <= TOL and r["loss_rel"] <= TOL and r["state_rel"] <= TOL, r


# ------------------------------------------------------------------------------ bad checkpoints
MESSAGES = {
    "missing": ["file not found", "allow_fresh_state"],
    "old_format": ["format_version 0 is not supported"],
    "other_method": ["saved shaper ['gradient_stabilizer'] != configured ['spamp']"],
    "other_method_fresh": ["saved shaper ['gradient_stabilizer'] != configured ['spamp']"],
    "other_granularity": ["saved granularity 'tensor' != configured 'global'"],
    "other_layers": ["covers other layers", "layers.2"],
    "other_shape": ["zclip.buffer has shape (1, 2), expected (1, 3)"],
    "truncated": ["truncated or corrupt"],
    "bitflip": ["corrupt"],
    "garbage": ["truncated or corrupt"],
    "universal_without_state": ["ds_to_universal does not copy", "convert_to_universal"],
}


@pytest.mark.parametrize("name", list(P.BAD))
def test_bad_checkpoint(suite, name):
    r = suite["results"][f"bad/{name}"]
    assert "crash" not in r, r.get("crash")
    d, _, expected = P.BAD[name]
    if expected in ("fresh", "loaded"):
        assert "error" not in r, r["error"]
        assert r["loaded"] and r["last_load"]["fresh"] == (expected == "fresh")
        if name.startswith("missing") or name.startswith("old_format"):
            assert any("STARTING THE SHAPER FRESH" in w for w in r["warnings"]), r["warnings"]
            assert r["steps"] == 0
        if name == "missing_fresh_config":
            assert r["trained_to"] == P.N + 2
        if name == "module_only":
            assert any("without optimizer states" in w for w in r["warnings"]), r["warnings"]
        if name == "hparam_changed":
            assert any("beta1" in w and "0.6" in w and "0.5" in w for w in r["warnings"]), r["warnings"]
        if name in ("good", "hparam_changed"):
            assert r["steps"] == P.N
        return
    assert r.get("error_type") == expected, r
    if name == "no_such_tag":
        assert os.path.join(suite["root"], d, "global_step99") in r["error"], r["error"]
        return
    assert STATE_FILE in r["error"] and os.path.join(suite["root"], d) in r["error"], \
        f"the message does not name the file: {r['error']}"
    for m in MESSAGES.get(name, []):
        assert m in r["error"], f"{m!r} not in {r['error']!r}"


def test_loading_never_changes_the_checkpoints(suite):
    before, after = suite["hash_before"], suite["hash_after"]
    assert set(before) == set(after), sorted(set(before) ^ set(after))[:10]
    changed = [p for p in before if before[p] != after[p]]
    assert not changed, changed[:10]
    assert suite["u4_unchanged"]


# ------------------------------------------------------------------------------ faults
def test_latest_never_names_a_partial_save(suite):
    R = suite["results"]
    shaped, plain = R["latest_race/shaping"], R["latest_race/plain_deepspeed"]
    _ok(shaped)
    _ok(plain)
    assert shaped["latest_while_rank1_writing"] == "global_step2", shaped
    assert shaped["latest_after_save"] == "global_step4"
    # DeepSpeed 0.19.8 alone: rank 0 names the new tag while rank 1 is still writing.
    assert plain["latest_while_rank1_writing"] == "global_step4", plain


def test_fault_drill_kill_mid_save_then_mid_training(suite):
    f = suite["fault"]
    # run 1: saved step 2, killed while rank 1 wrote its ZeRO shard of step 4
    assert f["after_run1"]["latest"] == "global_step2", f
    assert "global_step4" in f["after_run1"]["tags"] and "global_step4" not in f["after_run1"]["with_state"]
    # run 2: resumed from step 2, saved step 4 again (completely), killed in step 5
    assert f["after_run2"]["latest"] == "global_step4", f
    assert "global_step4" in f["after_run2"]["with_state"] and "global_step6" not in f["after_run2"]["tags"]
    # run 3: resumes from step 4 and finishes, bit-identical to the uninterrupted run
    r = suite["results"]["fault/run3"]
    _ok(r)
    assert r["start"] == 4 and r["global_steps"] == 8
    assert r["losses_equal"] and r["params_equal"] and r["state_equal"], r


# ------------------------------------------------------------------------------ non-finite, fuzz
@pytest.mark.parametrize("case", ["z1/fp32", "z2/fp32", "z3/fp32", "z1/bf16", "z2/bf16"])
def test_nonfinite_steps_are_skipped_and_counted(suite, case):
    r = suite["results"][f"nonfinite/{case}"]
    _ok(r)
    assert r["skipped_steps"] == 2 and r["session_skipped"] == 2 and r["session_steps"] == 4
    assert r["global_steps"] == 6
    assert r["states_untouched"] and r["params_untouched"], r
    assert r["params_finite"] and r["state_finite"] and r["moved_after_skip"]


def test_nonfinite_error_mode_raises(suite):
    r = suite["results"]["nonfinite/error"]
    assert r.get("error_type") == "FloatingPointError", r
    assert "non-finite gradient" in r["error"] and r["at_step"] == 2


@pytest.mark.parametrize("sh", list(P.SHAPERS))
def test_fuzzed_gradients_through_deepspeed(suite, sh):
    r = suite["results"][f"fuzz/{sh}"]
    _ok(r)
    assert r["state_always_finite"] and r["params_finite"]
    assert r["skipped"] == 2 and r["steps"] == 7 and r["global_steps"] == 9, r
