"""Shaping under Megatron tensor parallelism and DeepSpeed pipeline parallelism, on every rank,
in fp32 and bf16 (tp_pp_worker.py): every registered method and a chain, for TP2, PP2,
TP2xPP2, DP2xTP2 and TP2xPP2xDP2 (8 processes), plus the mutants of tp_pp_mutants.py, and
``FP8_METHODS`` with the model's linears in simulated FP8 (tight comparison).

Per cell (layout x precision x case), from the worker's JSON line:

* the tight comparison, every step, every rank: the shaped gradient slice each rank's
  optimizer steps on, read from DeepSpeed's buffers, against ``GradientShaper`` applied to the
  same reduced gradient gathered from all ranks (1 ulp of the buffer's dtype plus the
  statistics' summation error: 1e-12 relative with the CPU sum kernel, 2e-6 with the torch
  path's fp32 partial sums, see the worker), the per-layer statistics, the shaper
  state, the master weights after the step and the model weights the next forward uses;
* the power of that comparison: on every rank, RMS(shaped - unshaped) / RMS(tolerance) >= 10
  (what a rank that skipped shaping would score);
* fp32: the whole run against the TP1/PP1/DP1 run (statistics every step on every rank, loss,
  final parameters and state on every rank; relative 1e-5), and how far shaping moves the
  final parameters in units of that tolerance (>= 10).

Each mutant must fail the tight gradient comparison by >= 10x its tolerance in fp32 and bf16
on every layout where its broken rule has a role. ``test_mutant_table`` prints the table.
"""
import json
import os
import time

import pytest

from megatron_shaping.shapers import REGISTRY

from .launch import run_deepspeed
from .tp_pp_mutants import MUTANTS

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "tp_pp_worker.py")
LAUNCHES = {2: ("tp2", "pp2"), 4: ("tp2pp2", "dp2tp2"), 8: ("tp2pp2dp2",)}
SIZES = {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "tp2pp2": (2, 2, 1), "dp2tp2": (2, 1, 2), "tp2pp2dp2": (2, 2, 2)}
PRECISIONS = ("fp32", "bf16")
METHODS = tuple(REGISTRY) + ("chain",)
#: also run with the model's linears in simulated FP8 (tight comparison, every layout)
FP8_METHODS = ("gradient_stabilizer", "spamp", "agc")
TIGHT = ("grad", "stats", "state", "master", "weights")
WHOLE = ("stats", "loss", "params", "state")
POWER = 10.0
_cache = {}
_seconds = {}


def results(world, tmp):
    if world not in _cache:
        out = os.path.join(tmp, f"tp_pp_{world}.jsonl")
        t0 = time.time()
        run_deepspeed(world, WORKER, "--layouts", ",".join(LAUNCHES[world]), "--fp8-cases", ",".join(FP8_METHODS),
                      "--out", out, timeout=1200)
        _seconds[world] = time.time() - t0
        with open(out) as f:
            rows = [json.loads(line) for line in f]
        _cache[world] = {(r["layout"], r["precision"], r["case"]): r for r in rows if not r.get("meta")}
    return _cache[world]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tp_pp"))


CASES = [(w, layout, prec, m) for w, layouts in LAUNCHES.items() for layout in layouts
         for prec in PRECISIONS for m in METHODS]
CASES += [(w, layout, "fp8", m) for w, layouts in LAUNCHES.items() for layout in layouts for m in FP8_METHODS]
MUTANT_CASES = [(w, layout, prec, m) for w, layouts in LAUNCHES.items() for layout in layouts
                for prec in PRECISIONS for m in MUTANTS if MUTANTS[m].applies(*SIZES[layout])]


def _fmt(part):
    return f"{part['ratio']:.3g} (rank {part['rank']}, step {part['step']}, {part['where']})"


