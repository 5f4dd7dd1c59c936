"""The core promise: DeepSpeed-sharded shaping equals the single-process, unsharded reference.

For every shaper x ZeRO stage {0,1,2,3} x precision {fp32, bf16, fp16} x data-parallel world
{1, 2, 4} (plus CPU offload, gradient accumulation, round-robin gradients, DeepSpeed's own
clipping, loss-scale growth and overflow steps at world 2), the DeepSpeed run's per-layer
statistics, shaping factors, shaper state and final parameters are compared with
``GradientShaper`` on the whole batch in one process (see ds_worker.py). One ``deepspeed``
launch per world size runs all its scenarios.

Tolerances. fp32: relative 1e-5 (the issue's contract; observed ~1e-16, ~1e-7 with gradient
accumulation, which sums micro-batches in another order). bf16 and fp16: the DeepSpeed model
computes forward and backward in 16-bit while the reference is fp32, so gradients differ by
rounding, not by sharding. bf16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3); a norm
over a few hundred elements of gradients that went through a couple of rounded layers is off
by a few units of roundoff: observed <= 1.4e-2, tolerance 6e-2 (~30 roundoffs). fp16 keeps 11
bits (2^-12 = 2.4e-4): observed <= 2.3e-3, tolerance 1.5e-2. Threshold methods (zclip, agc,
value_clip, spamp's projection) can switch on a 16-bit rounding near their threshold, so in
16-bit only statistics and state are compared strictly and parameters with the same bound.
"""
import json
import os

import pytest

from . import scenarios as S
from .launch import run_deepspeed

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "ds_worker.py")
TOL = {"fp32": 1e-5, "bf16": 6e-2, "fp16": 1.5e-2}
_cache = {}


def run_world(world, tmp_root):
    if world in _cache:
        return _cache[world]
    sc_path = os.path.join(tmp_root, f"scenarios_{world}.json")
    out_path = os.path.join(tmp_root, f"results_{world}.jsonl")
    with open(sc_path, "w") as f:
        json.dump(S.matrix(world), f)
    run_deepspeed(world, WORKER, "--scenarios", sc_path, "--out", out_path, "--fake-fp16")
    with open(out_path) as f:
        _cache[world] = {r["name"]: r for r in map(json.loads, f)}
    return _cache[world]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ds_equivalence"))


def _cases():
    for world in (1, 2, 4):
        for sc in S.matrix(world):
            yield pytest.param(world, sc, id=f"w{world}:{sc['name']}")


def _expected_collectives(sc):
    spec = sc["shaping"]
    members = spec["shapers"] if spec["type"] == "chain" else [spec]
    # one reduction per statistics pass: one for the first statistics, one more after an
    # elementwise map (SPAMP, value_clip, entrywise_shrink) for the post-map norms.
    elementwise = {"spamp", "value_clip", "entrywise_shrink"}
    return 1 + sum(1 for m in members if m["type"] in elementwise)


@pytest.mark.parametrize("world,sc", list(_cases()))
def test_sharded_equals_unsharded(world, sc, tmp_root):
    r = run_world(world, tmp_root)[sc["name"]]
    assert "error" not in r, r.get("trace", r.get("error"))
    if "path" in sc:
        assert r["path"] == sc["path"], f"DeepSpeed built the {r['path']} path, expected {sc['path']}"
    tol = TOL[sc["dtype"]]
    trap = sc.get("trap")
    if trap == "control":
        # Without our unscale fix, DeepSpeed's step uses the wrong loss scale on growth steps
        # (ZeRO 1/2/3: the post-growth scale; ZeRO-0 fp16: a scale backward never applied).
        assert r["params"] > 10 * tol, f"negative control did not see the trap: {r['params']}"
        return
    assert r["skipped"] == r["ref_skipped"], (r["skipped"], r["ref_skipped"])
    assert r["stats"] <= tol, f"per-layer statistics differ: {r['stats']}"
    # zclip's variance is the squared spread of a few norms: 16-bit rounding of the norms is
    # amplified by mean/std there, hence 3x the bound for state in 16-bit.
    state_tol = tol if sc["dtype"] == "fp32" else 3 * tol
    assert r["state_equal"] <= state_tol, f"shaper state differs: {r['state_equal']}"
    if sc["dtype"] == "fp32" and not sc.get("clip"):
        # (with DeepSpeed's clip, our record covers shaping only and DeepSpeed clips after it;
        # the reference's chain factor includes the clip, so only parameters are comparable)
        assert r["factor"] <= tol, f"shaping factors differ: {r['factor']}"
    assert r["params"] <= tol, f"parameters after {sc['steps']} steps differ: {r['params']}"
    assert r["active"] > 1e-3, "the shaper never changed the gradient: the comparison would prove nothing"
    if trap == "overflow":
        assert r["skipped"] == [2] and r["skipped_steps"] == 1
    if trap == "growth":
        scales = r["loss_scales"]
        assert len(set(scales)) > 1 or sc["stage"] == 0, f"loss scale never grew: {scales}"
    # One all-reduce per statistics pass: never more than the method's passes, a skipped step
    # stops after the first, and one process needs none.
    for i, c in enumerate(r["collectives_per_step"]):
        if world == 1:
            assert c == 0, r["collectives_per_step"]
        else:
            assert 1 <= c <= (1 if i in r["skipped"] else _expected_collectives(sc)), r["collectives_per_step"]
