"""ShapingMonitor's bookkeeping against a stand-in engine (one process, no DeepSpeed engine):
interval, step convention, skipped steps, checkpoint loads, the spike log file and the summary.

The stand-in does what DeepSpeed and DeepSpeedShaping do around the monitor: ``_take_model_step``
runs the shaping step and the callbacks, then advances ``global_steps`` and ``global_samples``.
The real wiring is covered by test_monitor_deepspeed.py.
"""
import json
import math

import pytest
import torch

from megatron_shaping import GradientShaper
from megatron_shaping.integrations.deepspeed.config import get_gradient_shaping_config
from megatron_shaping.integrations.deepspeed.monitor import TAG_PREFIX, ShapingMonitor

BATCH = 8
U = torch.tensor([0.6, 0.0, -0.8, 0.0])


class Monitors:
    enabled = True

    def __init__(self):
        self.events = []

    def write_events(self, events):
        self.events.extend(events)


class Engine:
    def __init__(self, section, norms):
        self.params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(2)]
        self.config = get_gradient_shaping_config({"gradient_shaping": section})
        self.gs = GradientShaper([(f"w{i}", p) for i, p in enumerate(self.params)], self.config.spec())
        self.norms = norms
        self.global_steps = 0
        self.global_samples = 0
        self.monitor = Monitors()
        self.destroyed = False
        self.shaping = Shaping(self)

    def _take_model_step(self, lr_kwargs=None):
        n = self.norms[self.global_steps]
        for i, p in enumerate(self.params):
            p.grad = U * n * (i + 1)
        rec = self.gs.apply_()
        self.shaping.last_loss_scale = 1.0
        for cb in self.shaping.callbacks:
            cb(self.shaping, rec)
        self.global_steps += 1
        self.global_samples += BATCH

    def destroy(self):
        self.destroyed = True

    def train(self, steps):
        for _ in range(steps):
            self._take_model_step()


class Shaping:
    def __init__(self, engine):
        self.engine = engine
        self.session = engine.gs.session
        self.config = engine.config
        self.callbacks = []
        self.last_loss_scale = 1.0


def make(section, norms, tmp_path=None):
    section = {"type": "spamp", "params": {"beta": 0.5}, **section}
    if tmp_path is not None and section.get("spike_log"):
        section["spike_log"] = str(tmp_path / section["spike_log"])
    eng = Engine(section, norms)
    mon = ShapingMonitor(eng.shaping, eng.config)
    return eng, mon


def tags(eng):
    return {t[len(TAG_PREFIX) + 1:] for t, _, _ in eng.monitor.events}


def test_interval_and_step_convention():
    eng, mon = make({"log_interval": 2}, [1.0] * 5)
    eng.train(5)
    steps = sorted({s for _, _, s in eng.monitor.events})
    assert steps == [2 * BATCH, 4 * BATCH]            # after steps 2 and 4: samples after the step
    assert {"layer/w0/norm_before", "layer/w1/stat", "global_norm_before", "shaped_fraction", "loss_scale",
            "spikes", "skipped_steps", "max_ratio"} <= tags(eng)
    ev = {(t, s): v for t, v, s in eng.monitor.events}
    assert ev[(f"{TAG_PREFIX}/global_norm_before", 2 * BATCH)] == pytest.approx(math.sqrt(1 + 4))


def test_log_per_layer_false_writes_only_globals():
    eng, _ = make({"log_interval": 1, "log_per_layer": False}, [1.0] * 2)
    eng.train(2)
    assert tags(eng) and not any(t.startswith("layer/") for t in tags(eng))


