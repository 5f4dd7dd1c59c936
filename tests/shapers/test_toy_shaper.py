"""A new shaper is one module and one registry line (issue 13, item 1).

The test writes a toy method as a single file in a temporary folder on ``sys.path`` and adds one
line to ``megatron_shaping.shapers.REGISTRY``; nothing else in the package, the tools or the tests
is edited. Then it shows that the config section, the shaper contract tests, the monitors, the
checkpoint file and the DeepSpeed engine take it, each against an independent expectation:

- monitors: the toy's statistic lives in a state field the generic default of
  ``Shaper.diagnostics`` does not read (``ema``), so the monitor's per-layer ``stat`` and
  ``threshold`` can only come from the toy's own ``diagnostics`` (control: a copy of the toy without
  that method reports none);
- DeepSpeed: a 1-rank gloo ZeRO-2 engine trains to the same weights as a single-process
  reference (torch AdamW after the toy applied by ``GradientShaper``), while training without the
  toy ends far outside that tolerance; the engine's monitor events carry the toy's threshold.
"""
from __future__ import annotations

import math
import os
import sys
import textwrap

import pytest
import torch

from megatron_shaping import GradientShaper
from megatron_shaping.checkpoint import STATE_FILE, load_session, save_session
from megatron_shaping.monitoring import layer_stats
from megatron_shaping.shapers import REGISTRY

import test_shaper_contract as contract
import test_shaper_registry as registry_tests

TOY_MODULE = '''
"""Toy: clip each group's norm to ``limit`` times an EMA of its earlier norms.

Per group, with n = ||g|| (the first step of a group passes unchanged and starts the EMA):

    c = limit * ema
    g <- g * min(1, c / n)
    ema <- beta * ema + (1 - beta) * n          (ema <- n on the first step)

Defaults: limit 2.0, beta 0.5.

References:
    none: a test fixture (tests/shapers/test_toy_shaper.py).
"""
from typing import Dict, NamedTuple

import torch

from megatron_shaping.shapers.base import (STAT, STAT_DTYPE, SUMSQ, THRESHOLD, GroupLayout, Plan, Shaper, Stats,
                                           finite_positive, keep_where, nan_where_not)


class ToyState(NamedTuple):
    ema: torch.Tensor     # [L] EMA of the group norm
    count: torch.Tensor   # [L] steps this group learned from


class Toy(Shaper):
    name = "toy"
    needs = frozenset({SUMSQ})
    default_granularity = "tensor"
    hparams = ("limit", "beta")

    def __init__(self, limit: float = 2.0, beta: float = 0.5):
        if not limit > 0:
            raise ValueError(f"toy: limit must be > 0, got {limit}")
        self.limit, self.beta = float(limit), float(beta)

    def init(self, layout: GroupLayout) -> ToyState:
        z = torch.zeros(layout.num_groups, dtype=STAT_DTYPE, device=layout.device)
        return ToyState(z, z.clone())

    def update(self, stats: Stats, state: ToyState):
        n = stats.norm()
        ok = finite_positive(n)
        seen = state.count > 0
        c = self.limit * state.ema
        scale = torch.where(ok & seen & (n > c), c / n.clamp_min(1e-300), torch.ones_like(n))
        ema = torch.where(seen, self.beta * state.ema + (1 - self.beta) * n, n)
        return Plan(scale), keep_where(ok, ToyState(ema, state.count + 1), state)

    def diagnostics(self, prev: ToyState, new: ToyState) -> Dict[str, torch.Tensor]:
        seen = prev.count > 0
        return {STAT: nan_where_not(prev.ema, seen), THRESHOLD: nan_where_not(self.limit * prev.ema, seen)}


class ToyWithoutDiagnostics(Toy):
    diagnostics = Shaper.diagnostics
'''

