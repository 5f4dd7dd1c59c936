"""One norm, not two: DeepSpeed's global-norm pass replaced by the shaping statistics.

One ``deepspeed`` launch (2 processes) runs every scenario twice on the same model and batches:
with DeepSpeed computing its own global norm (``adapter.replace_norm = False``) and with the
norm taken from the hook's statistics. Compared per step, on every rank: ``engine.get_global_grad_norm()``
(DeepSpeed's report: the norm *after* shaping, loss-scale-free) and, at the end, the parameters
(DeepSpeed's ``gradient_clipping`` clips with the replaced norm where it is set). The worker also
counts calls of DeepSpeed's own norm functions: none with the replacement, one per step without.

Power: the norm before shaping (``norm_clip`` at 0.05 and SPAMP's projection shrink the gradient
well below it) is what a replacement taken at the wrong point would report; it differs from
DeepSpeed's number by far more than the tolerance, as do parameters from their start.
Tolerances: fp32 1e-6 (float64 statistics vs DeepSpeed's fp32 sums); 16-bit 1e-3 on norms (the
same gradients; DeepSpeed's norm adds the fp32 per-tensor norms in another order) and on
parameters, which move by ~1e-2.
"""
import os

import pytest

from tests.distributed.launch import launch_scenarios, read_results

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "ds_norm_worker.py")
CLIP = {"type": "norm_clip", "params": {"max_norm": 0.05}}
SPAMP = {"type": "spamp", "params": {"alpha_min": 0.7, "threshold_from": "current"}}
TOL = {"fp32": 1e-6, "bf16": 1e-3, "fp16": 1e-3}


def _scenarios():
    out = []

    def add(name, stage, dtype, shaping=CLIP, **kw):
        out.append(dict(name=name, stage=stage, dtype=dtype, shaping=shaping, steps=4, **kw))

    add("z0/fp32/ds_clip", 0, "fp32", clip=0.3)           # above the shaped norm: DeepSpeed does not clip
    add("z0/fp32/ds_clip_acts", 0, "fp32", clip=0.03)     # below it: clipping by the replaced norm
    add("z0/fp16", 0, "fp16")
    add("z0/bf16/ds_clip", 0, "bf16", clip=0.03)
    for st in (1, 2, 3):
        add(f"z{st}/fp32", st, "fp32")
        add(f"z{st}/fp32/ds_clip", st, "fp32", clip=0.03)
        add(f"z{st}/bf16", st, "bf16")
        add(f"z{st}/fp16/ds_clip", st, "fp16", clip=0.03)
        add(f"z{st}/fp32/offload/ds_clip", st, "fp32", clip=0.03, offload=True)
    add("z2/fp32/spamp", 2, "fp32", shaping=SPAMP)
    add("z3/bf16/spamp", 3, "bf16", shaping=SPAMP)
    add("z1/bf16/bf16_optimizer/ds_clip", 1, "bf16", clip=0.03, grad_accum_fp32=True)
    # Ulysses sequence parallelism over both ranks (data-parallel size 1): the replicated paths
    # hold the whole gradient on every sequence-parallel peer, counted once
    add("z0/fp32/sp2/ds_clip", 0, "fp32", clip=0.03, mpu="sp")
    add("z0/bf16/sp2/ds_clip", 0, "bf16", clip=0.03, mpu="sp")
    add("z2/fp32/sp2/ds_clip", 2, "fp32", clip=0.03, mpu="sp")
    # ZeRO-3 partitions made by zero.Init over all ranks, then TP 2 over both ranks (AutoTP's
    # order): every TP peer holds a distinct partition of each replicated parameter
    add("z3/fp32/tp2_zero_init/ds_clip", 3, "fp32", clip=0.03, mpu="tp", zero_init_all=True)
    return out


SCENARIOS = _scenarios()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return read_results(launch_scenarios(2, WORKER, SCENARIOS, tmp_path_factory.mktemp("ds_norm")))


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s["name"] for s in SCENARIOS])
def test_replaced_norm_equals_deepspeeds(sc, results):
    r = results[sc["name"]]
    ranks, world = r["ranks"], r.get("world", 2)     # this suite launches 2; tools/gpu_check.sh 1..N
    assert len(ranks) == world, f"results from {len(ranks)} of {world} ranks"
    for r in ranks:
        assert "error" not in r, r.get("trace", r.get("error"))
        _check_rank(sc, r)


def _check_rank(sc, r):
    tol = TOL[sc["dtype"]]
    steps = sc["steps"]
    # DeepSpeed's own norm functions never ran with the replacement, once per step without.
    assert r["replaced"] == steps and r["calls_ours"] == 0, (r["replaced"], r["calls_ours"])
    assert r["replaced_off"] == 0 and r["calls_ds"] >= steps, (r["replaced_off"], r["calls_ds"])
    if r["path"] == "plain":
        # ZeRO-0 fp32 with a torch optimizer reports no global norm either way; it clips.
        assert r["norm_ds"] == r["norm_ours"] == [None] * steps
    else:
        for a, b in zip(r["norm_ours"], r["norm_ds"]):
            assert _rel(a, b) <= tol, (r["norm_ours"], r["norm_ds"])
        # the pre-shaping norm is what a misplaced replacement would report: far outside
        # (SPAMP leaves its first step alone: the later ones show it)
        assert max(_rel(x, b) for x, b in zip(r["norm_before"], r["norm_ds"])) > 100 * tol, r["norm_before"]
    assert r["params"] <= tol, r["params"]
    assert r["moved"] > 100 * tol * 1e-2, r["moved"]
