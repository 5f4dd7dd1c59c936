"""The monitor's per-layer numbers: running statistic, threshold, ratio, shaped fraction.

Hand-derived values on one tensor whose gradient norm we set directly (the gradient is a unit
vector times the wanted norm), one process, no DeepSpeed engine.
"""
import math
from typing import NamedTuple

import pytest
import torch

from megatron_shaping import GradientShaper
from megatron_shaping.integrations.deepspeed import monitor as M
from megatron_shaping import monitoring
from megatron_shaping.shapers import REGISTRY
from megatron_shaping.shapers.base import STAT, STAT_DTYPE, THRESHOLD, Plan, Shaper, SUMSQ

U = torch.tensor([0.6, 0.0, -0.8, 0.0])        # unit vector: norm(c * U) = c


def run(spec, norms, n_params=1, **kw):
    """Shape a gradient of each norm in turn; returns the LayerStats of every step."""
    ps = [torch.nn.Parameter(torch.zeros(4)) for _ in range(n_params)]
    gs = GradientShaper([(f"w{i}", p) for i, p in enumerate(ps)], spec, **kw)
    out = []
    for n in norms:
        for i, p in enumerate(ps):
            p.grad = (U * n * (i + 1)).clone()
        prev = gs.state
        rec = gs.apply_()
        out.append(monitoring.layer_stats(gs.shaper, prev, gs.state, rec))
    return out


def val(ls, field, i=0):
    return float(getattr(ls, field)[i])


def test_spamp_stat_is_previous_tau_and_threshold_the_tau_used():
    n1, n2, n3 = 2.0, 3.0, 40.0
    s = run({"type": "spamp", "params": {"beta": 0.9}}, [n1, n2, n3])
    assert math.isnan(val(s[0], "stat")) and math.isnan(val(s[0], "ratio"))
    assert val(s[0], "threshold") == pytest.approx(n1)          # first step: tau_1 = n1
    assert val(s[1], "stat") == pytest.approx(n1)
    assert val(s[1], "threshold") == pytest.approx(n1)           # threshold_from previous
    assert val(s[1], "ratio") == pytest.approx(n2 / n1)
    tau2 = 0.9 * n1 + 0.1 * n2
    assert val(s[2], "stat") == pytest.approx(tau2)
    assert val(s[2], "ratio") == pytest.approx(n3 / tau2)
    # the projection puts the shaped norm on the tau-ball: norm_after == threshold
    assert val(s[2], "norm_after") == pytest.approx(tau2)
    assert val(s[2], "factor") == pytest.approx(tau2 / n3)


def test_spamp_current_threshold_includes_this_step():
    s = run({"type": "spamp", "params": {"beta": 0.9, "threshold_from": "current"}}, [2.0, 3.0])
    assert val(s[1], "stat") == pytest.approx(2.0)
    assert val(s[1], "threshold") == pytest.approx(0.9 * 2.0 + 0.1 * 3.0)


def test_gradient_stabilizer_stat_is_bias_corrected_ema_threshold_is_target_norm():
    b1, b2 = 0.6, 0.999
    n1, n2 = 2.0, 5.0
    s = run("gradient_stabilizer", [n1, n2])
    assert math.isnan(val(s[0], "stat"))
    assert val(s[0], "threshold") == pytest.approx(1.0)          # m_hat / sqrt(v_hat) = n1 / n1
    assert val(s[1], "stat") == pytest.approx(n1)                # m_hat_1 = n1
    m = b1 * (1 - b1) * n1 + (1 - b1) * n2
    v = b2 * (1 - b2) * n1 ** 2 + (1 - b2) * n2 ** 2
    target = (m / (1 - b1 ** 2)) / math.sqrt(v / (1 - b2 ** 2))
    assert val(s[1], "threshold") == pytest.approx(target)
    assert val(s[1], "norm_after") == pytest.approx(target)      # the shaped norm is the target
    assert val(s[1], "ratio") == pytest.approx(n2 / n1)


def test_zclip_stat_is_ema_mean_after_warmup_threshold_the_spike_test():
    z, eps = 0.5, 1e-6
    n = [1.0, 3.0, 10.0]
    s = run({"type": "zclip", "params": {"warmup_steps": 2, "max_grad_norm": None, "z_thresh": z}}, n)
    assert math.isnan(val(s[0], "stat")) and math.isnan(val(s[1], "stat"))
    assert math.isnan(val(s[1], "threshold"))
    mean = 2.0
    std = math.sqrt(((1 - mean) ** 2 + (3 - mean) ** 2) / 2)
    assert val(s[2], "stat") == pytest.approx(mean)
    assert val(s[2], "threshold") == pytest.approx(mean + z * (std + eps))
    assert val(s[2], "ratio") == pytest.approx(10.0 / mean)


def test_zclip_with_max_grad_norm_caps_the_threshold():
    s = run({"type": "zclip", "params": {"warmup_steps": 2, "max_grad_norm": 1.5}}, [1.0, 3.0, 10.0])
    assert val(s[0], "threshold") == pytest.approx(1.5)          # warmup: plain clipping at max_grad_norm
    assert val(s[2], "threshold") == pytest.approx(1.5)