LIMIT, BETA = 1.5, 0.5


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy registered for one test: its module on sys.path, one registry line."""
    module = f"toy_shaper_{os.getpid()}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(REGISTRY, "toy", (module, "Toy"))          # the one registry line
    yield sys.modules.get(module) or __import__(module)
    sys.modules.pop(module, None)


# ---------------------------------------------------------------------------------------- config
def test_config_section_accepts_the_toy_and_names_its_keys(toy):
    pytest.importorskip("deepspeed")
    from megatron_shaping.integrations.deepspeed.config import get_gradient_shaping_config
    cfg = get_gradient_shaping_config({"gradient_shaping": {"type": "toy", "params": {"limit": LIMIT}}})
    assert cfg.type == "toy" and cfg.params == {"limit": LIMIT}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['limt'\] for type 'toy'; allowed: \['limit', 'beta'\]"):
        get_gradient_shaping_config({"gradient_shaping": {"type": "toy", "params": {"limt": 1.0}}})
    chained = get_gradient_shaping_config({"gradient_shaping": {"type": "chain", "shapers": [
        {"type": "toy"}, {"type": "norm_clip", "granularity": "global"}]}})
    assert [s.type for s in chained.shapers] == ["toy", "norm_clip"]


def test_unregistered_toy_is_refused():
    from megatron_shaping.shapers import build_shaper
    with pytest.raises(ValueError, match="unknown gradient shaper type 'toy'"):
        build_shaper("toy")


# ---------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("granularity", [None, "tensor"])
def test_contract_tests_accept_the_toy(toy, granularity):
    contract.test_state_shape_and_dtype_are_stable("toy", granularity)
    contract.test_zero_gradients_give_no_nan("toy")
    for bad in (float("nan"), float("inf")):
        contract.test_non_finite_gradient_skips_the_step("toy", bad)
    contract.test_update_leaves_a_non_finite_group_untouched("toy")
    contract.test_state_dict_round_trips("toy")
    contract.test_grads_keep_their_dtype("toy", torch.float16, 1024.0)
    registry_tests.test_class_attributes_and_hparams_match_the_constructor("toy")
    registry_tests.test_docstring_has_formula_defaults_and_references("toy")
    registry_tests.test_state_fields_are_float64_per_group("toy")


# ---------------------------------------------------------------------------------------- monitors
U = torch.tensor([0.6, 0.0, -0.8, 0.0])         # unit vector: norm(c * U) = c


def shaped_steps(spec, norms):
    p = torch.nn.Parameter(torch.zeros(4))
    gs = GradientShaper([("w", p)], spec)
    out = []
    for n in norms:
        p.grad = (U * n).clone()
        prev = gs.state
        rec = gs.apply_()
        out.append(layer_stats(gs.shaper, prev, gs.state, rec))
    return out


def test_toy_diagnostics_reach_the_monitors_per_layer_stats(toy):
    n1, n2, n3 = 2.0, 3.0, 40.0
    s = shaped_steps({"type": "toy", "params": {"limit": LIMIT, "beta": BETA}}, [n1, n2, n3])
    assert math.isnan(float(s[0].stat[0])) and math.isnan(float(s[0].threshold[0]))
    ema2 = BETA * n1 + (1 - BETA) * n2
    assert float(s[1].stat[0]) == pytest.approx(n1) and float(s[1].threshold[0]) == pytest.approx(LIMIT * n1)
    assert float(s[2].stat[0]) == pytest.approx(ema2) and float(s[2].ratio[0]) == pytest.approx(n3 / ema2)
    assert float(s[2].threshold[0]) == pytest.approx(LIMIT * ema2)
    assert float(s[2].norm_after[0]) == pytest.approx(LIMIT * ema2)     # the toy clipped to its threshold
    # in a chain: the toy first gives the stat; a later norm_clip the threshold
    c = shaped_steps({"type": "chain", "shapers": [{"type": "toy"}, {"type": "norm_clip",
                      "params": {"max_norm": 100.0}, "granularity": "tensor"}]}, [n1, n2])
    assert float(c[1].stat[0]) == pytest.approx(n1) and float(c[1].threshold[0]) == 100.0
    # control: the same maths without its own diagnostics shows nothing (ema is no generic field)
    ctl = shaped_steps(toy.ToyWithoutDiagnostics(LIMIT, BETA), [n1, n2, n3])
    assert torch.isnan(ctl[2].stat).all() and torch.isnan(ctl[2].threshold).all()
    assert float(ctl[2].norm_after[0]) == pytest.approx(float(s[2].norm_after[0]))


# ---------------------------------------------------------------------------------------- checkpoints
def test_toy_state_round_trips_through_the_state_file(toy, tmp_path):
    def trained(steps):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        gs = GradientShaper(model.named_parameters(), {"type": "toy", "params": {"limit": LIMIT}})
        for s in range(steps):
            model.zero_grad()
            (model(torch.randn(5, 3, generator=torch.Generator().manual_seed(s))).square().sum() * (1 + 5 * s)).backward()
            gs.apply_()
        return model, gs

    _, a = trained(4)
    path = str(tmp_path / STATE_FILE)
    save_session(a.session, path, {"global_steps": 4})
    _, b = trained(0)
    assert not torch.equal(a.state[0].ema, b.state[0].ema)
    load_session(b.session, path)
    assert type(b.state[0]).__name__ == "ToyState" and b.session.steps == 4
    for x, y in zip(a.state[0], b.state[0]):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------- DeepSpeed
STEPS = 4
LR = 1e-2


def model_and_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(1)
    # a loss spike at step 2: the toy clips it to LIMIT x its EMA
    batches = [(torch.randn(2, 6, generator=gen), 30.0 if s == 2 else 1.0) for s in range(STEPS)]
    return model, batches


def reference(shaping):
    """torch AdamW, with the toy applied by GradientShaper (or not at all): the final weights and
    the per-step thresholds of the first layer's weight."""
    model, batches = model_and_batches()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    gs = GradientShaper(model.named_parameters(), shaping) if shaping else None
    thresholds = []
    for x, k in batches:
        opt.zero_grad()
        (model(x).square().mean() * k).backward()
        if gs is not None:
            prev = gs.state
            rec = gs.apply_()
            thresholds.append(float(layer_stats(gs.shaper, prev, gs.state, rec).threshold[0]))
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), thresholds


