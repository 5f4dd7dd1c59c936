"""The core promise: DeepSpeed-sharded shaping equals the single-process, unsharded reference.

For every shaper x ZeRO stage {0,1,2,3} x precision {fp32, bf16, fp16} x data-parallel world
{1, 2, 4} (plus CPU offload, gradient accumulation, round-robin gradients, DeepSpeed's own
clipping, BF16_Optimizer, loss-scale growth and overflow steps at world 2), two comparisons
with ``GradientShaper`` run on **every rank** (ds_worker.py); each assertion reports the worst
rank. One ``deepspeed`` launch per world size runs all its scenarios.

1. Tight, every step: the reference shapes the very gradient the hook shapes (captured at the
   hook boundary with DeepSpeed's ``safe_get_full_grad``, in its storage dtype, loss scale
   divided out), and the shaped gradient DeepSpeed hands to its optimizer (read from its fp32
   partitions inside the basic optimizer's step) must match element by element:

   * gradient: within ``grad_tol_ulps`` ulps of the storage dtype. Both sides round the same
     real product into the storage dtype; two correct roundings of one real differ by at most
     one ulp. The two reals are not quite the same: the statistics are sums over differently
     cut slices (their relative bound ``stats_tol`` below), so the factors may differ by
     FACTOR_AMP * stats_tol relatively, which moves a product by FACTOR_AMP * stats_tol *
     2^(p-1) ulps of a p-bit significand. A second rounding (SPAMP's projection after its map,
     a chain's second plan, DeepSpeed's clip) rounds a value already off by that much again; a
     factor <= 1 can move it into the binade below, where it counts twice: k roundings give at
     most (2^k - 1) (1 + drift) ulps.
   * statistics, factors, shaper state: relative ``stats_tol`` (:func:`tight_tols`), which
     depends on the statistics path every rank reports. With the CPU sum kernel (the default
     where a C compiler exists) each chunk's squares are exact in float64 and summed in
     float64: the test model has 280 elements, so a sum is off by at most 280 * 2^-53 = 3e-14
     and a ratio of two by 6e-14; KERNEL_STATS_RTOL = 1e-12 (tolerances.py; drift: 2e-5 ulp
     in fp32, i.e. one ulp per rounding). On the torch path (no compiler,
     ``MEGATRON_SHAPING_KERNELS=0``) fp32 partial sums of runs of <= 2048 entries are added in float64: each partial is off by at
     most about log2(2048) * 2^-24 = 6.6e-7 (PyTorch's cascade summation), and the sharded run
     cuts the runs elsewhere than the unsharded one: 1.3e-6 between the two, rounded up to
     TORCH_STATS_RTOL = 2e-6 (drift: 5e-4 ulp in bf16, 34 ulps in fp32). Shaper state: EMAs of
     statistics, within the same bound, except zclip's variance, an EMA of squared deviations
     (n - mean)^2 of a few norms: a relative error e of the norms becomes about 2 e n /
     |n - mean| there, amplified by mean/std (up to ~5 in these short runs), hence STATE_AMP =
     10 x stats_tol. Observed figures: ``test_report``.
   * power: the shaping effect on DeepSpeed's own buffers (the shaped gradient vs the gradient
     the hook received, in the same ulp units, the largest over steps and ranks) must be at
     least 10x the gradient tolerance, so a path that skipped shaping could not pass.
   * coverage: every gradient element reached the comparison once (sharded paths) or on every
     rank (ZeRO-0's replicas).

2. Whole training against the unsharded fp32 reference: the same model in one process on the
   whole batch in fp32; per-layer statistics, factors, shaper state and final parameters after
   the run, on every rank. fp32: relative 1e-5 (observed ~1e-7). bf16 and fp16: the DeepSpeed
   model computes forward and backward in 16-bit while the reference is fp32, so gradients
   differ by rounding, not by sharding: bf16 (8 significant bits, unit roundoff 2e-3) 6e-2,
   fp16 (2.4e-4) 1.5e-2; this check guards whole runs (skips, loss-scale handling, the update),
   the tight check above guards the shaping itself. Power (fp32 cells without a spike): the
   reference's parameters differ from those of the same run without shaping by at least 10x
   the tolerance (``whole_effect``), so a DeepSpeed run that never shaped could not pass.

Mutation controls (mutants.py, world 2; the rank-level ones at world 4 too): broken variants of
the sharded path must be reported by the same comparisons at least 10x outside their tolerance.
``test_report`` prints the table (and the smallest effect/tolerance ratio and the worst
differences) for README "Tests"; set ``DS_EQUIVALENCE_REPORT=path`` to also write it to a file.
"""
import os

