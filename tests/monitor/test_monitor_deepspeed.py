"""The monitor on real DeepSpeed engines (2 ranks, one ``deepspeed`` launch, ~25 s).

Every tag csv_monitor wrote is compared with the per-layer statistics of the unsharded
single-process reference (GradientShaper on the whole batch) at the same step; the step axis
must be DeepSpeed's (``global_samples`` after the step, as its own ``Train/Samples/lr``). Also:
the StepRecord is bitwise identical on both ranks, pipeline stages included (so rank 0 can write
stage 1's layers without a gather); ``log_interval: 0`` registers nothing; rank 1 registers
nothing; the spike log of an injected spike; the plot tool on the real output.
"""
import csv
import json
import math
import os
from pathlib import Path

import pytest

from tests.distributed.launch import launch_scenarios

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "monitor_worker.py")
PREFIX = "Train_Samples_gradient_shaping_"
LAYER_FIELDS = ("norm_before", "norm_after", "factor", "stat", "threshold", "ratio")
UPDATE_FIELDS = ("param_norm", "update_ratio")
TOL = 1e-5          # fp32, as the equivalence test (observed ~1e-16, ~1e-7 with gradient accumulation)
K = 3.0

SCENARIOS = [
    # spike at step index 3 (30x targets), a non-finite step at index 5 (1e39 overflows fp32)
    {"name": "spamp_z1", "stage": 1, "steps": 7, "spike": {"3": 30.0, "5": 1e39},
     "shaping": {"type": "spamp", "params": {"alpha_min": 0.7}, "log_interval": 1,
                 "spike_log": "spikes.jsonl", "spike_threshold": K}},
    {"name": "gs_z2_every2", "stage": 2, "steps": 5, "gas": 2,
     "shaping": {"type": "gradient_stabilizer", "log_interval": 2}},
    {"name": "zclip_z3_global", "stage": 3, "steps": 4,
     "shaping": {"type": "zclip", "params": {"warmup_steps": 2, "max_grad_norm": None, "z_thresh": 0.5},
                 "log_interval": 1, "log_per_layer": False}},
    {"name": "off", "stage": 1, "steps": 2, "shaping": {"type": "gradient_stabilizer"}},
    {"name": "pipe", "pipeline": True, "steps": 4, "gas": 2, "shaping": {"type": "spamp", "log_interval": 1}},
]
BY_NAME = {s["name"]: s for s in SCENARIOS}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return Path(launch_scenarios(2, WORKER, SCENARIOS, tmp_path_factory.mktemp("monitor"), out="out", timeout=900))


