#!/usr/bin/env python
"""Tables (markdown) and plots from a grid's results.jsonl (tools/experiments/run_grid.py).

    python tools/experiments/analyze.py --runs runs/grid --plots docs/results > runs/grid/tables.md

Definitions (also in docs/RESULTS.md):
- smoothed train loss: running mean over the last 10 steps (same batches in every run, so the
  batch noise is common to all runs);
- loss spike: a step t >= 10 whose train loss exceeds 1.5x the median of the previous 20 steps
  (computed by the runner; ``loss_spikes_1p2`` with 1.2x);
- diverged: a non-finite loss, or the final (last-10-step mean) train loss above the first step's
  loss, or the final validation loss above ln(vocab) (the uniform predictor), or stopped early;
- tokens to target: first step at which the smoothed train loss <= target, times tokens per step;
  target = the final smoothed train loss of the same optimizer without shaping at the base LR
  (mean over seeds); '-' when not reached;
- stable LR: every seed not diverged and no 1.5x loss spike;
- peak excess train loss (spike conditions): max over steps of (train loss with injection - train
  loss of the same shaper and seed without injection); the batches are identical, so this is the
  damage the injected spike did, step by step.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_shaping.shapers import REGISTRY  # noqa: E402

#: Table and plot order: the unshaped baseline, then every registered method (registry order).
SHAPERS = ["none"] + list(REGISTRY)


def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def load(path):
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "error" in r:
            rows.append(r)
            continue
        r["train_loss"] = [num(x) for x in r["train_loss"]]
        rows.append(r)
    return rows


def smooth(xs, w=10):
    out = []
    for i in range(len(xs)):
        win = [x for x in xs[max(0, i - w + 1):i + 1] if math.isfinite(x)]
        out.append(sum(win) / len(win) if win else float("nan"))
    return out


def ms(vals, fmt="{:.3f}"):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    fin = [v for v in vals if math.isfinite(v)]
    if len(fin) < len(vals):
        return "nan/inf" if not fin else fmt.format(statistics.mean(fin)) + f" ({len(vals) - len(fin)} nan)"
    if len(fin) == 1:
        return fmt.format(fin[0])
    return fmt.format(statistics.mean(fin)) + " ± " + fmt.format(statistics.stdev(fin))


def tokens_to(r, target):
    s = smooth(r["train_loss"])
    for i, x in enumerate(s):
        if math.isfinite(x) and x <= target:
            return (i + 1) * r["tokens_per_step"]
    return None


def group(rows, **kw):
    return [r for r in rows if "error" not in r and all(r.get(k) == v for k, v in kw.items())]


def sweep_runs(rows, shaper, lr):
    """AdamW fp32 runs without injection at this LR: the sweep plus the base-LR condition."""
    return [r for r in rows if "error" not in r and r["condition"] in ("base", "lr_sweep") and r["optimizer"] == "AdamW"
            and r["shaper"] == shaper and r["lr"] == lr and r["precision"] == "fp32" and r["spikes"] == "none"]


def table(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in ln) + " |" for ln in lines]
    return "\n".join(out)


def cell_stats(rs):
    return dict(val=ms([r["final_val_loss"] for r in rs]),
                ppl=ms([r["final_val_ppl"] for r in rs], "{:.1f}"),
                spikes=ms([r["loss_spikes"] for r in rs], "{:.1f}"),
                spikes12=ms([r["loss_spikes_1p2"] for r in rs], "{:.1f}"),
                div=f"{sum(r['diverged'] for r in rs)}/{len(rs)}",
                skipped=ms([r["skipped_steps"] + r.get("shaping_skipped", 0) for r in rs], "{:.1f}"),
                wall=ms([r["wall_time_s"] for r in rs], "{:.1f}"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default="runs/grid")
    p.add_argument("--plots", default="docs/results")
    args = p.parse_args()
    rows = load(Path(args.runs) / "results.jsonl")
    meta = json.loads((Path(args.runs) / "meta.json").read_text())
    base_lr = meta["base_lr"]
    out = []
    errors = [r for r in rows if "error" in r]
    ok = [r for r in rows if "error" not in r]
    out.append(f"Runs finished: {len(ok)} (+{len(errors)} errors) of {meta['runs_planned']} planned; "
               f"total train wall time {sum(r['wall_time_s'] for r in ok) / 60:.1f} min.\n")
    for r in errors:
        out.append(f"- ERROR {r['id']}: {r['error']}")

    # ---- targets per optimizer: final smoothed loss of no shaping at base LR
    targets = {}
    for opt in ("AdamW", "Adam"):
        rs = group(rows, condition="base", optimizer=opt, shaper="none")
        if rs:
            targets[opt] = statistics.mean(smooth(r["train_loss"])[-1] for r in rs)

    # ---- base LR
    for opt in ("AdamW", "Adam"):
        lines = []
        base_tok = None
        for s in SHAPERS:
            rs = group(rows, condition="base", optimizer=opt, shaper=s)
            if not rs:
                continue
            c = cell_stats(rs)
            toks = [tokens_to(r, targets[opt]) for r in rs] if opt in targets else []
            tok = (statistics.mean(toks) if toks and all(t is not None for t in toks) else None)
            if s == "none":
                base_tok = tok
            save = f"{100 * (1 - tok / base_tok):+.1f} %" if tok and base_tok else "-"
            acted = ms([r["steps_with_scaled_groups"] for r in rs], "{:.0f}") if s != "none" else "-"
            lines.append([s, c["val"], c["ppl"], acted, c["spikes"], c["spikes12"], c["div"],
                          f"{tok / 1e3:.1f}k" if tok else f"not reached ({sum(t is None for t in toks)}/{len(toks)})",
                          save, c["wall"]])
        if lines:
            out.append(f"\n### Base LR {base_lr:g}, {opt} (fp32)\n")
            out.append(f"Target train loss (no shaping, {opt}, final smoothed): {targets.get(opt, float('nan')):.4f}\n")
            out.append(table(["shaper", "final val loss", "val ppl", "steps with some group scaled down (of 60)",
                              "loss spikes 1.5x", "spikes 1.2x", "diverged",
                              "tokens to target", "token saving vs none", "train wall s"], lines))

    # ---- spikes
    for kind in ("x5@2%", "x100rare"):
        lines = []
        for s in SHAPERS:
            rs = group(rows, condition="spikes", shaper=s, spikes=kind)
            b = group(rows, condition="base", optimizer="AdamW", shaper=s)
            if not rs:
                continue
            c = cell_stats(rs)
            bv = {r["seed"]: r["final_val_loss"] for r in b}
            bc = {r["seed"]: r["train_loss"] for r in b}
            deltas = [r["final_val_loss"] - bv[r["seed"]] for r in rs if r["seed"] in bv]
            peaks = [max((x - y for x, y in zip(r["train_loss"], bc[r["seed"]])), default=float("nan"))
                     for r in rs if r["seed"] in bc]
            lines.append([s, c["val"], ms(deltas, "{:+.3f}"), ms(peaks, "{:+.3f}"), c["spikes"], c["spikes12"],
                          c["div"], c["skipped"]])
        if lines:
            out.append(f"\n### Injected gradient spikes {kind} (AdamW, base LR, fp32)\n")
            out.append(table(["shaper", "final val loss", "Δ val vs no injection (same seed)",
                              "peak excess train loss vs no injection", "loss spikes 1.5x",
                              "spikes 1.2x", "diverged", "skipped steps"], lines))

    # ---- LR sweep
    lrs = sorted({r["lr"] for r in ok if r["condition"] in ("lr_sweep",) or
                  (r["condition"] == "base" and r["optimizer"] == "AdamW")})
    lines, stable_lines = [], []
    for s in SHAPERS:
        cells, stable = [], []
        best = (float("inf"), None)
        for lr in lrs:
            rs = sweep_runs(rows, s, lr)
            if not rs:
                cells.append("-")
                continue
            v = [r["final_val_loss"] for r in rs]
            d = sum(r["diverged"] for r in rs)
            sp = sum(r["loss_spikes"] for r in rs)
            cells.append(ms(v) + (f" **D{d}**" if d else "") + (f" s{sp}" if sp else ""))
            if d == 0 and sp == 0:
                stable.append(lr)
            mv = statistics.mean(x if math.isfinite(x) else 1e9 for x in v)
            if mv < best[0]:
                best = (mv, lr)
        lines.append([s] + cells)
        contiguous = []
        for lr in lrs:
            if lr not in stable:
                break
            contiguous.append(lr)
        n_runs = sum(len(sweep_runs(rows, s, lr)) for lr in lrs)
        n_div = sum(sum(r["diverged"] for r in sweep_runs(rows, s, lr)) for lr in lrs)
        stable_lines.append([s, ", ".join(f"{x:g}" for x in stable) or "none",
                             f"{min(contiguous):g} – {max(contiguous):g}" if contiguous else "-",
                             f"{n_div}/{n_runs}",
                             f"{best[1]:g} ({best[0]:.3f})" if best[1] else "-"])
    if any(c != "-" for ln in lines for c in ln[1:]):
        out.append("\n### LR sweep (AdamW, fp32): final val loss, mean ± sd over seeds; **Dk** = k seeds diverged, "
                   "sN = N loss spikes (1.5x) summed over seeds\n")
        out.append(table(["shaper"] + [f"lr {x:g}" for x in lrs], lines))
        peak_lines = []
        for s in SHAPERS:
            cells = []
            for lr in lrs:
                rs = sweep_runs(rows, s, lr)
                pk = [max((x for x in smooth(r["train_loss"], 5) if math.isfinite(x)), default=float("inf"))
                      for r in rs]
                cells.append(ms(pk, "{:.2f}") if rs else "-")
            peak_lines.append([s] + cells)
        out.append("\n### LR sweep: peak train loss (max of the 5-step running mean; the initial loss is ~8.3 = ln V), "
                   "mean ± sd over seeds: the size of the early-training blow-up\n")
        out.append(table(["shaper"] + [f"lr {x:g}" for x in lrs], peak_lines))
        out.append("\n### Stable learning rates (every seed: not diverged, no 1.5x loss spike)\n")
        out.append(table(["shaper", "stable LRs", "stable range from the smallest LR up (contiguous)",
                          "diverged runs in the sweep", "best LR (val loss)"], stable_lines))

    # ---- precision
    lines = []
    for s in SHAPERS:
        cols = [s]
        for prec in ("fp32", "fp8", "fp16"):
            cond = "base" if prec == "fp32" else prec
            rs = group(rows, condition=cond, optimizer="AdamW", shaper=s, precision=prec)
            c = cell_stats(rs) if rs else None
            cols += [c["val"], c["spikes"], c["div"], c["skipped"]] if c else ["-"] * 4
        lines.append(cols)
    out.append("\n### Precision (AdamW, base LR): fp32 vs simulated FP8 vs fp16 with dynamic loss scaling\n")
    out.append(table(["shaper"] + [f"{p} {k}" for p in ("fp32", "fp8", "fp16")
                                   for k in ("val loss", "spikes", "diverged", "skipped")], lines))
    # low-precision gain of each shaper over 'none' vs its fp32 gain
    lines = []
    for s in SHAPERS[1:]:
        cols = [s]
        for prec in ("fp32", "fp8", "fp16"):
            cond = "base" if prec == "fp32" else prec
            a = {r["seed"]: r["final_val_loss"] for r in group(rows, condition=cond, optimizer="AdamW", shaper=s,
                                                               precision=prec)}
            b = {r["seed"]: r["final_val_loss"] for r in group(rows, condition=cond, optimizer="AdamW",
                                                               shaper="none", precision=prec)}
            cols.append(ms([a[k] - b[k] for k in a if k in b], "{:+.3f}"))
        lines.append(cols)
    out.append("\nFinal val loss of each shaper minus no shaping, same seed and precision (negative = better):\n")
    out.append(table(["shaper", "fp32", "fp8", "fp16"], lines))
    print("\n".join(out))
    plots(rows, Path(args.plots), base_lr, lrs)


def plots(rows, outdir, base_lr, lrs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    outdir.mkdir(parents=True, exist_ok=True)
    colors = {s: plt.cm.tab10(i) for i, s in enumerate(SHAPERS)}
    style = {s: ("--" if s == "none" else "-") for s in SHAPERS}

    def curves(ax, rs_by_shaper, title, ylim=None):
        for s, rs in rs_by_shaper.items():
            if not rs:
                continue
            n = min(len(r["train_loss"]) for r in rs)
            sm = [smooth(r["train_loss"]) for r in rs]
            mean = [statistics.mean(c[i] for c in sm) for i in range(n)]
            ax.plot(range(1, n + 1), mean, style[s], color=colors[s], label=s, lw=1.4)
            if len(rs) > 1:
                lo = [min(c[i] for c in sm) for i in range(n)]
                hi = [max(c[i] for c in sm) for i in range(n)]
                ax.fill_between(range(1, n + 1), lo, hi, color=colors[s], alpha=0.12)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (10-step mean)")
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)

    def by_shaper(**kw):
        return {s: group(rows, shaper=s, **kw) for s in SHAPERS}

    # base
    fig, axs = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, opt in zip(axs, ("AdamW", "Adam")):
        curves(ax, by_shaper(condition="base", optimizer=opt), f"base LR {base_lr:g}, {opt}, fp32 "
               "(mean over seeds, band = min-max)", ylim=(5.0, 8.5))
    axs[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(outdir / "base_lr.png", dpi=110)
    plt.close(fig)

    # spikes: excess train loss over the same shaper/seed without injection (same batches)
    fig, axs = plt.subplots(1, 2, figsize=(14, 4.8))
    for ax, kind in zip(axs, ("x5@2%", "x100rare")):
        for s in SHAPERS:
            rs = group(rows, condition="spikes", optimizer="AdamW", shaper=s, spikes=kind, precision="fp32")
            base = {r["seed"]: r["train_loss"] for r in group(rows, condition="base", optimizer="AdamW", shaper=s)}
            ex = [[x - y for x, y in zip(r["train_loss"], base[r["seed"]])] for r in rs if r["seed"] in base]
            if not ex:
                continue
            n = min(len(e) for e in ex)
            ax.plot(range(1, n + 1), [statistics.mean(e[i] for e in ex) for i in range(n)], style[s],
                    color=colors[s], label=s, lw=1.3)
            if s == "none":
                for r in rs:
                    for st in r["spike_steps"]:
                        ax.axvline(st + 1, color="grey", ls=":", lw=0.8)
        ax.set_title(f"injected gradient spikes {kind}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("excess train loss")
        ax.grid(alpha=0.3)
    axs[1].legend(fontsize=8)
    fig.suptitle("train loss minus the same shaper and seed without injection (AdamW, base LR, fp32; "
                 "mean over seeds; dotted = spike steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(outdir / "spikes.png", dpi=110)
    plt.close(fig)

    # LR sweep
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, s in enumerate(SHAPERS):
        xs, ys, div = [], [], []
        for lr in lrs:
            rs = sweep_runs(rows, s, lr)
            if not rs:
                continue
            v = [min(r["final_val_loss"], 9.0) if math.isfinite(r["final_val_loss"]) else 9.0 for r in rs]
            xs.append(lr * (1 + 0.03 * (i - 4)))
            ys.append(statistics.mean(v))
            div.append(any(r["diverged"] for r in rs))
        if xs:
            ax.plot(xs, ys, style[s], marker="o", color=colors[s], label=s, lw=1.2, ms=4)
            ax.scatter([x for x, d in zip(xs, div) if d], [y for y, d in zip(ys, div) if d], marker="x", s=80,
                       color=colors[s], zorder=5)
    ax.axhline(math.log(4096), color="grey", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (AdamW)")
    ax.set_ylabel("final val loss (mean over seeds; capped at 9)")
    ax.set_title("LR sweep (x = some seed diverged; dotted = ln V, uniform predictor)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(outdir / "lr_sweep.png", dpi=110)
    plt.close(fig)

    # LR sweep: curves at the high learning rates
    high = [lr for lr in lrs if lr >= 0.03]
    if high:
        fig, axs = plt.subplots(1, len(high), figsize=(5.2 * len(high), 4.6), squeeze=False)
        for ax, lr in zip(axs[0], high):
            for s in SHAPERS:
                for r in group(rows, condition="lr_sweep", optimizer="AdamW", shaper=s, lr=lr, spikes="none"):
                    ax.plot(range(1, len(r["train_loss"]) + 1), smooth(r["train_loss"], 5), style[s],
                            color=colors[s], lw=1.0, label=s if r["seed"] == 1 else None)
            ax.set_title(f"AdamW lr {lr:g} (every seed; 5-step mean; a line that stops = stopped as diverged)",
                         fontsize=8)
            ax.set_xlabel("step")
            ax.set_ylabel("train loss")
            ax.set_ylim(5.0, 12.5)
            ax.grid(alpha=0.3)
        axs[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(outdir / "lr_sweep_curves.png", dpi=100)
        plt.close(fig)

    # precision
    fig, axs = plt.subplots(1, 3, figsize=(18, 4.8))
    for ax, prec in zip(axs, ("fp32", "fp8", "fp16")):
        cond = "base" if prec == "fp32" else prec
        curves(ax, by_shaper(condition=cond, optimizer="AdamW", precision=prec),
               f"AdamW base LR, {prec}" + (" (simulated)" if prec == "fp8" else
                                           " (dynamic loss scale)" if prec == "fp16" else ""), ylim=(5.0, 8.5))
    axs[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(outdir / "precision.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