import pytest

from . import scenarios as S
from .launch import launch_scenarios, read_results
from .tolerances import TORCH_STATS_RTOL, stats_rtol

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "ds_worker.py")
TOL = {"fp32": 1e-5, "bf16": 6e-2, "fp16": 1.5e-2}
STATE_AMP = 10               # zclip's variance amplifies the statistics' error (see above)
FACTOR_AMP = 2.0        # a factor is a ratio of two statistics (a norm over a threshold)
SIGNIFICAND = {"float32": 24, "bfloat16": 8, "float16": 11}
POWER = 10.0            # effect / tolerance, and mutant error / tolerance, at least
REPLICATED = ("plain", "fp16_optimizer")   # every DP rank's optimizer steps the whole gradient
WORLDS = (1, 2, 4)
_cache = {}


def grad_tol_ulps(grad_dtype: str, roundings: int, stats_tol: float = TORCH_STATS_RTOL) -> float:
    drift = FACTOR_AMP * stats_tol * 2.0 ** (SIGNIFICAND[grad_dtype] - 1)
    return (2 ** roundings - 1) * (1.0 + drift)


def tight_tols(ranks, sc) -> dict:
    """The tight check's tolerance of each compared quantity: the statistics' bound is the sum
    kernel's where every rank's statistics went through it (the workers report it), else the
    torch path's; the gradient's follows from it."""
    stats_tol = stats_rtol(all(x.get("kernels") for x in ranks))
    return {"tight_grad": grad_tol_ulps(ranks[0]["grad_dtype"], roundings(sc), stats_tol),
            "tight_stats": stats_tol, "tight_factor": stats_tol, "tight_state": STATE_AMP * stats_tol}


def roundings(sc) -> int:
    return S.ROUNDINGS.get(sc["shaper"], 1) + (1 if sc.get("clip") else 0)


#: DS_EQUIVALENCE_ONLY=<substring>: launch only the cells whose name contains it (while working
#: on a path; the other cells and test_report are skipped)
ONLY = os.environ.get("DS_EQUIVALENCE_ONLY", "")


def run_world(world, tmp_root):
    if world in _cache:
        return _cache[world]
    cells = [sc for sc in S.matrix(world) if ONLY in sc["name"]]
    if not cells:
        _cache[world] = {}
        return _cache[world]
    out = launch_scenarios(world, WORKER, cells, tmp_root, "--fake-fp16", label=f"_{world}")
    _cache[world] = read_results(out)
    return _cache[world]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ds_equivalence"))


def _cases(mutants):
    for world in WORLDS:
        for sc in S.matrix(world):
            if bool(sc.get("mutant")) == mutants:
                yield pytest.param(world, sc, id=f"w{world}:{sc['name']}")


def _expected_collectives(sc):
    spec = sc["shaping"]
    members = spec["shapers"] if spec["type"] == "chain" else [spec]
    # one reduction per statistics pass: one for the first statistics, one more after an
    # elementwise map (SPAMP, value_clip, entrywise_shrink) for the post-map norms, except a
    # first member's map known before the statistics (value_clip's clamp: Shaper.premap),
    # whose sums ride in the first reduction; not under an fp16 loss scale (second pass).
    elementwise = {"spamp", "value_clip", "entrywise_shrink"}
    premapped = members[0]["type"] == "value_clip" and sc["dtype"] != "fp16"
    return 1 + sum(1 for m in members if m["type"] in elementwise) - premapped


def _ranks(world, sc, tmp_root):
    if ONLY not in sc["name"]:
        pytest.skip(f"DS_EQUIVALENCE_ONLY={ONLY!r}")
    r = run_world(world, tmp_root)[sc["name"]]
    ranks = r["ranks"]
    assert len(ranks) == world, f"results from {len(ranks)} of {world} ranks"
    for x in ranks:
        assert "error" not in x, f"rank {x['rank']}: " + x.get("trace", x.get("error"))
    return ranks


