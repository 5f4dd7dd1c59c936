"""Which jobs each ``deepspeed`` launch of the checkpoint suite runs (see ckpt_worker.py).

Launch order (a launch costs far more than a job, so there are four):

1. world 2: references and saves for exact resume (every shaper x ZeRO 1-3, two at ZeRO 0),
   universal sources, a checkpoint made without shaping, non-finite and fuzz runs, the ``latest`` race, LLaMA
   PP2/TP2 saves, and last the fault drill's first run, killed in the middle of a save;
   then (pytest) universal conversion and hand-made bad checkpoints;
2. world 4: resumes 2 -> 4 through universal checkpoints; saves for 4 -> 2;
   then (pytest) universal conversion of those;
3. world 2: exact resumes, 4 -> 2, ZeRO-stage changes, bad checkpoints, PP2/TP2 resumes, and
   last the fault drill's second run, killed in the middle of training;
4. world 2: the fault drill's third run, which finishes.
"""
import os

from tests.shaper_specs import registered_specs

#: Every registered method (registry order), with params that make it act within N steps.
SHAPERS = registered_specs()
GS = SHAPERS["gradient_stabilizer"]
N, M = 3, 3                       # save after N steps, resume for M more
EXACT_STAGES = (1, 2, 3)
PURE_REFERENCE = ("gradient_stabilizer", "zclip")
#: ZeRO-3 universal checkpoints: DeepSpeed 0.19.8 restores the optimizer state wrongly when a
#: rank holds several sub-groups (seen without shaping too), so universal runs use one.
ONE_SUBGROUP = 10 ** 9
UNIVERSAL = {  # name -> (shaper, stage) of the universal sources, both directions
    "gs_z1": ("gradient_stabilizer", 1), "gs_z2": ("gradient_stabilizer", 2), "gs_z3": ("gradient_stabilizer", 3),
    "zclip_z2": ("zclip", 2),
}
#: universal resumes: (source, target stage); z1 <-> z2 is a ZeRO-stage change. DeepSpeed
#: 0.19.8 cannot load a stage-1/2 universal checkpoint into stage 3 or the reverse.
UNIVERSAL_RESUMES = [("gs_z1", 1), ("gs_z2", 2), ("gs_z3", 3), ("gs_z1", 2), ("gs_z2", 1), ("zclip_z2", 2)]
NONFINITE = {"2": float("nan"), "4": float("inf")}
FUZZ = {"1": 0.0, "2": 1e-40, "3": 1e30, "4": float("nan"), "5": float("inf"), "6": -1e30, "7": 1e-30}
FAULT = dict(shaping=GS, stage=2, every=2, steps=8)


def exact_name(sh, st):
    return f"exact/{sh}_z{st}"


def exact_cases():
    for sh in SHAPERS:
        for st in EXACT_STAGES:
            yield sh, st
    yield "gradient_stabilizer", 0
    yield "zclip", 0


def _exact(root, sh, st, **extra):
    name = exact_name(sh, st)
    return dict(name=name, shaping=SHAPERS[sh], stage=st, n=N, m=M, dir=os.path.join(root, name),
                ref=os.path.join(root, "refs", name.replace("/", "_")), **extra)