def load(out, name):
    d = out / name
    ref = json.loads((d / "ref.json").read_text())
    assert "error" not in ref, ref.get("trace")
    ranks = [json.loads((d / f"records_rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert "error" not in r, r.get("trace")
    return ref, ranks


def read_csv(path):
    rows = {}
    with open(path) as f:
        reader = csv.reader(f)
        assert next(reader)[0] == "step"
        for step, value in reader:
            rows[int(step)] = float(value)
    return rows


def shaping_csvs(out, name):
    d = out / name / "csv"
    return {f[len(PREFIX):-4]: read_csv(d / f) for f in os.listdir(d) if f.startswith(PREFIX)}


def close(a, b):
    return abs(a - b) <= TOL * max(abs(b), 1e-12)


def expected_events(sc, ref):
    """(tag stem -> {samples: value}) that the monitor must have written, from the reference."""
    interval = sc["shaping"]["log_interval"]
    per_layer = sc["shaping"].get("log_per_layer", True)
    exp, skipped, spikes = {}, 0, 0
    for row in ref["steps"]:
        skipped += row["skipped"]
        if not row["skipped"]:
            spikes += sum(1 for r in row["ls"]["ratio"] if r > sc["shaping"].get("spike_threshold", 5.0))
        if row["global_steps"] % interval:
            continue
        s = row["samples"]
        put = lambda tag, v: exp.setdefault(tag, {}).__setitem__(s, v)
        put("skipped_steps", float(skipped))
        put("loss_scale", row["loss_scale"])
        if row["skipped"]:
            continue
        ls = row["ls"]
        put("global_norm_before", math.sqrt(sum(x * x for x in ls["norm_before"])))
        put("global_norm_after", math.sqrt(sum(x * x for x in ls["norm_after"])))
        put("shaped_fraction", sum(abs(f - 1) > 1e-6 for f in ls["factor"]) / len(ls["factor"]))
        put("spikes", float(spikes))
        ratios = [r for r in ls["ratio"] if not math.isnan(r)]
        if ratios:
            put("max_ratio", max(ratios))
        upd = row["upd"]                    # update sizes: the unsharded reference's parameters
        put("param_norm", upd["global_param_norm"])
        put("update_ratio", upd["global_update_ratio"])
        if per_layer:
            for f in LAYER_FIELDS:
                for name, v in zip(ref["names"], ls[f]):
                    if not math.isnan(v):
                        put(f"layer_{name}_{f}", v)
            for f in UPDATE_FIELDS:
                for name, v in zip(ref["names"], upd[f]):
                    if not math.isnan(v):
                        put(f"layer_{name}_{f}", v)
    return exp


@pytest.mark.parametrize("name", ["spamp_z1", "gs_z2_every2", "zclip_z3_global", "pipe"])
def test_tags_and_values_equal_the_unsharded_reference(out, name):
    sc = BY_NAME[name]
    ref, _ = load(out, name)
    got = shaping_csvs(out, name)
    exp = expected_events(sc, ref)
    assert set(got) == set(exp), (sorted(set(got) ^ set(exp)))
    for tag, rows in exp.items():
        assert set(got[tag]) == set(rows), (tag, sorted(got[tag]), sorted(rows))
        for s, v in rows.items():
            assert close(got[tag][s], v), (tag, s, got[tag][s], v)
    # the update-size tags are there and move: parameters did change by a visible fraction
    ratios = [v for t, rows in got.items() if t.endswith("update_ratio") for v in rows.values()]
    assert ratios and min(ratios) > 1e-4
    # the shaper did change the gradient, so equal values are not trivially equal
    assert max(got["shaped_fraction"].values()) > 0


def test_step_axis_is_deepspeeds(out):
    """Our points sit on the same x as DeepSpeed's own Train/Samples/lr of the same step."""
    for name in ("spamp_z1", "gs_z2_every2"):
        ref, _ = load(out, name)
        lr = read_csv(out / name / "csv" / "Train_Samples_lr.csv")
        assert sorted(lr) == [r["samples"] for r in ref["steps"]]
        assert set(shaping_csvs(out, name)["skipped_steps"]) <= set(lr)
    ref, _ = load(out, "gs_z2_every2")      # gas 2 x micro 2 x 2 ranks = 8 samples per step
    assert [r["samples"] for r in ref["steps"]] == [8, 16, 24, 32, 40]
    assert sorted(shaping_csvs(out, "gs_z2_every2")["global_norm_before"]) == [16, 32]


@pytest.mark.parametrize("name", ["spamp_z1", "gs_z2_every2", "zclip_z3_global", "pipe"])
def test_statistics_are_identical_on_every_rank(out, name):
    """Why rank 0 alone can write every layer: the record it holds is the one every rank holds,
    bit for bit, pipeline stages included."""
    ref, (r0, r1) = load(out, name)
    assert r0["records"] == r1["records"]
    assert any(rec is not None for rec in r0["records"])
    if name == "pipe":
        # each stage holds only its own layers, yet the layout (and rank 0's tags) cover all
        assert set(r0["local_params"]).isdisjoint(r1["local_params"])
        assert sorted(r0["local_params"] + r1["local_params"]) == sorted(ref["names"])
        written = {k for k in shaping_csvs(out, name) if k.startswith("layer_")}
        assert {f"layer_{n}_norm_before" for n in r1["local_params"]} <= written


def test_only_rank_0_registers(out):
    """Monitor, callback and step wrapper on rank 0 only; the update-size sums (which span the
    shards of every rank) on every rank when logging is on, nowhere when it is off."""
    for sc in SCENARIOS:
        ref, (r0, r1) = load(out, sc["name"])
        on = sc["name"] != "off"
        assert r1["wiring"] == {"monitor": False, "callbacks": 0, "step_wrapped": False, "update_size": on}
        assert r0["wiring"] == {"monitor": on, "callbacks": int(on), "step_wrapped": on, "update_size": on}


def test_log_interval_0_registers_nothing_and_writes_nothing(out):
    ref, (r0, r1) = load(out, "off")
    assert r0["wiring"] == r1["wiring"] == {"monitor": False, "callbacks": 0, "step_wrapped": False,
                                            "update_size": False}
    assert ref["summary"] is None
    assert not shaping_csvs(out, "off")
    assert os.path.exists(out / "off" / "csv" / "Train_Samples_lr.csv")    # the monitors were on


def test_spike_log_of_an_injected_spike(out):
    ref, _ = load(out, "spamp_z1")
    lines = [json.loads(x) for x in (out / "spamp_z1" / "spikes.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "start" and lines[0]["spike_threshold"] == K and "SPAMP" in lines[0]["shaper"]
    spikes = [e for e in lines if e["event"] == "spike"]
    expected = {}
    for row in ref["steps"]:
        if row["skipped"]:
            continue
        for i, name in enumerate(ref["names"]):
            if row["ls"]["ratio"][i] > K:
                expected[(row["global_steps"], name)] = (row, i)
    assert {(e["step"], e["layer"]) for e in spikes} == set(expected)
    assert {e["step"] for e in spikes} == {4}, "only the injected spike (step 4) crosses k = 3"
    assert len(spikes) == len(ref["names"])
    for e in spikes:
        row, i = expected[(e["step"], e["layer"])]
        assert e["samples"] == row["samples"]
        for key, field in (("ratio", "ratio"), ("norm", "norm_before"), ("stat", "stat"), ("factor", "factor"),
                           ("threshold", "threshold")):
            assert close(e[key], row["ls"][field][i]), (key, e[key], row["ls"][field][i])
        assert e["factor"] < 0.2           # SPAMP projected the spike onto tau
    bad = [e for e in lines if e["event"] == "nonfinite"]
    assert bad == [{"event": "nonfinite", "step": 6, "samples": 24}]
    summary = lines[-1]
    assert summary["event"] == "summary"
    assert summary["spikes"] == len(ref["names"]) and summary["nonfinite"] == 1
    assert summary["skipped"] == 1 and summary["steps"] == 6
    worst = max(expected.values(), key=lambda ri: ri[0]["ls"]["ratio"][ri[1]])
    assert summary["worst_layers"][0]["layer"] == ref["names"][worst[1]]
    assert {k: v for k, v in summary.items() if k not in ("event", "step", "samples")} == ref["summary"]


def test_plot_tool_on_deepspeed_output(out, tmp_path):
    from tools import plot_shaping as plot
    d = out / "spamp_z1"
    files = plot.plot_all(str(d / "csv"), str(tmp_path), str(d / "spikes.jsonl"))
    assert sorted(os.path.basename(f) for f in files) == ["global_norm.png", "layer_ratio.png", "loss.png",
                                                         "thresholds.png"]
    series = plot.load_series(str(d / "csv"))
    ref, _ = load(out, "spamp_z1")
    assert sorted(series.layers) == sorted(ref["names"])
    # the pipeline engine writes Train/Samples/train_loss itself
    assert plot.load_series(str(out / "pipe" / "csv")).loss is not None