def worst(ranks, key):
    """(value, rank) of the largest ``key`` over the ranks."""
    x = max(ranks, key=lambda x: x[key])
    return x[key], x["rank"]


def effect(ranks):
    """The shaping effect the tight comparison saw, on the rank that saw the least: each rank's
    own comparison must be able to tell shaped from unshaped (a maximum over ranks let one
    rank's power stand for all)."""
    return min((max(x["tight_effect"]) if x["tight_effect"] else 0.0) for x in ranks)


def whole_effect(ranks):
    """How far shaping moved the fp32 reference's parameters (vs the same run unshaped), on the
    rank that saw the least; None for a cell without that comparison (a spike)."""
    if ranks[0].get("whole_effect") is None:
        return None
    return min(x["whole_effect"] for x in ranks)


def tight_ratios(ranks, sc):
    """Each tight comparison's worst value over its tolerance: {name: (ratio, rank)}."""
    out = {}
    for key, tol in tight_tols(ranks, sc).items():
        v, rk = worst(ranks, key)
        out[key] = (v / tol, rk)
    return out


@pytest.mark.parametrize("world,sc", list(_cases(mutants=False)))
def test_sharded_equals_unsharded(world, sc, tmp_root):
    ranks = _ranks(world, sc, tmp_root)
    for x in ranks:
        if "path" in sc:
            assert x["path"] == sc["path"], f"DeepSpeed built the {x['path']} path, expected {sc['path']}"
    tol = TOL[sc["dtype"]]
    trap = sc.get("trap")
    if trap == "control":
        # Without our unscale fix, DeepSpeed's step uses the wrong loss scale on growth steps
        # (ZeRO 1/2/3: the post-growth scale; ZeRO-0 fp16: a scale backward never applied).
        # Both comparisons must see it.
        p, rk = worst(ranks, "params")
        assert p > POWER * tol, f"negative control not seen by the whole-training check: {p} (rank {rk})"
        ratio, rk = tight_ratios(ranks, sc)["tight_grad"]
        assert ratio > POWER, f"negative control not seen by the tight check: {ratio:.3g} x tol (rank {rk})"
        return
    tight = sc.get("tight", True)
    for x in ranks:
        assert x["skipped"] == x["ref_skipped"], (x["rank"], x["skipped"], x["ref_skipped"])
        if tight:
            assert x["tight_skipped"] == x["skipped"], (x["rank"], x["tight_skipped"], x["skipped"])

    # ---- 1. tight: the same gradient through the reference, every step, every rank
    if tight:
        tols = tight_tols(ranks, sc)
        gt = tols["tight_grad"]
        for key, t in tols.items():
            v, rk = worst(ranks, key)
            assert v <= t, f"{key} = {v:.3g} > {t:.3g} on rank {rk}"
        eff = effect(ranks)
        assert eff >= POWER * gt, (f"shaping effect {eff:.3g} ulps < {POWER:g} x tolerance {gt:.3g}: "
                                   "the comparison could not tell shaped from unshaped")
        expected = world if ranks[0]["path"] in REPLICATED else 1
        for x in ranks:
            assert x["coverage"] == [expected, expected], \
                f"rank {x['rank']}: gradient elements compared {x['coverage']} times, expected {expected}"
    else:
        a, rk = max((x["active"], x["rank"]) for x in ranks)
        assert a > 1e-3, "the shaper never changed the gradient: the comparison would prove nothing"

    # ---- 2. whole training against the fp32 reference, every rank
    v, rk = worst(ranks, "stats")
    assert v <= tol, f"per-layer statistics differ: {v} (rank {rk})"
    # zclip's variance is the squared spread of a few norms: 16-bit rounding of the norms is
    # amplified by mean/std there, hence 3x the bound for state in 16-bit.
    state_tol = tol if sc["dtype"] == "fp32" else 3 * tol
    v, rk = worst(ranks, "state_equal")
    assert v <= state_tol, f"shaper state differs: {v} (rank {rk})"
    if sc["dtype"] == "fp32" and not sc.get("clip"):
        # (with DeepSpeed's clip, our record covers shaping only and DeepSpeed clips after it;
        # the reference's chain factor includes the clip, so only parameters are comparable)
        v, rk = worst(ranks, "factor")
        assert v <= tol, f"shaping factors differ: {v} (rank {rk})"
    v, rk = worst(ranks, "params")
    assert v <= tol, f"parameters after {sc['steps']} steps differ: {v} (rank {rk})"
    e = whole_effect(ranks)
    if sc["dtype"] == "fp32" and e is not None:
        # the power of that comparison: shaping moves the reference's parameters far outside it
        assert e >= POWER * tol, f"shaping moves the parameters by {e:.3g} only: tolerance {tol}"
    for x in ranks:
        # DeepSpeed skipped exactly the steps the worker saw skipped (a later step skipped
        # silently, e.g. on a norm our guard handed over, would get no comparison at all)
        assert x["skipped_steps"] == len(x["skipped"]), (x["skipped_steps"], x["skipped"])
        if trap == "overflow":
            assert x["skipped"] == [2] and x["skipped_steps"] == 1
            # pure-scale shapers leave the decision to DeepSpeed's own check of the norm where
            # its step makes one (ZeRO 1-3 in fp32/bf16; fp16 keeps its loss scaler's overflow
            # path): every step, the skipped one too
            defers = sc["shaper"] != "spamp" and x["path"] in ("zero12", "zero3") and sc["dtype"] != "fp16"
            assert x["deferred_steps"] == (sc["steps"] if defers else 0), (sc["name"], x["deferred_steps"])
        if trap == "growth":
            scales = x["loss_scales"]
            assert len(set(scales)) > 1 or sc["stage"] == 0, f"loss scale never grew: {scales}"
        # One all-reduce per statistics pass: never more than the method's passes, a skipped step
        # stops after the first, and one process needs none.
        for i, c in enumerate(x["collectives_per_step"]):
            if world == 1:
                assert c == 0, x["collectives_per_step"]
            else:
                assert 1 <= c <= (1 if i in x["skipped"] else _expected_collectives(sc)), x["collectives_per_step"]