@pytest.mark.parametrize("world,layout,precision,method", CASES, ids=[f"{l}-{p}-{m}" for _, l, p, m in CASES])
def test_tp_pp_every_rank_equals_reference(world, layout, precision, method, tmp):
    r = results(world, tmp)[(layout, precision, method)]
    assert "error" not in r, r["error"]
    if precision == "fp8":
        # every rank's layers' linears in FP8 (the output head stays in full precision, as in FP8
        # recipes; each pipeline stage holds its own layers)
        for rk, names in enumerate(r["linears"]):
            assert {"SimFp8ColumnParallelLinear", "SimFp8RowParallelLinear"} <= set(names), (rk, names)
    t = r["tight"]
    for k in TIGHT:
        assert t[k]["ratio"] <= 1.0, f"{k} outside tolerance: error/tolerance {_fmt(t[k])}"
    assert t["replicas"]["ratio"] == 0.0, f"copies of one gradient element disagree: {t['replicas']}"
    eff = t["effect"]
    assert len(eff["by_rank"]) == world, f"only {len(eff['by_rank'])} of {world} ranks held gradient slices"
    assert eff["ratio"] >= POWER, (f"shaping barely acts on rank {eff['rank']}: effect/tolerance {eff['ratio']:.3g} "
                                   f"(relative change {eff['relative']:.3g})")
    if precision == "fp32":
        for k in WHOLE:
            assert r["whole"][k]["ratio"] <= 1.0, f"whole training, {k}: error/tolerance {_fmt(r['whole'][k])}"
        assert r["whole_effect"] >= POWER, f"shaping barely moves the parameters: {r['whole_effect']:.3g}"


@pytest.mark.parametrize("world,layout,precision,mutant", MUTANT_CASES,
                         ids=[f"{l}-{p}-{m}" for _, l, p, m in MUTANT_CASES])
def test_tp_pp_mutant_is_caught(world, layout, precision, mutant, tmp):
    r = results(world, tmp)[(layout, precision, "mutant:" + mutant)]
    assert "error" not in r, r["error"]
    t = r["tight"]
    assert t["grad"]["ratio"] >= POWER, (f"{MUTANTS[mutant].what}: the shaped-gradient comparison reports only "
                                         f"{_fmt(t['grad'])}")


def test_mutant_table(tmp, capsys):
    """The table for the README (mutant x layout x precision: caught, error/tolerance of the
    shaped gradient and of the statistics), the smallest effect/tolerance over the method cells,
    the worst difference per precision, and the launch times."""
    rows, worst, power = [], {}, []
    for world, layout, prec, m in MUTANT_CASES:
        r = results(world, tmp).get((layout, prec, "mutant:" + m), {})
        t = r.get("tight", {})
        g, s = t.get("grad", {}).get("ratio", 0.0), t.get("stats", {}).get("ratio", 0.0)
        rows.append(f"| {m} | {layout} | {prec} | {'yes' if g >= POWER else 'NO'} | {g:.3g} | {s:.3g} |")
    for world, layout, prec, m in CASES:
        r = results(world, tmp).get((layout, prec, m), {})
        t = r.get("tight")
        if not t:
            continue
        power.append((t["effect"]["ratio"], layout, prec, m))
        for k in TIGHT:
            if t[k]["ratio"] > worst.get(prec, (0.0,))[0]:
                worst[prec] = (t[k]["ratio"], k, layout, m)
    with capsys.disabled():
        print("\n| mutant | layout | precision | caught | gradient error/tol | statistics error/tol |")
        print("| --- | --- | --- | --- | --- | --- |")
        print("\n".join(rows))
        if power:
            print("smallest effect/tolerance: %.3g (%s %s %s)" % min(power))
        for prec, w in sorted(worst.items()):
            print(f"worst error/tolerance {prec}: {w[0]:.3g} ({w[1]}, {w[2]} {w[3]})")
        print("launch seconds: " + ", ".join(f"{w} processes {s:.0f}" for w, s in sorted(_seconds.items())))
    assert all("| yes |" in row for row in rows), "\n".join(r for r in rows if "| NO |" in r)
