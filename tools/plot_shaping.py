#!/usr/bin/env python
"""Plot what the gradient shaper did, from DeepSpeed's csv_monitor files and the spike log.

    python tools/plot_shaping.py --csv-dir <output_path>/<job_name> [--spike-log spikes.jsonl] \\
        [--out plots/] [--layers 8]

Writes (each only when its data is present):
    global_norm.png      global gradient norm before and after shaping, spike events marked
    layer_ratio.png      heatmap, layers x steps, of norm_before / running statistic (log scale;
                         the shaping factor when the method has no running statistic)
    thresholds.png       per-layer threshold (solid) and norm before shaping (dotted), for the
                         layers with the largest ratio (or all, if fewer than --layers)
    loss.png             Train/Samples/train_loss with spike events marked

The x axis is DeepSpeed's step convention for Train/Samples/* tags: samples seen. csv_monitor
writes one file per tag, the tag with '/' replaced by '_'; see docs/MONITORING.md. Only the
standard library, numpy and matplotlib (Agg backend) are needed: the tool does not import
megatron_shaping, so it runs wherever the logs were copied to.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

# Kept equal to megatron_shaping/integrations/deepspeed/monitor.py (tests/monitor checks it).
GLOBAL_FIELDS = ("global_norm_before", "global_norm_after", "shaped_fraction", "max_ratio", "spikes",
                 "skipped_steps", "loss_scale", "spike_skips", "param_norm", "update_ratio")
# (longest suffix wins: "update_ratio" before "ratio")
LAYER_FIELDS = ("norm_before", "norm_after", "factor", "stat", "threshold", "ratio", "param_norm", "update_ratio")
CSV_PREFIX = "Train_Samples_gradient_shaping_"
CSV_LAYER_PREFIX = CSV_PREFIX + "layer_"
LOSS_FILE = "Train_Samples_train_loss.csv"

Series = Tuple[np.ndarray, np.ndarray]       # (samples, values), sorted by samples


class ShapingSeries(NamedTuple):
    globals: Dict[str, Series]               # field -> series
    layers: Dict[str, Dict[str, Series]]     # layer name -> field -> series
    loss: Optional[Series]


def read_csv_series(path: str) -> Series:
    """(steps, values) of one csv_monitor file. Rows that are not two numbers (the header, and
    the header again after a resumed run appended to the file) are skipped; for a step written
    twice (a resumed run repeating steps) the last value wins."""
    points: Dict[int, float] = {}
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if len(row) < 2:
                continue
            try:
                step, value = int(float(row[0])), float(row[1])
            except ValueError:
                continue
            points[step] = value
    steps = np.array(sorted(points), dtype=np.int64)
    return steps, np.array([points[s] for s in steps], dtype=np.float64)


def _layer_and_field(stem: str) -> Optional[Tuple[str, str]]:
    """'<layer>_<field>' -> (layer, field); layer names may contain '_', fields are known."""
    for field in sorted(LAYER_FIELDS, key=len, reverse=True):
        if stem.endswith("_" + field) and len(stem) > len(field) + 1:
            return stem[:-len(field) - 1], field
    return None


def load_series(csv_dir: str) -> ShapingSeries:
    """Every gradient-shaping series (and the loss) under one csv_monitor directory."""
    glob: Dict[str, Series] = {}
    layers: Dict[str, Dict[str, Series]] = {}
    loss = None
    for fname in sorted(os.listdir(csv_dir)):
        if not fname.endswith(".csv"):
            continue
        path = os.path.join(csv_dir, fname)
        stem = fname[:-4]
        if fname == LOSS_FILE:
            loss = read_csv_series(path)
        elif stem.startswith(CSV_LAYER_PREFIX):
            lf = _layer_and_field(stem[len(CSV_LAYER_PREFIX):])
            if lf is not None:
                layers.setdefault(lf[0], {})[lf[1]] = read_csv_series(path)
        elif stem.startswith(CSV_PREFIX) and stem[len(CSV_PREFIX):] in GLOBAL_FIELDS:
            glob[stem[len(CSV_PREFIX):]] = read_csv_series(path)
    return ShapingSeries(glob, layers, loss)


def read_spike_log(path: Optional[str]) -> List[dict]:
    """The spike and non-finite events of a spike log (start and summary lines dropped; a
    truncated last line, from a run that was killed, is ignored)."""
    if not path or not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if e.get("event") in ("spike", "nonfinite"):
                out.append(e)
    return out


def all_steps(series: ShapingSeries) -> List[int]:
    """Every logged step (a skipped step has global tags only)."""
    out = {int(s) for x, _ in series.globals.values() for s in x}
    out |= {int(s) for v in series.layers.values() for x, _ in v.values() for s in x}
    return sorted(out)


def layer_matrix(series: ShapingSeries, field: str) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """(layer names, samples, [layers x samples] values with NaN where absent) of one field,
    over every logged step (so skipped steps and steps without a value show as gaps)."""
    names = [n for n in series.layers if field in series.layers[n]]
    steps = all_steps(series)
    col = {s: j for j, s in enumerate(steps)}
    m = np.full((len(names), len(steps)), np.nan)
    for i, n in enumerate(names):
        x, y = series.layers[n][field]
        for s, v in zip(x, y):
            m[i, col[int(s)]] = v
    return names, np.array(steps, dtype=np.int64), m


# ------------------------------------------------------------------ plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _mark_events(ax, events: List[dict], label: bool = True) -> None:
    spikes = sorted({e["samples"] for e in events if e["event"] == "spike"})
    bad = sorted({e["samples"] for e in events if e["event"] == "nonfinite"})
    for i, s in enumerate(spikes):
        ax.axvline(s, color="tab:red", alpha=0.35, lw=1, label="spike event" if label and i == 0 else None)
    for i, s in enumerate(bad):
        ax.axvline(s, color="black", ls="--", alpha=0.6, lw=1,
                   label="non-finite (skipped)" if label and i == 0 else None)


def _positive(y: np.ndarray) -> bool:
    return bool(np.all(y[np.isfinite(y)] > 0)) and bool(np.isfinite(y).any())


def plot_global_norm(series: ShapingSeries, events: List[dict], path: str) -> Optional[str]:
    g = series.globals
    if "global_norm_before" not in g:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for field, style, label in (("global_norm_before", "-", "before shaping"),
                                ("global_norm_after", "-", "after shaping")):
        if field in g:
            ax.plot(*g[field], style, marker=".", ms=4, lw=1.2, label=label)
    if all(_positive(g[f][1]) for f in ("global_norm_before", "global_norm_after") if f in g):
        ax.set_yscale("log")
    _mark_events(ax, events)
    ax.set_xlabel("samples")
    ax.set_ylabel("global gradient L2 norm")
    ax.set_title("Gradient norm before / after shaping")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ratio_heatmap(series: ShapingSeries, path: str) -> Optional[str]:
    field = "ratio"
    names, steps, m = layer_matrix(series, field)
    if not names or not np.isfinite(m).any():
        field = "factor"
        names, steps, m = layer_matrix(series, field)
    if not names or not np.isfinite(m).any():
        return None
    plt = _plt()
    with np.errstate(divide="ignore", invalid="ignore"):
        logm = np.log10(np.where(m > 0, m, np.nan))
    lim = max(float(np.nanmax(np.abs(logm))), 0.1)
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.22 * len(names) + 1.5)))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(logm), aspect="auto", interpolation="nearest", cmap=cmap,
                   vmin=-lim, vmax=lim)
    nt = min(len(steps), 10)
    ticks = np.unique(np.linspace(0, len(steps) - 1, nt).round().astype(int))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(steps[t]) for t in ticks], fontsize=8)
    every = max(1, math.ceil(len(names) / 60))
    ax.set_yticks(range(0, len(names), every))
    ax.set_yticklabels(names[::every], fontsize=7)
    ax.set_xlabel("samples")
    what = "norm before / running statistic" if field == "ratio" else "shaping factor (norm after / before)"
    ax.set_title(f"Per-layer {what} (log10; grey: no value)")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(f"log10 {field}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def top_layers(series: ShapingSeries, n: int) -> List[str]:
    """Layers with a threshold, the n with the largest ratio (or norm) first."""
    cand = [k for k, v in series.layers.items() if "threshold" in v and np.isfinite(v["threshold"][1]).any()]

    def key(k):
        v = series.layers[k]
        for f in ("ratio", "norm_before"):
            if f in v and np.isfinite(v[f][1]).any():
                return -float(np.nanmax(v[f][1]))
        return 0.0
    return sorted(cand, key=key)[:n]


def plot_thresholds(series: ShapingSeries, events: List[dict], path: str, n_layers: int = 8) -> Optional[str]:
    layers = top_layers(series, n_layers)
    if not layers:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 5))
    colors = plt.get_cmap("tab10")
    positive = True
    for i, name in enumerate(layers):
        v = series.layers[name]
        c = colors(i % 10)
        ax.plot(*v["threshold"], "-", color=c, lw=1.5, label=name)
        positive &= _positive(v["threshold"][1])
        if "norm_before" in v:
            ax.plot(*v["norm_before"], ":", color=c, lw=1)
            positive &= _positive(v["norm_before"][1])
    if positive:
        ax.set_yscale("log")
    _mark_events(ax, events, label=False)
    ax.set_xlabel("samples")
    ax.set_ylabel("gradient L2 norm")
    ax.set_title("Threshold per layer (solid) and norm before shaping (dotted)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_loss(series: ShapingSeries, events: List[dict], path: str) -> Optional[str]:
    if series.loss is None or not len(series.loss[0]):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(*series.loss, "-", marker=".", ms=3, lw=1.2, color="tab:blue", label="train loss")
    y = series.loss[1][np.isfinite(series.loss[1])]
    if len(y) and y.min() > 0 and y.max() / y.min() > 100:
        ax.set_yscale("log")
    _mark_events(ax, events)
    ax.set_xlabel("samples")
    ax.set_ylabel("loss")
    ax.set_title("Training loss with gradient-shaping events")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(csv_dir: str, out_dir: str, spike_log: Optional[str] = None, n_layers: int = 8) -> List[str]:
    """Every plot whose data is present; returns the files written."""
    series = load_series(csv_dir)
    events = read_spike_log(spike_log)
    os.makedirs(out_dir, exist_ok=True)
    written = [plot_global_norm(series, events, os.path.join(out_dir, "global_norm.png")),
               plot_ratio_heatmap(series, os.path.join(out_dir, "layer_ratio.png")),
               plot_thresholds(series, events, os.path.join(out_dir, "thresholds.png"), n_layers),
               plot_loss(series, events, os.path.join(out_dir, "loss.png"))]
    return [p for p in written if p]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv-dir", required=True, help="csv_monitor directory: <output_path>/<job_name>")
    ap.add_argument("--spike-log", default=None, help="gradient_shaping.spike_log JSONL file")
    ap.add_argument("--out", default="shaping_plots", help="output directory for the PNGs")
    ap.add_argument("--layers", type=int, default=8, help="layers in thresholds.png")
    args = ap.parse_args(argv)
    written = plot_all(args.csv_dir, args.out, args.spike_log, args.layers)
    if not written:
        print(f"no gradient-shaping series found under {args.csv_dir}", file=sys.stderr)
        return 1
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