@pytest.mark.parametrize("world,sc", list(_cases(mutants=True)))
def test_mutant_is_caught(world, sc, tmp_root):
    """A broken sharded path must fail the tight comparisons by at least 10x their tolerance."""
    ranks = _ranks(world, sc, tmp_root)
    if "path" in sc:
        assert ranks[0]["path"] == sc["path"], f"DeepSpeed built the {ranks[0]['path']} path, expected {sc['path']}"
    ratios = tight_ratios(ranks, sc)
    key, (ratio, rk) = max(ratios.items(), key=lambda kv: kv[1][0])
    assert ratio >= POWER, f"mutant {sc['mutant']} not caught: worst comparison {key} at {ratio:.3g} x tolerance"


# ------------------------------------------------------------------------------ report
def _fmt(x):
    return "inf" if x == float("inf") else f"{x:.3g}"


def build_report(results):
    """Markdown for README "Tests" from {world: {name: result}}."""
    lines = []
    cells = [(w, sc) for w in WORLDS for sc in S.matrix(w)
             if not sc.get("mutant") and sc.get("trap") != "control" and sc.get("tight", True)]
    ratios, whole = [], []
    worst_grad, worst_stats, worst_params = {}, {}, {}
    for w, sc in cells:
        ranks = results[w][sc["name"]]["ranks"]
        if any("error" in x for x in ranks):
            continue
        gt = tight_tols(ranks, sc)["tight_grad"]
        ratios.append((effect(ranks) / gt, f"w{w}:{sc['name']}"))
        e = whole_effect(ranks)
        if sc["dtype"] == "fp32" and e is not None:
            whole.append((e / TOL["fp32"], f"w{w}:{sc['name']}"))
        key = sc["dtype"] + ("" if ranks[0]["grad_dtype"] == {"fp32": "float32", "bf16": "bfloat16",
                                                                  "fp16": "float16"}[sc["dtype"]]
                             else " (fp32 grads)")
        g = max(x["tight_grad"] for x in ranks)
        if g >= worst_grad.get(key, (-1, ""))[0]:
            worst_grad[key] = (g, f"w{w}:{sc['name']}")
        st = max(max(x["tight_stats"], x["tight_factor"]) for x in ranks)
        if st >= worst_stats.get(key, (-1, ""))[0]:
            worst_stats[key] = (st, f"w{w}:{sc['name']}")
        p = max(x["params"] for x in ranks)
        if p >= worst_params.get(sc["dtype"], (-1, ""))[0]:
            worst_params[sc["dtype"]] = (p, f"w{w}:{sc['name']}")
    ratios.sort()
    lines.append(f"Smallest effect/tolerance ratio over {len(ratios)} cells: {_fmt(ratios[0][0])} "
                 f"({ratios[0][1]})")
    whole.sort()
    if whole:
        lines.append(f"Smallest whole-training effect/tolerance over {len(whole)} fp32 cells: {_fmt(whole[0][0])} "
                     f"({whole[0][1]})")
    lines.append("")
    lines.append("| precision | tight gradient, worst (ulps) | statistics/factors, worst (rel.) "
                 "| whole-training parameters vs fp32, worst (rel.) |")
    lines.append("|---|---|---|---|")
    for key in sorted(worst_grad):
        dt = key.split()[0]
        lines.append(f"| {key} | {_fmt(worst_grad[key][0])} ({worst_grad[key][1]}) | {_fmt(worst_stats[key][0])} "
                     f"| {_fmt(worst_params[dt][0])} ({worst_params[dt][1]}) |")
    lines.append("")
    # mutation table: mutant x precision -> per stage
    rows = {}
    for w, sc in [(w, sc) for w in (2, 4) for sc in S.matrix(w)]:
        if sc.get("mutant"):
            name, label = sc["mutant"], sc["dtype"] + ("/BF16_Optimizer" if sc.get("grad_accum_fp32")
                                                       else "/offload" if sc.get("offload") else "")
        elif sc.get("trap") == "control":
            name, label = "unscale_fix_disabled", sc["dtype"]
        else:
            continue
        if w != 2:
            name += f" (world {w})"
        ranks = results[w][sc["name"]]["ranks"]
        if any("error" in x for x in ranks):
            cell = "error"
        else:
            key, (ratio, rk) = max(tight_ratios(ranks, sc).items(), key=lambda kv: kv[1][0])
            verdict = "caught" if ratio >= POWER else "MISSED"
            # what the whole-training fp32 check alone would have said (parameters / tolerance)
            whole = max(x["params"] for x in ranks) / TOL[sc["dtype"]]
            cell = f"{verdict} {_fmt(ratio)}x ({key.replace('tight_', '')}, rank {rk}; fp32-run {_fmt(whole)}x)"
        rows.setdefault((name, label, sc["shaper"]), {})[sc["stage"]] = cell
    lines.append("| mutant (world 2 unless named) | precision | method | ZeRO-0 | ZeRO-1 | ZeRO-2 | ZeRO-3 |")
    lines.append("|---|---|---|---|---|---|---|")
    for (name, label, sh), by_stage in rows.items():
        lines.append(f"| {name} | {label} | {sh} | " + " | ".join(by_stage.get(s, "n/a") for s in S.STAGES) + " |")
    lines.append("")
    secs = {w: sum(max(x.get("seconds", 0.0) for x in r["ranks"]) for r in results[w].values()) for w in WORLDS}
    cpu = {w: sum(sum(x.get("cpu", 0.0) for x in r["ranks"]) for r in results[w].values()) for w in WORLDS}
    lines.append("Scenario time inside the workers, wall (CPU of all ranks), s: "
                 + ", ".join(f"world {w}: {secs[w]:.0f} ({cpu[w]:.0f})" for w in WORLDS))
    return "\n".join(lines)


def test_report(tmp_root):
    """The figures README "Tests" quotes, from this run (prints; DS_EQUIVALENCE_REPORT=path writes)."""
    if ONLY:
        pytest.skip("DS_EQUIVALENCE_ONLY launches a subset of the cells")
    results = {w: run_world(w, tmp_root) for w in WORLDS}
    text = build_report(results)
    print("\n" + text)
    with open(os.path.join(tmp_root, "report.md"), "w") as f:
        f.write(text + "\n")
    dest = os.environ.get("DS_EQUIVALENCE_REPORT")
    if dest:
        with open(dest, "w") as f:
            f.write(text + "\n")
    assert "MISSED" not in text