def test_skipped_step_writes_counters_and_keeps_stat_reference(tmp_path):
    eng, mon = make({"log_interval": 1, "spike_log": "s.jsonl", "spike_threshold": 3.0},
                    [1.0, float("nan"), 1.0, 10.0], tmp_path)
    eng.train(4)
    at = lambda k: {t[len(TAG_PREFIX) + 1:]: v for t, v, s in eng.monitor.events if s == k * BATCH}
    assert at(2) == {"skipped_steps": 1.0, "loss_scale": 1.0}
    assert at(3)["layer/w0/stat"] == pytest.approx(1.0)      # tau untouched by the skipped step
    assert at(4)["layer/w0/ratio"] == pytest.approx(10.0)    # tau = 0.5 * 1 + 0.5 * 1
    mon.close()
    lines = [json.loads(x) for x in open(tmp_path / "s.jsonl")]
    assert [l["event"] for l in lines] == ["start", "nonfinite", "spike", "spike", "summary"]
    assert lines[1] == {"event": "nonfinite", "step": 2, "samples": 2 * BATCH}
    sp = lines[2]
    assert (sp["step"], sp["samples"], sp["layer"]) == (4, 4 * BATCH, "w0")
    assert sp["ratio"] == pytest.approx(10.0) and sp["stat"] == pytest.approx(1.0)
    assert sp["factor"] == pytest.approx(0.1) and sp["threshold"] == pytest.approx(1.0)
    s = lines[-1]
    assert s["spikes"] == 2 and s["nonfinite"] == 1 and s["skipped"] == 1 and s["steps"] == 3
    assert [w["layer"] for w in s["worst_layers"]] == ["w0", "w1"]


def test_checkpoint_load_between_steps_uses_the_loaded_state():
    eng, mon = make({"log_interval": 1}, [1.0, 1.0, 8.0])
    other = GradientShaper([(f"w{i}", p) for i, p in enumerate(eng.params)], eng.config.spec())
    for p in eng.params:
        p.grad = U * 4.0
    other.apply_()                                  # a state with tau = 4 (w0), 8 (w1)
    eng.train(2)
    eng.gs.load_state_dict(other.state_dict())      # what load_checkpoint does
    eng.train(1)
    last = {t[len(TAG_PREFIX) + 1:]: v for t, v, s in eng.monitor.events if s == 3 * BATCH}
    assert last["layer/w0/stat"] == pytest.approx(4.0) and last["layer/w0/ratio"] == pytest.approx(2.0)


def test_destroy_logs_the_summary_once(tmp_path, caplog):
    eng, mon = make({"spike_log": "s.jsonl"}, [1.0, 50.0], tmp_path)
    eng.train(2)
    with caplog.at_level("INFO", logger="megatron_shaping"):
        eng.destroy()
    assert eng.destroyed and mon._closed
    assert "2 spike events" in caplog.text and "w0 (1x" in caplog.text
    assert mon.close() is None                      # second close: nothing
    lines = [json.loads(x) for x in open(tmp_path / "s.jsonl")]
    assert lines[-1]["event"] == "summary"
    assert not eng.monitor.events                   # log_interval 0: nothing to the monitors


def test_nan_values_become_null_in_the_spike_log(tmp_path):
    eng, mon = make({"spike_log": "s.jsonl", "type": "gradient_stabilizer", "params": {}}, [1.0, 100.0], tmp_path)
    eng.train(2)
    mon.close()
    text = open(tmp_path / "s.jsonl").read()
    assert "NaN" not in text and "Infinity" not in text
    spikes = [json.loads(x) for x in text.splitlines() if '"spike"' in x]
    assert spikes and all(s["ratio"] == pytest.approx(100.0) for s in spikes)


def test_log_interval_without_any_deepspeed_monitor_warns_and_writes_nothing(caplog):
    eng = Engine({"type": "spamp", "log_interval": 1}, [1.0])
    eng.monitor.enabled = False
    with caplog.at_level("WARNING", logger="megatron_shaping"):
        mon = ShapingMonitor(eng.shaping, eng.config)
    assert "no DeepSpeed monitor" in caplog.text and mon.interval == 0
    eng.train(1)
    assert not eng.monitor.events
