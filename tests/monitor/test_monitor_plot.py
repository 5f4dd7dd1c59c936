"""tools/plot_shaping.py on a sample log written the way DeepSpeed's csv_monitor writes it:
the extracted series carry the right numbers, and the plots are real, non-trivial PNGs."""
import csv
import json
import os
import struct

import numpy as np
import pytest

from tools import plot_shaping as plot


LAYERS = ["layers.0.attn.q_proj.weight", "layers.0.norm_w", "head.weight"]
STEPS = [8, 16, 24, 32, 40]          # samples after each step (batch 8); step 24 skipped


def write_tag(d, tag, rows, header_again_at=None):
    """csv_monitor: file name = tag with '/' -> '_'; header ['step', last tag segment]."""
    path = os.path.join(d, tag.replace("/", "_") + ".csv")
    with open(path, "a+") as f:
        w = csv.writer(f)
        w.writerow(["step", tag.split("/")[-1]])
        for i, (s, v) in enumerate(rows):
            if header_again_at == i:          # a resumed run appends a second header
                w.writerow(["step", tag.split("/")[-1]])
            w.writerow([s, v])


def norm(layer, s):
    return (LAYERS.index(layer) + 1) * (10.0 if s == 32 else 1.0) * (1 + s / 100)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("csv"))
    P = "Train/Samples/gradient_shaping"
    ok = [s for s in STEPS if s != 24]
    for layer in LAYERS:
        write_tag(d, f"{P}/layer/{layer}/norm_before", [(s, norm(layer, s)) for s in ok], header_again_at=2)
        write_tag(d, f"{P}/layer/{layer}/norm_after", [(s, min(norm(layer, s), 2.0)) for s in ok])
        write_tag(d, f"{P}/layer/{layer}/factor", [(s, min(1.0, 2.0 / norm(layer, s))) for s in ok])
        # no statistic on the first step
        write_tag(d, f"{P}/layer/{layer}/stat", [(s, 0.5) for s in ok[1:]])
        write_tag(d, f"{P}/layer/{layer}/ratio", [(s, norm(layer, s) / 0.5) for s in ok[1:]])
        write_tag(d, f"{P}/layer/{layer}/threshold", [(s, 2.0) for s in ok])
    gb = {s: float(np.sqrt(sum(norm(l, s) ** 2 for l in LAYERS))) for s in ok}
    write_tag(d, f"{P}/global_norm_before", sorted(gb.items()))
    write_tag(d, f"{P}/global_norm_after", [(s, 2.0 * np.sqrt(3)) for s in ok])
    write_tag(d, f"{P}/skipped_steps", [(s, 0.0 if s < 24 else 1.0) for s in STEPS])
    write_tag(d, f"{P}/shaped_fraction", [(s, 1.0) for s in ok])
    write_tag(d, "Train/Samples/train_loss", [(s, 5.0 - s / 20) for s in STEPS])
    write_tag(d, "Train/Samples/lr", [(s, 1e-3) for s in STEPS])
    log = os.path.join(d, "spikes.jsonl")
    with open(log, "w") as f:
        f.write(json.dumps({"event": "start", "step": 0, "samples": 0}) + "\n")
        f.write(json.dumps({"event": "nonfinite", "step": 3, "samples": 24}) + "\n")
        for layer in LAYERS:
            f.write(json.dumps({"event": "spike", "step": 4, "samples": 32, "layer": layer, "ratio": 10.0,
                                "norm": 1.0, "stat": 0.1, "factor": 0.1, "threshold": None}) + "\n")
        f.write('{"event": "spike", "step": 5, "sam')                  # killed mid-line
    return d, log, gb


def test_series_extraction_returns_the_numbers(sample):
    d, log, gb = sample
    s = plot.load_series(d)
    assert sorted(s.layers) == sorted(LAYERS)       # names with '.' and '_' survive the file names
    x, y = s.layers["layers.0.norm_w"]["norm_before"]
    assert list(x) == [8, 16, 32, 40]               # the repeated header row is skipped
    np.testing.assert_allclose(y, [norm("layers.0.norm_w", v) for v in x])
    assert list(s.layers["head.weight"]["stat"][0]) == [16, 32, 40]
    x, y = s.globals["global_norm_before"]
    np.testing.assert_allclose(y, [gb[v] for v in x])
    assert list(s.globals["skipped_steps"][1]) == [0, 0, 1, 1, 1]
    assert list(s.loss[0]) == STEPS and s.loss[1][0] == pytest.approx(4.6)
    assert "lr" not in s.globals                     # not ours


def test_layer_matrix_spans_every_logged_step(sample):
    d, _, _ = sample
    names, steps, m = plot.layer_matrix(plot.load_series(d), "ratio")
    assert list(steps) == STEPS                      # the skipped step 24 is a column of gaps
    i = names.index("head.weight")
    assert np.isnan(m[i, 0]) and np.isnan(m[i, 2])
    assert m[i, 3] == pytest.approx(norm("head.weight", 32) / 0.5)


def test_spike_log_reader_keeps_events_and_survives_a_truncated_line(sample):
    _, log, _ = sample
    ev = plot.read_spike_log(log)
    assert [e["event"] for e in ev] == ["nonfinite", "spike", "spike", "spike"]
    assert plot.read_spike_log(None) == [] and plot.read_spike_log("/nonexistent.jsonl") == []


def test_top_layers_orders_by_largest_ratio(sample):
    d, _, _ = sample
    assert plot.top_layers(plot.load_series(d), 2) == ["head.weight", "layers.0.norm_w"]


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def test_all_plots_are_written_and_non_trivial(sample, tmp_path):
    d, log, _ = sample
    files = plot.plot_all(d, str(tmp_path), log)
    assert sorted(os.path.basename(f) for f in files) == ["global_norm.png", "layer_ratio.png", "loss.png",
                                                         "thresholds.png"]
    for f in files:
        w, h = png_size(f)
        assert w >= 600 and h >= 300 and os.path.getsize(f) > 15000, (f, w, h, os.path.getsize(f))


def test_cli_and_missing_data(sample, tmp_path, capsys):
    d, log, _ = sample
    assert plot.main(["--csv-dir", d, "--spike-log", log, "--out", str(tmp_path / "p")]) == 0
    assert len(os.listdir(tmp_path / "p")) == 4
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plot.main(["--csv-dir", str(empty), "--out", str(tmp_path / "q")]) == 1
    assert "no gradient-shaping series" in capsys.readouterr().err
