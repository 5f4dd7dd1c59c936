"""Spike-aware step skipping: drop an optimizer update whose gradient norm (or loss) jumps far
above its recent history, instead of only shaping it.

The rule is OLMo-core's ``SkipStepOptimizer`` (``src/olmo_core/optim/skip_step_optimizer.py``,
allenai/OLMo-core): a value x_t is a spike when

    x_t - mean(W) > z * std(W)

where W holds the previous ``window`` values (``rolling_interval_length`` = 128 there), std is
the unbiased sample standard deviation (``torch.std_mean``), z = ``sigma_factor`` = 6, and the
test is active once the history is long enough: OLMo-core skips nothing while its list, which
includes the current value, is shorter than ``max(20, window // 2)``; that is
``min_history = max(20, window // 2) - 1`` previous values here (63 at window 128). The test is
one-sided (only a jump *up* skips), as OLMo-core's. A fixed ``max_grad_norm`` threshold
(Megatron-LM's ``grad_norm_skip_threshold`` idea) can be used alone or with the z rules.

Which values enter the window. Every finite value, whether its step was skipped or not, as in
OLMo-core (its ``latest_grad_norm``/``latest_loss`` setters append before ``get_step_factor``
decides): otherwise a lasting change of scale (a new data mixture, the end of warmup) would be
a "spike" for ever and every later step would be skipped. A non-finite value never enters (it
would make mean and std NaN for ``window`` steps); the step is skipped for its non-finite
gradient anyway. A non-finite *loss* with a finite gradient counts as a loss spike once the
loss rule is active (OLMo-core's ``<=`` test is False for NaN, so it skips too).

Everything here is tensors on the statistics device: :meth:`SpikeSkip.decide` returns the
decision as a 0-d int64 tensor of bit flags, and the caller reads it together with the
finiteness check in the one host synchronisation the shaping step already makes. The state
(:meth:`SpikeSkip.state_dict`) is small and identical on every rank (its inputs are globally
reduced statistics); it is saved with the shaper state.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

STAT_DTYPE = torch.float64

# Decision bits (a step is skipped when any of NONFINITE .. MAX_GRAD_NORM is set).
NONFINITE = 1            # the gradient is not finite (checked by the shaping step itself)
GRAD_NORM_SPIKE = 2      # grad norm > mean + grad_norm_z * std of its window
LOSS_SPIKE = 4           # loss > mean + loss_z * std of its window (or not finite)
MAX_GRAD_NORM = 8        # grad norm > max_grad_norm
# Information only (above megatron_shaping.core.VETO_MASK: the session does not skip for them).
NO_LOSS = 256            # loss rule on but no rank observed a loss this step
LOSS_NONFINITE = 512     # the observed loss is not finite (a LOSS_SPIKE once the rule is active)
SKIP_BITS = NONFINITE | GRAD_NORM_SPIKE | LOSS_SPIKE | MAX_GRAD_NORM
SPIKE_BITS = GRAD_NORM_SPIKE | LOSS_SPIKE | MAX_GRAD_NORM

REASONS = ((NONFINITE, "nonfinite"), (GRAD_NORM_SPIKE, "grad_norm_z"), (LOSS_SPIKE, "loss_z"),
           (MAX_GRAD_NORM, "max_grad_norm"))

STATE_VERSION = 1


def reasons(code: int) -> Tuple[str, ...]:
    """Names of the skip reasons set in a decision code."""
    return tuple(name for bit, name in REASONS if code & bit)


def default_min_history(window: int) -> int:
    """OLMo-core's warm-up of the rule in previous values: ``max(20, window // 2) - 1``, capped
    at ``window`` (OLMo-core never activates for windows under 19; we do, once full)."""
    return min(window, max(20, window // 2) - 1)


class RollingWindow:
    """The last ``size`` values of a series, oldest first, in a float64 tensor.

    Kept in chronological order (the valid values are the last ``len(self)`` entries) so that
    mean and std are computed over the same values in the same order after a checkpoint load:
    a resumed run decides bit for bit as the uninterrupted one."""

    def __init__(self, size: int, device=None):
        self.size = int(size)
        self.buf = torch.zeros(self.size, dtype=STAT_DTYPE, device=device)
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def values(self) -> torch.Tensor:
        return self.buf[self.size - self.n:]

    def std_mean(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.std_mean(self.values())        # unbiased std, as OLMo-core

    def push(self, x: torch.Tensor) -> None:
        """Append a 0-d tensor (no host synchronisation)."""
        self.buf = torch.cat([self.buf[1:], x.reshape(1).to(self.buf)])
        self.n = min(self.n + 1, self.size)

    def load(self, values: torch.Tensor) -> None:
        """Replace the contents by ``values`` (oldest first); keeps the last ``size`` of them."""
        values = values.reshape(-1)[-self.size:].to(self.buf)
        self.buf = torch.cat([torch.zeros(self.size - values.numel(), dtype=STAT_DTYPE, device=self.buf.device),
                              values])
        self.n = values.numel()


class SpikeSkip:
    """The skip rule and its rolling windows. ``cfg`` has ``grad_norm_z``, ``loss_z``,
    ``window``, ``min_history`` (None: :func:`default_min_history`) and ``max_grad_norm``."""

    def __init__(self, cfg, device=None):
        self.grad_norm_z = None if cfg.grad_norm_z is None else float(cfg.grad_norm_z)
        self.loss_z = None if cfg.loss_z is None else float(cfg.loss_z)
        self.max_grad_norm = None if cfg.max_grad_norm is None else float(cfg.max_grad_norm)
        self.window = int(cfg.window)
        self.min_history = default_min_history(self.window) if cfg.min_history is None else int(cfg.min_history)
        self.grad_norms = RollingWindow(self.window, device) if self.grad_norm_z is not None else None
        self.losses = RollingWindow(self.window, device) if self.loss_z is not None else None
        self.skips = 0                  # steps skipped by this rule (not for a non-finite gradient)
        #: The last decision's inputs and thresholds (0-d tensors, NaN where a rule was inactive)
        #: for messages and the spike log; read them only when a step was skipped.
        self.last: Dict[str, torch.Tensor] = {}
        self.last_history: Dict[str, int] = {}
        self._pending: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    @property
    def needs_loss(self) -> bool:
        return self.loss_z is not None

    def __repr__(self) -> str:
        return (f"SpikeSkip(grad_norm_z={self.grad_norm_z}, loss_z={self.loss_z}, window={self.window}, "
                f"min_history={self.min_history}, max_grad_norm={self.max_grad_norm})")

    # ------------------------------------------------------------------ the decision
    def decide(self, grad_norm: torch.Tensor, loss: Optional[torch.Tensor] = None,
               has_loss: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Bit flags (0-d int64 tensor) for a step with global gradient norm ``grad_norm`` (0-d,
        before shaping) and mean ``loss`` (0-d; None: no rank observed one; ``has_loss``, a 0-d
        bool tensor, says so on the device when it is only known there). No host sync: the
        Python-side conditions depend only on window lengths. Call :meth:`commit` with the
        host value of the code, combined with NONFINITE, once it is known."""
        gn = grad_norm.to(STAT_DTYPE)
        finite = torch.isfinite(gn)
        code = torch.zeros((), dtype=torch.int64, device=gn.device)
        nan = torch.full((), float("nan"), dtype=STAT_DTYPE, device=gn.device)
        last = {"grad_norm": gn, "grad_norm_mean": nan, "grad_norm_std": nan, "grad_norm_threshold": nan,
                "loss": nan, "loss_mean": nan, "loss_std": nan, "loss_threshold": nan}
        if self.grad_norms is not None and len(self.grad_norms) >= self.min_history:
            std, mean = self.grad_norms.std_mean()
            thr = mean + self.grad_norm_z * std
            last.update(grad_norm_mean=mean, grad_norm_std=std, grad_norm_threshold=thr)
            code = code | ((finite & (gn - mean > self.grad_norm_z * std)).long() * GRAD_NORM_SPIKE)
        if self.max_grad_norm is not None:
            code = code | ((finite & (gn > self.max_grad_norm)).long() * MAX_GRAD_NORM)
        lv = None
        if self.losses is not None:
            if loss is None:
                code = code | NO_LOSS
            else:
                lv = loss.to(device=gn.device, dtype=STAT_DTYPE).reshape(())
                last["loss"] = lv
                lcode = (~torch.isfinite(lv)).long() * LOSS_NONFINITE
                if len(self.losses) >= self.min_history:
                    std, mean = self.losses.std_mean()
                    last.update(loss_mean=mean, loss_std=std, loss_threshold=mean + self.loss_z * std)
                    # not (x - mean <= z std): a NaN/inf loss is a spike too, as in OLMo-core
                    lcode = lcode | ((~(lv - mean <= self.loss_z * std)).long() * LOSS_SPIKE)
                if has_loss is not None:
                    lcode = torch.where(has_loss, lcode, torch.full_like(lcode, NO_LOSS))
                code = code | lcode
        self.last = last
        #: Window lengths the last decision used (previous values only).
        self.last_history = {"grad_norm": len(self.grad_norms or ()), "loss": len(self.losses or ())}
        self._pending = (gn, lv)
        return code

    def commit(self, code: int) -> None:
        """After the host has the final code (NONFINITE included): push the step's finite
        values into the windows (skipped or not) and count a spike skip."""
        if self._pending is None:
            return
        gn, lv = self._pending
        self._pending = None
        if self.grad_norms is not None and not code & NONFINITE:
            self.grad_norms.push(gn)
        if self.losses is not None and lv is not None and not code & (LOSS_NONFINITE | NO_LOSS):
            self.losses.push(lv)
        if code & SPIKE_BITS and not code & NONFINITE:
            self.skips += 1

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"version": STATE_VERSION, "window": self.window, "skips": self.skips,
                "grad_norms": None if self.grad_norms is None else self.grad_norms.values().detach().cpu().clone(),
                "losses": None if self.losses is None else self.losses.values().detach().cpu().clone()}

    @staticmethod
    def check_state(sd: Any, source: str) -> None:
        """ValueError naming ``source`` unless ``sd`` is a state saved by :meth:`state_dict`."""
        if not isinstance(sd, dict) or sd.get("version") != STATE_VERSION:
            raise ValueError(f"{source}: spike-skip state has an unknown format "
                             f"(version {sd.get('version') if isinstance(sd, dict) else type(sd).__name__!r})")
        for k in ("grad_norms", "losses"):
            t = sd.get(k)
            if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_floating_point()):
                raise ValueError(f"{source}: spike-skip state field {k!r} is not a 1-D float tensor")
        if not isinstance(sd.get("skips"), int) or sd["skips"] < 0:
            raise ValueError(f"{source}: spike-skip state field 'skips' is not a count")

    def load_state_dict(self, sd: Optional[Dict[str, Any]], source: str = "state_dict") -> None:
        """Restore the windows and the count. ``None`` (a checkpoint from before spike skipping
        or saved with it off) empties the windows: the rule re-warms over ``min_history``
        steps. A window saved with another size keeps its last ``window`` values; a window the
        checkpoint lacks (a rule switched on since) starts empty."""
        if sd is None:
            self.reset()
            return
        self.check_state(sd, source)
        for win, k in ((self.grad_norms, "grad_norms"), (self.losses, "losses")):
            if win is None:
                continue
            t = sd.get(k)
            if t is None:
                win.load(torch.zeros(0, dtype=STAT_DTYPE))
            else:
                win.load(t)
        self.skips = int(sd["skips"])
        self._pending = None

    def reset(self) -> None:
        for win in (self.grad_norms, self.losses):
            if win is not None:
                win.load(torch.zeros(0, dtype=STAT_DTYPE))
        self.skips = 0
        self._pending = None