def test_adagc_stat_is_gamma_threshold_lambda_gamma_after_warmup():
    s = run({"type": "adagc", "params": {"warmup_steps": 0, "lambda_rel": 1.1}}, [2.0, 7.0])
    assert val(s[1], "stat") == pytest.approx(2.0)               # gamma_1 = n1 (h = 1 on the first step)
    assert val(s[1], "threshold") == pytest.approx(2.2)
    assert val(s[1], "norm_after") == pytest.approx(2.2, rel=1e-6)
    s = run({"type": "adagc", "params": {"warmup_steps": 5}}, [2.0, 7.0])
    assert math.isnan(val(s[1], "threshold"))                    # warmup clips the global norm


def test_norm_clip_threshold_is_max_norm_no_stat():
    s = run({"type": "norm_clip", "params": {"max_norm": 0.5}}, [2.0])
    assert val(s[0], "threshold") == 0.5 and math.isnan(val(s[0], "stat"))
    assert val(s[0], "norm_after") == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("spec", ["entrywise_shrink", "agc", {"type": "value_clip", "params": {"clip_value": 0.1}}])
def test_methods_without_a_norm_statistic_report_none(spec):
    s = run(spec, [2.0, 3.0])
    for f in ("stat", "threshold", "ratio"):
        assert torch.isnan(getattr(s[1], f)).all()
    assert val(s[1], "norm_before") == pytest.approx(3.0)


def test_chain_stat_from_first_member_threshold_from_last():
    # agc first: no statistic (a later member's would describe an already-shaped gradient)
    s = run({"type": "chain", "shapers": [{"type": "agc"}, {"type": "spamp"}]}, [2.0, 3.0])
    assert torch.isnan(s[1].stat).all() and torch.isfinite(s[1].threshold).all()
    s = run({"type": "chain", "shapers": [{"type": "spamp", "params": {"beta": 0.5}},
                                          {"type": "norm_clip", "params": {"max_norm": 100.0},
                                           "granularity": "tensor"}]}, [2.0, 3.0])
    assert val(s[1], "stat") == pytest.approx(2.0) and val(s[1], "threshold") == 100.0


def test_chain_member_at_coarser_granularity_is_not_reported_per_layer():
    spec = {"type": "chain", "shapers": [{"type": "spamp"},
                                         {"type": "norm_clip", "params": {"max_norm": 100.0}, "granularity": "global"}]}
    s = run(spec, [2.0, 3.0], n_params=2)
    assert val(s[1], "threshold", 0) == pytest.approx(2.0) and val(s[1], "threshold", 1) == pytest.approx(4.0)


class TauState(NamedTuple):
    tau: torch.Tensor
    count: torch.Tensor


class Unlisted(Shaper):
    """A shaper without its own diagnostics: the default of Shaper.diagnostics finds ``tau``."""
    name = "unlisted"
    needs = frozenset({SUMSQ})

    def init(self, layout):
        z = torch.zeros(layout.num_groups, dtype=STAT_DTYPE)
        return TauState(z, z.clone())

    def update(self, stats, state):
        return Plan(torch.ones_like(stats.sumsq)), TauState(stats.norm(), state.count + 1)


def test_generic_fallback_reads_a_tau_field():
    s = run(Unlisted(), [2.0, 6.0])
    assert math.isnan(val(s[0], "stat"))
    assert val(s[1], "stat") == pytest.approx(2.0) and val(s[1], "ratio") == pytest.approx(3.0)


def test_unknown_previous_state_gives_no_stat():
    p = torch.nn.Parameter(torch.zeros(4))
    gs = GradientShaper([("w", p)], "spamp")
    p.grad = U * 2.0
    rec = gs.apply_()
    ls = monitoring.layer_stats(gs.shaper, None, gs.state, rec)
    assert torch.isnan(ls.stat).all() and torch.isnan(ls.threshold).all()
    assert val(ls, "norm_before") == pytest.approx(2.0)


def test_shaped_fraction():
    f = torch.tensor([1.0, 1.0 + 1e-7, 0.5, 1.0 - 2e-6], dtype=torch.float64)
    assert monitoring.shaped_fraction(f) == 0.5
    assert math.isnan(monitoring.shaped_fraction(None))


def test_plot_tool_names_match_monitor():
    from tools import plot_shaping as mod
    assert mod.GLOBAL_FIELDS == M.GLOBAL_FIELDS and mod.LAYER_FIELDS == M.LAYER_FIELDS + M.UPDATE_FIELDS
    assert M.LAYER_FIELDS == M.LayerStats._fields
    assert mod.CSV_PREFIX == M.TAG_PREFIX.replace("/", "_") + "_"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registered_shaper_reports_only_keys_the_monitor_reads(name):
    """A misspelt key (``treshold``) would silently vanish from the monitors: every registered
    method's diagnostics use the monitor's names and are one float64 value per group."""
    ps = [torch.nn.Parameter(torch.ones(3, 4)), torch.nn.Parameter(torch.ones(4))]
    gs = GradientShaper([("w", ps[0]), ("b", ps[1])], name, granularity="tensor")
    for k in (1.0, 2.0, 50.0):
        for p in ps:
            p.grad = torch.full_like(p, 0.1 * k)
        prev = gs.state
        gs.apply_()
        series = gs.shaper.diagnostics(prev, gs.state)
        assert set(series) <= {STAT, THRESHOLD}, series.keys()
        assert all(t.shape == (2,) and t.dtype == STAT_DTYPE for t in series.values())