def plan_1(root):
    jobs = []
    for sh, st in exact_cases():
        j = _exact(root, sh, st)
        if sh in PURE_REFERENCE:
            # A run that never saves, to show that saving changes nothing; the other cases
            # compare with the saving run's own uninterrupted continuation.
            jobs.append(dict(j, kind="reference", name=j["name"] + "/pure", ref=j["ref"] + "_pure"))
            j["pure_ref"] = j["ref"] + "_pure"
        jobs.append(dict(j, kind="save", name=j["name"] + "/save"))
    skip = _exact(root, "gradient_stabilizer", 2, factors={"1": float("nan")})
    skip.update(name="exact/skip_before_save", ref=skip["ref"] + "_skip", dir=os.path.join(root, "exact/skip"))
    jobs.append(dict(skip, kind="save", name=skip["name"] + "/save"))
    for sh in ("gradient_stabilizer", "zclip"):
        jobs.append(dict(kind="torch_ref", name=f"torch_ref/{sh}", shaping=SHAPERS[sh], n=N, m=M,
                         ref=os.path.join(root, "refs", f"torch_{sh}")))
    for u, (sh, st) in UNIVERSAL.items():
        jobs.append(dict(kind="save", name=f"u2/{u}", shaping=SHAPERS[sh], stage=st, n=N,
                         sub_group_size=ONE_SUBGROUP, dir=os.path.join(root, "u2", u)))
    jobs.append(dict(kind="save", name="plain_z2", shaping=None, stage=2, n=N, dir=os.path.join(root, "plain_z2")))
    for st, dt in ((1, "fp32"), (2, "fp32"), (3, "fp32"), (1, "bf16"), (2, "bf16")):
        jobs.append(dict(kind="nonfinite", name=f"nonfinite/z{st}/{dt}", shaping=GS, stage=st, dtype=dt, steps=6,
                         factors=NONFINITE))
    jobs.append(dict(kind="nonfinite", name="nonfinite/error", shaping=dict(GS, nonfinite="error"), stage=2,
                     steps=6, factors=NONFINITE))
    for sh in SHAPERS:
        jobs.append(dict(kind="fuzz", name=f"fuzz/{sh}", shaping=SHAPERS[sh], stage=2, steps=9, factors=FUZZ))
    for shaped in (True, False):
        # Rank 1 waits until latest names the new tag: with shaping it never does (the wait
        # runs out), plain DeepSpeed writes it within a second or so.
        jobs.append(dict(kind="latest_race", name=f"latest_race/{'shaping' if shaped else 'plain_deepspeed'}",
                         shaping=GS if shaped else None, stage=2, wait=3.0 if shaped else 20.0,
                         dir=os.path.join(root, "race", "shaping" if shaped else "plain")))
    for lay, kw in (("pp2", {"pp": 2}), ("tp2", {"tp": 2})):
        j = dict(model="llama", shaping=GS, n=2, m=2, ref=os.path.join(root, "refs", lay),
                 dir=os.path.join(root, "llama", lay), name=f"llama/{lay}", **kw)
        jobs.append(dict(j, kind="save", name=j["name"] + "/save"))
    # The fault drill: an uninterrupted reference, then run 1 dies while saving step 4.
    fault = dict(FAULT, dir=os.path.join(root, "fault", "run"), ref=os.path.join(root, "refs", "fault"))
    jobs.append(dict(fault, kind="reference", name="fault/ref", n=FAULT["steps"], m=0))
    jobs.append(dict(fault, kind="train_save", name="fault/run1", kill={"rank": 1, "step": 4, "when": "save"}))
    return jobs


def plan_2(root):
    jobs = []
    for src, st in UNIVERSAL_RESUMES:
        sh = UNIVERSAL[src][0]
        jobs.append(dict(kind="resume", name=f"u2to4/{src}_to_z{st}", shaping=SHAPERS[sh], stage=st, universal=True,
                         sub_group_size=ONE_SUBGROUP, n=N, m=M, dir=os.path.join(root, "u2", src),
                         ref=os.path.join(root, "refs", f"torch_{sh}")))
    for u, (sh, st) in UNIVERSAL.items():
        jobs.append(dict(kind="save", name=f"u4/{u}", shaping=SHAPERS[sh], stage=st, n=N,
                         sub_group_size=ONE_SUBGROUP, dir=os.path.join(root, "u4", u)))
    return jobs


