"""The equivalence matrix: which DeepSpeed runs are compared with the unsharded reference.

Hyperparameters are chosen so that every method changes the gradient strongly within a few
steps of the small test model (short warmups, small thresholds): each cell must show a shaping
effect on DeepSpeed's buffers of at least 10x its tight tolerance (test_deepspeed_equivalence.py),
in bf16 too, where a method that barely acts would be lost in one rounding (the table is
tests/shaper_specs.py, shared with the checkpoint suite).

``mutant_matrix()`` lists the mutation controls (mutants.py): each broken variant of the sharded
path, in fp32 and bf16 over ZeRO 0-3 (fp16 for the loss-scale mutants, also with CPU offload),
inside the domain where it can change a result; at world 4 the rank-level mutants again in fp32.
"""
from tests.shaper_specs import registered_specs

#: Every registered method (params that make it act strongly within STEPS steps: tests/shaper_specs.py),
#: then other modes, a chain and block granularity.
SHAPERS = registered_specs()
SHAPERS.update({
    "spamp_raw": {"type": "spamp", "params": {"mode": "raw", "threshold_from": "current"}},
    "chain_agc_clip": {"type": "chain", "shapers": [SHAPERS["agc"], SHAPERS["norm_clip"]]},
    "block_gs": {"type": "gradient_stabilizer", "granularity": "block", "params": {}},
})
MATRIX_SHAPERS = list(SHAPERS)
#: 16-bit roundings of each gradient element on the way through the hook: a pure-scale plan or
#: an elementwise map rounds once; SPAMP's map and projection, and a chain of two plans, twice.
ROUNDINGS = {"spamp": 2, "spamp_raw": 2, "chain_agc_clip": 2}
STAGES = (0, 1, 2, 3)
DTYPES = ("fp32", "bf16", "fp16")
STEPS = 4


def matrix(world):
    out = []
    # 253 parameters: the last ZeRO partition is padded (DeepSpeed's unmarked tail pad).
    for st in (1, 2, 3):
        for dt in ("fp32", "bf16"):
            for buckets in ("small", "default"):
                out.append({"name": f"gradient_stabilizer/z{st}/{dt}/odd_size/{buckets}_buckets",
                            "shaper": "gradient_stabilizer", "stage": st, "dtype": dt, "steps": STEPS,
                            "hidden": [11, 5], "default_buckets": buckets == "default",
                            "shaping": SHAPERS["gradient_stabilizer"]})
    for sh in MATRIX_SHAPERS:
        for st in STAGES:
            for dt in DTYPES:
                out.append({"name": f"{sh}/z{st}/{dt}", "shaper": sh, "stage": st, "dtype": dt, "steps": STEPS,
                            "shaping": SHAPERS[sh]})
    if world == 2:
        out += extras() + mutant_matrix()
    elif world == 4:
        out += mutant_matrix(world)
    return out


