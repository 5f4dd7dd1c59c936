"""A rank-0 progress display for pretraining: a tqdm bar on a terminal, plain log lines otherwise.

    progress = Progress(total_iters, enabled=rank == 0, initial=start_iter)
    for it in range(start_iter, total_iters):
        loss = engine.train_batch(data_iter)
        progress.update(it + 1, loss=float(loss), lr=engine.get_lr()[0], tokens=tokens_per_iter,
                        loss_scale=engine.gradient_shaping.last_loss_scale,
                        shaped_fraction=shaped_fraction(engine.gradient_shaping.session.last))
    progress.close()

(``shaped_fraction`` is in :mod:`megatron_shaping.monitoring`.) Disabled
(other ranks) every method returns at once. On a terminal the bar shows the latest values as a
postfix; when the output is a file or pipe (batch jobs, ``deepspeed`` launcher logs) a line like

    [train] iter 200/1000 (20.0%) | loss 3.2140 | lr 3.00e-04 | 41.2k tok/s | loss scale 65536 | shaped 0.12 | 0:01:40 elapsed, 0:06:40 left

is written every ``log_every`` iterations (default: about 1 % of the run, at least every 1) and
at the last one. tokens/s is measured over the iterations since the previous line (or the
bar's refresh); ``tokens`` is the number of tokens of the iterations since the previous update.
tqdm is optional: without it the plain lines are used on a terminal too.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Optional, TextIO


def _fmt_duration(s: float) -> str:
    if not math.isfinite(s) or s < 0:
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt_rate(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def format_metrics(loss: Optional[float] = None, lr: Optional[float] = None, tokens_per_s: Optional[float] = None,
                   loss_scale: Optional[float] = None, shaped_fraction: Optional[float] = None) -> str:
    """``loss 3.2140 | lr 3.00e-04 | 41.2k tok/s | loss scale 65536 | shaped 0.12`` (absent values left out)."""
    parts = []
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if lr is not None:
        parts.append(f"lr {lr:.2e}")
    if tokens_per_s is not None:
        parts.append(f"{_fmt_rate(tokens_per_s)} tok/s")
    if loss_scale is not None:
        parts.append(f"loss scale {loss_scale:g}")
    if shaped_fraction is not None and not math.isnan(shaped_fraction):
        parts.append(f"shaped {shaped_fraction:.2f}")
    return " | ".join(parts)


class Progress:
    """Progress of ``total`` iterations. ``enabled=False`` (ranks other than 0) does nothing.

    ``stream``: where to write (default stderr, like tqdm). ``use_bar``: force the tqdm bar on
    or off (default: on when ``stream`` is a terminal and tqdm is installed).
    """

    def __init__(self, total: int, enabled: bool = True, initial: int = 0, log_every: Optional[int] = None,
                 desc: str = "train", stream: Optional[TextIO] = None, use_bar: Optional[bool] = None):
        self.enabled = bool(enabled)
        self.total = int(total)
        self.desc = desc
        self.step = int(initial)
        self.log_every = max(1, int(log_every) if log_every else max(1, self.total // 100))
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        self._t0 = time.perf_counter()
        self._start_step = self.step
        self._mark_time = self._t0            # start of the current tokens/s window
        self._mark_tokens = 0.0
        self._last_line_step = self.step
        self.tokens_per_s: Optional[float] = None
        if not self.enabled:
            return
        if use_bar is None:
            use_bar = bool(getattr(self.stream, "isatty", lambda: False)())
        if use_bar:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=self.total, initial=self.step, desc=desc, file=self.stream,
                                dynamic_ncols=True, unit="it", smoothing=0.1)

    def update(self, step: int, loss: Optional[float] = None, lr: Optional[float] = None,
               tokens: Optional[float] = None, loss_scale: Optional[float] = None,
               shaped_fraction: Optional[float] = None) -> None:
        """Iteration ``step`` (1-based count of iterations done) finished with these values."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if tokens is not None:
            self._mark_tokens += float(tokens)
        window = now - self._mark_time
        # Refresh tokens/s at most every half second (a bar update per iteration would
        # otherwise show per-iteration jitter), and at every plain line.
        due_line = self.bar is None and (step - self._last_line_step >= self.log_every or step >= self.total)
        if tokens is not None and window > 0 and (window >= 0.5 or due_line):
            self.tokens_per_s = self._mark_tokens / window
            self._mark_time, self._mark_tokens = now, 0.0
        metrics = format_metrics(loss, lr, self.tokens_per_s, loss_scale, shaped_fraction)
        if self.bar is not None:
            self.bar.update(max(0, step - self.step))
            self.bar.set_postfix_str(metrics, refresh=False)
        elif due_line:
            self._write_line(step, metrics, now)
            self._last_line_step = step
        self.step = step

    def _write_line(self, step: int, metrics: str, now: float) -> None:
        elapsed = now - self._t0
        done = step - self._start_step
        left = elapsed / done * (self.total - step) if done > 0 else float("nan")
        pct = 100.0 * step / self.total if self.total else 100.0
        line = f"[{self.desc}] iter {step}/{self.total} ({pct:.1f}%)"
        if metrics:
            line += " | " + metrics
        line += f" | {_fmt_duration(elapsed)} elapsed, {_fmt_duration(left)} left"
        self.stream.write(line + "\n")
        self.stream.flush()

    def write(self, msg: str) -> None:
        """A message that does not break the bar (tqdm.write) or a plain line."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            self.stream.write(msg + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