BAD = {
    # name: (checkpoint dir under root, job overrides, expected outcome)
    "missing": ("plain_z2", {}, "ShaperStateMissing"),
    "missing_fresh_config": ("plain_z2", {"shaping": dict(GS, allow_fresh_state=True), "then_train": True}, "fresh"),
    "missing_fresh_arg": ("plain_z2", {"allow_fresh_arg": True}, "fresh"),
    "old_format": ("bad/old_format", {}, "ShaperStateMissing"),
    "old_format_fresh": ("bad/old_format", {"allow_fresh_arg": True}, "fresh"),
    "other_method": ("exact/gradient_stabilizer_z2", {"shaping": SHAPERS["spamp"]}, "ShaperStateMismatch"),
    "other_method_fresh": ("exact/gradient_stabilizer_z2", {"shaping": SHAPERS["spamp"], "allow_fresh_arg": True},
                           "ShaperStateMismatch"),
    "other_granularity": ("exact/gradient_stabilizer_z2", {"shaping": dict(GS, granularity="global")},
                          "ShaperStateMismatch"),
    "other_layers": ("exact/gradient_stabilizer_z2", {"extra_layer": True}, "ShaperStateMismatch"),
    "other_shape": ("exact/zclip_z2", {"shaping": {"type": "zclip", "params": dict(
        SHAPERS["zclip"]["params"], warmup_steps=3)}}, "ShaperStateMismatch"),
    "truncated": ("bad/truncated", {}, "ShaperStateCorrupt"),
    "bitflip": ("bad/bitflip", {}, "ShaperStateCorrupt"),
    "garbage": ("bad/garbage", {}, "ShaperStateCorrupt"),
    "universal_without_state": ("bad/plain_universal", {"universal": True, "sub_group_size": ONE_SUBGROUP},
                                "ShaperStateMissing"),
    "hparam_changed": ("exact/gradient_stabilizer_z2", {"shaping": {"type": "gradient_stabilizer",
                                                                   "params": {"beta1": 0.5}}}, "loaded"),
    "module_only": ("exact/gradient_stabilizer_z2", {"load_kwargs": {"load_module_only": True}}, "fresh"),
    "no_such_tag": ("exact/gradient_stabilizer_z2", {"tag": "global_step99"}, "FileNotFoundError"),
    "good": ("exact/gradient_stabilizer_z2", {}, "loaded"),
}


def plan_3(root):
    jobs = []
    for sh, st in exact_cases():
        jobs.append(dict(_exact(root, sh, st), kind="resume"))
    skip = _exact(root, "gradient_stabilizer", 2, factors={"1": float("nan")})
    jobs.append(dict(skip, kind="resume", name="exact/skip_before_save", ref=skip["ref"] + "_skip",
                     dir=os.path.join(root, "exact/skip")))
    jobs.append(dict(_exact(root, "gradient_stabilizer", 2), kind="resume", name="exact/negative_control",
                     negative_control=True))
    for src, st in UNIVERSAL_RESUMES:
        sh = UNIVERSAL[src][0]
        jobs.append(dict(kind="resume", name=f"u4to2/{src}_to_z{st}", shaping=SHAPERS[sh], stage=st, universal=True,
                         sub_group_size=ONE_SUBGROUP, n=N, m=M, dir=os.path.join(root, "u4", src),
                         ref=os.path.join(root, "refs", f"torch_{sh}")))
    # ZeRO-stage change without conversion: stage 1 and 2 share DeepSpeed's checkpoint format.
    for a, b in ((1, 2), (2, 1)):
        j = _exact(root, "gradient_stabilizer", a)
        jobs.append(dict(j, kind="resume", name=f"stage_change/z{a}_to_z{b}", stage=b))
    for name, (d, over, _) in BAD.items():
        j = dict(kind="load_error", name=f"bad/{name}", shaping=GS, stage=2, dir=os.path.join(root, d))
        j.update(over)
        jobs.append(j)
    for lay, kw in (("pp2", {"pp": 2}), ("tp2", {"tp": 2})):
        jobs.append(dict(model="llama", shaping=GS, n=2, m=2, ref=os.path.join(root, "refs", lay),
                         dir=os.path.join(root, "llama", lay), name=f"llama/{lay}", kind="resume", **kw))
    fault = dict(FAULT, dir=os.path.join(root, "fault", "run"))
    jobs.append(dict(fault, kind="train_save", name="fault/run2", kill={"rank": 0, "step": 5, "when": "train"}))
    return jobs


def plan_4(root):
    fault = dict(FAULT, dir=os.path.join(root, "fault", "run"), ref=os.path.join(root, "refs", "fault"))
    return [dict(fault, kind="train_save", name="fault/run3")]