def extras():
    gs = SHAPERS["gradient_stabilizer"]
    out = []
    for sh in ("gradient_stabilizer", "spamp", "agc", "zclip"):
        for st in (1, 2, 3):
            out.append({"name": f"{sh}/z{st}/fp32/offload", "shaper": sh, "stage": st, "dtype": "fp32",
                        "offload": True, "steps": STEPS, "shaping": SHAPERS[sh]})
    # 16-bit with CPU offload: the hook shapes DeepSpeed's fp32 gradient buffer on the host (ZeRO
    # 1/2) or the fp32 partitions' gradients (ZeRO-3), where the fp16 loss scale is still in them.
    for sh in ("gradient_stabilizer", "spamp", "value_clip"):
        for st in (1, 2, 3):
            for dt in ("bf16", "fp16"):
                out.append({"name": f"{sh}/z{st}/{dt}/offload", "shaper": sh, "stage": st, "dtype": dt,
                            "offload": True, "steps": STEPS, "shaping": SHAPERS[sh]})
    for st in (1, 2, 3):
        out.append({"name": f"gradient_stabilizer/z{st}/fp16/offload/overflow", "shaper": "gradient_stabilizer",
                    "stage": st, "dtype": "fp16", "offload": True, "steps": 5, "spike": {"2": 1e39},
                    "shaping": gs, "trap": "overflow"})
        out.append({"name": f"gradient_stabilizer/z{st}/fp16/offload/growth", "shaper": "gradient_stabilizer",
                    "stage": st, "dtype": "fp16", "offload": True, "scale_window": 1, "steps": 5, "shaping": gs,
                    "trap": "growth"})
    for st in STAGES:
        out.append({"name": f"gradient_stabilizer/z{st}/fp32/gas2", "shaper": "gradient_stabilizer", "stage": st,
                    "dtype": "fp32", "gas": 2, "steps": STEPS, "shaping": gs})
        out.append({"name": f"spamp/z{st}/bf16/gas2", "shaper": "spamp", "stage": st, "dtype": "bf16", "gas": 2,
                    "steps": STEPS, "shaping": SHAPERS["spamp"]})
    # round_robin: DeepSpeed 0.19.8's safe_get_full_grad reads the wrong piece of a round-robin
    # partition (size mismatch), so these cells run the whole-training check only.
    for st in (1, 2):
        out.append({"name": f"gradient_stabilizer/z{st}/fp32/round_robin", "shaper": "gradient_stabilizer",
                    "stage": st, "dtype": "fp32", "round_robin": True, "gas": 2, "steps": STEPS, "shaping": gs,
                    "tight": False})
    # bf16 + ZeRO-1 + fp32 gradient accumulation builds BF16_Optimizer (replicated fp32 grads).
    for sh in ("gradient_stabilizer", "spamp", "agc", "zclip", "value_clip"):
        for gas in (1, 2):
            out.append({"name": f"{sh}/z1/bf16/bf16_optimizer/gas{gas}", "shaper": sh, "stage": 1, "dtype": "bf16",
                        "grad_accum_fp32": True, "gas": gas, "steps": STEPS, "shaping": SHAPERS[sh],
                        "path": "bf16"})
    out.append({"name": "gradient_stabilizer/z1/bf16/bf16_optimizer/overflow", "shaper": "gradient_stabilizer",
                "stage": 1, "dtype": "bf16", "grad_accum_fp32": True, "steps": 5, "spike": {"2": 1e39},
                "shaping": SHAPERS["gradient_stabilizer"], "trap": "overflow", "path": "bf16"})
    # DeepSpeed's own gradient_clipping applies after shaping: reference is chain(shaper, global clip).
    for st in STAGES:
        out.append({"name": f"gradient_stabilizer/z{st}/fp32/ds_clip", "shaper": "gradient_stabilizer", "stage": st,
                    "dtype": "fp32", "clip": 0.3, "steps": STEPS, "shaping": gs})
    out.append({"name": "gradient_stabilizer/z2/fp32/offload/ds_clip", "shaper": "gradient_stabilizer", "stage": 2,
                "dtype": "fp32", "clip": 0.3, "offload": True, "steps": STEPS, "shaping": gs})
    out.append({"name": "gradient_stabilizer/z3/fp32/offload/ds_clip", "shaper": "gradient_stabilizer", "stage": 3,
                "dtype": "fp32", "clip": 0.3, "offload": True, "steps": STEPS, "shaping": gs})
    # fp16 loss scale grows every step (scale_window 1): ZeRO 1/2/3 would unscale with the new scale.
    for st in STAGES:
        out.append({"name": f"gradient_stabilizer/z{st}/fp16/growth", "shaper": "gradient_stabilizer", "stage": st,
                    "dtype": "fp16", "scale_window": 1, "steps": 5, "shaping": gs, "trap": "growth"})
    for st in (0, 2, 3):
        out.append({"name": f"gradient_stabilizer/z{st}/fp16/growth/no_fix", "shaper": "gradient_stabilizer",
                    "stage": st, "dtype": "fp16", "scale_window": 1, "steps": 5, "shaping": gs,
                    "disable_unscale_fix": True, "trap": "control"})
    # A step with non-finite gradients (a 1e39 target overflows fp32 too): skipped everywhere.
    for sh in ("gradient_stabilizer", "spamp", "zclip"):
        for st in STAGES:
            for dt in DTYPES:
                out.append({"name": f"{sh}/z{st}/{dt}/overflow", "shaper": sh, "stage": st, "dtype": dt, "steps": 5,
                            "spike": {"2": 1e39}, "shaping": SHAPERS[sh], "trap": "overflow"})
    return out


# ------------------------------------------------------------------------------ mutation controls
#: mutant -> (method, [(dtype, stage, extra scenario keys)]): a representative method per mutant
#: (GradientStabilizer rescales every tensor every step, so a wrong statistic or a skipped
#: application shows everywhere; the map mutant needs an elementwise method: value_clip).
def _mutant_cells():
    both = [(dt, st, {}) for dt in ("fp32", "bf16") for st in STAGES]
    fp16_scaled = [("fp16", st, {}) for st in (1, 2, 3)] + [("fp16", st, {"offload": True}) for st in (2, 3)]
    return {
        "local_stats": ("gradient_stabilizer", both),
        "replicas_counted": ("gradient_stabilizer", [("fp32", 0, {}), ("bf16", 0, {}),
                                                     ("bf16", 1, {"grad_accum_fp32": True, "path": "bf16"})]),
        "rank_skips_apply": ("gradient_stabilizer", both),
        "loss_scale_not_divided": ("gradient_stabilizer", fp16_scaled),
        "map_on_scaled": ("value_clip", fp16_scaled),
    }


#: the rank-level mutants also run at world 4 (one rank's share of four dropped or left unshaped)
WORLD4_MUTANTS = ("local_stats", "rank_skips_apply")


def mutant_matrix(world=2):
    """Mutation controls (each needs more than one rank): all at world 2, ``WORLD4_MUTANTS``
    in fp32 at world 4."""
    out = []
    for mutant, (sh, cells) in _mutant_cells().items():
        if world != 2:
            if mutant not in WORLD4_MUTANTS:
                continue
            cells = [c for c in cells if c[0] == "fp32"]
        for dt, st, extra in cells:
            tag = "/bf16_optimizer" if extra.get("grad_accum_fp32") else "/offload" if extra.get("offload") else ""
            out.append(dict({"name": f"mutant:{mutant}/{sh}/z{st}/{dt}{tag}", "shaper": sh, "stage": st, "dtype": dt,
                             "steps": STEPS, "shaping": SHAPERS[sh], "mutant": mutant}, **extra))
    return out