def test_deepspeed_engine_trains_with_the_toy(toy, one_rank, tmp_path):
    import megatron_shaping
    section = {"type": "toy", "params": {"limit": LIMIT, "beta": BETA}}
    model, batches = model_and_batches()
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0,
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}},
           "zero_optimization": {"stage": 2},
           "csv_monitor": {"enabled": True, "output_path": str(tmp_path), "job_name": "toy"},
           "gradient_shaping": dict(section, log_interval=1, log_per_layer=True)}
    engine = megatron_shaping.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]
    events = []
    engine.monitor.write_events = events.extend
    for x, k in batches:
        loss = engine(x).square().mean() * k
        engine.backward(loss)
        engine.step()
    got = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
    want, want_thr = reference(section)
    unshaped, _ = reference(None)
    tol = 1e-5
    err = float((got - want).abs().max() / want.abs().max())
    effect = float((unshaped - want).abs().max() / want.abs().max())
    assert err < tol and effect > 100 * tol, (err, effect)
    state = engine.gradient_shaping.session.state[0]
    assert type(state).__name__ == "ToyState" and state.count.tolist() == [STEPS] * 4
    # the engine's monitor wrote the toy's threshold per layer (limit x the EMA before the step;
    # none on the first step), as the single-process reference computes it
    thr = [v for tag, v, _ in events if tag.endswith("/layer/0.weight/threshold")]
    assert math.isnan(want_thr[0]) and thr == pytest.approx(want_thr[1:], rel=tol)
    engine.destroy()
