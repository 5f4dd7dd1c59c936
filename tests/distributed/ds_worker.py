"""Run under the ``deepspeed`` launcher: every scenario trains a small model with DeepSpeed and
checks, on every rank, two things against ``megatron_shaping.GradientShaper``:

1. **Tight, step by step** (``tight_*`` fields). At the hook boundary the test captures the
   reduced gradient exactly as the hook is about to shape it, gathered to the whole unsharded
   gradient with DeepSpeed's own ``safe_get_full_grad`` (values of the gradient's storage dtype,
   still multiplied by the loss scale), the weights (``safe_get_full_fp32_param``), and the loss
   scale that backward applied (recorded from DeepSpeed's ``scale_if_loss``, not read from our
   adapter). The reference shapes a copy of that gradient *in the same dtype* with that loss
   scale divided out. The shaped gradient DeepSpeed hands to its optimizer is read from
   DeepSpeed's buffers inside the basic optimizer's ``step`` (the fp32 partitions after
   DeepSpeed's unscale), mapped to parameter elements with DeepSpeed's own partition maps
   (``_hp_mapping``, ZeRO-3's ``grad_position``), and compared element by element in units of
   the storage dtype's ulp. Statistics, factors and shaper state are compared every step.
   The *effect* (DeepSpeed's shaped vs unshaped gradient, in the same ulp units) says what the
   comparison can see.
2. **Whole training** against the unsharded fp32 reference: the same model in one process with
   plain PyTorch on the whole batch in fp32 (``stats``, ``factor``, ``params``, ``state_equal``).

Every rank computes both on its own and the results of all ranks are gathered: rank 0 writes
one JSON line per scenario with a list ``ranks`` (one dict per rank).

``sc["mutant"]`` installs a deliberately broken variant of the sharded path (mutants.py).

fp16 note: DeepSpeed's CPU accelerator reports no fp16 kernels and refuses fp16 configs. With
``--fake-fp16`` the worker makes the accelerator report fp16 support so that DeepSpeed's real
fp16 loss-scaler code paths run; the arithmetic is CPU fp16.
"""
from __future__ import annotations

import copy
import math
import warnings

import torch

# DeepSpeed's deprecation warnings would flood the output a failed launch reports.
warnings.filterwarnings("ignore", category=FutureWarning)

from tests.distributed import runner  # noqa: E402
from tests.distributed.nets import batch, make_model  # noqa: E402
from megatron_shaping.shutdown import exit_process  # noqa: E402
from megatron_shaping.stats import kernels  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MANTISSA = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}   # significand bits p


def rel(a, b):
    """Largest relative difference; inf where only one side is non-finite or either is NaN
    alone (a NaN difference fed to max() was silently dropped: a NaN result passed)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        return math.inf
    if not a.numel():
        return 0.0
    r = (a - b).abs() / b.abs().clamp_min(1e-12)
    same = (a == b) | (a.isnan() & b.isnan())
    return float(torch.where(same, torch.zeros_like(r), r).nan_to_num(nan=math.inf).max())


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at |x| (x: values of that dtype, as float64): 2^(e - p + 1)
    for a normal number of exponent e, the subnormal spacing below the smallest normal."""
    fi = torch.finfo(dtype)
    e = torch.floor(torch.log2(x.double().abs().clamp_min(fi.tiny)))
    return torch.pow(2.0, e - (MANTISSA[dtype] - 1))


def ulps(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> float:
    """max |a - b| in units of the ``dtype`` ulp of b (non-finite values must match exactly)."""
    a, b = a.double(), b.double()
    if a.numel() == 0:
        return 0.0
    fin = torch.isfinite(b)
    if not bool(torch.equal(torch.isfinite(a), fin)):
        return float("inf")
    if not bool(fin.all()):
        a, b = a[fin], b[fin]
    return float(((a - b).abs() / ulp(b, dtype)).max()) if a.numel() else 0.0


def full_params(engine):
    """The model's parameters as the next forward sees them (ZeRO-3: gathered)."""
    import deepspeed
    params = list(engine.module.parameters())
    ctx = deepspeed.zero.GatheredParameters(params) if hasattr(params[0], "ds_id") else _null()
    with ctx:
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ---------------------------------------------------------------------------------- probes
class Probe:
    """Test-side instruments on one engine, built from DeepSpeed's own structures only (not
    from our adapter): the loss scale backward applied, the gradient and weights at the hook
    boundary, and the gradient DeepSpeed's basic optimizer receives."""

    def __init__(self, engine, rank, world):
        self.engine, self.rank, self.world = engine, rank, world
        self.named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        self.names = {id(p): n for n, p in self.named}
        self.scale = 1.0
        self.captured = None        # (grads {name: fp32 full}, weights {name: fp32 full}, scale)
        self.outputs = []           # [(name, first element, fp64 values)] seen by the basic step
        opt = engine.optimizer
        # The loss scale engine.backward multiplies the loss by: DeepSpeed 0.19.8 calls
        # optimizer.scale_if_loss for ZeRO optimizers only (ZeRO-0's FP16 optimizers get an
        # unscaled backward), so a scale is recorded only when DeepSpeed applies one.
        if hasattr(opt, "scale_if_loss"):
            orig_scale = opt.scale_if_loss

            def scale_if_loss(value):
                out = orig_scale(value)
                if torch.is_tensor(value) and torch.is_tensor(out) and float(value.detach()) != 0.0:
                    self.scale = float(out.detach().double() / value.detach().double())
                return out
            opt.scale_if_loss = scale_if_loss
        self.basic = getattr(opt, "optimizer", opt) if not isinstance(opt, torch.optim.Optimizer) else opt
        self._flat_map = None
        orig_step = self.basic.step

        def basic_step(*args, **kwargs):
            self._record_outputs()
            return orig_step(*args, **kwargs)
        self.basic.step = basic_step

    def wrap_hook(self, shaping):
        orig = shaping.shape

        def shape():
            self.capture()
            return orig()
        shaping.shape = shape

    # ------------------------------------------------------------ hook boundary
    @torch.no_grad()
    def capture(self):
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
        # AGC's weights: the fp32 master weights on ZeRO 1-3 (the optimizer holds them,
        # partitioned, next to the gradient partitions), the model's own (16-bit) weights where
        # every rank holds the whole model and gradient: ZeRO-0's optimizers and BF16_Optimizer
        # (whose fp32 master is partitioned while its gradients are not). This is the package's
        # choice (adapters.py); see the README note on AGC weights in 16-bit.
        master = not isinstance(self.engine.optimizer, BF16_Optimizer)
        grads, weights = {}, {}
        for n, p in self.named:
            g = safe_get_full_grad(p)        # collective on ZeRO 1-3: every rank calls it
            grads[n] = (torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape) if g is None
                        else g.detach().float().clone())
            w = safe_get_full_fp32_param(p) if master else None
            weights[n] = (w if w is not None else p).detach().float().clone()
        self.captured = (grads, weights, self.scale)

    # ------------------------------------------------------------ basic optimizer step
    def _build_flat_map(self):
        """id(optimizer param) -> [(name, first element in the parameter, first element in the
        optimizer param, count)] from DeepSpeed's own partition bookkeeping."""
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
        import deepspeed.comm as dist
        opt = self.engine.optimizer
        fm = {}
        if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
            for n, p in self.named:
                gi, dest, num = opt.grad_position[opt.get_param_id(p)]
                start = dist.get_rank(group=p.ds_process_group) * p.partition_numel()
                valid = max(0, min(int(num), p.ds_numel - start))
                if valid:
                    fm.setdefault(id(opt.fp32_partitioned_groups_flat[gi]), []).append((n, start, int(dest), valid))
        elif isinstance(opt, (DeepSpeedZeroOptimizer, BF16_Optimizer)):
            flats = (opt.single_partition_of_fp32_groups if isinstance(opt, DeepSpeedZeroOptimizer)
                     else opt.fp32_groups_flat_partition)
            for n, p in self.named:
                hm = getattr(p, "_hp_mapping", None)
                if hm is None:
                    continue
                fm.setdefault(id(flats[hm.param_group_index]), []).append(
                    (n, int(hm.lp_fragment_address.start), int(hm.hp_fragment_address.start),
                     int(hm.hp_fragment_address.numel)))
        elif isinstance(opt, FP16_UnfusedOptimizer):
            for f32, f16 in zip(opt.fp32_groups, opt.fp16_groups):
                for a, b in zip(f32, f16):
                    fm[id(a)] = [(self.names[id(b)], 0, 0, b.numel())]
        elif isinstance(opt, FP16_Optimizer):
            for flat, group in zip(opt.fp32_groups_flat, opt.fp16_groups):
                off = 0
                for b in group:
                    fm.setdefault(id(flat), []).append((self.names[id(b)], 0, off, b.numel()))
                    off += b.numel()
        elif isinstance(opt, torch.optim.Optimizer):
            for n, p in self.named:
                fm[id(p)] = [(n, 0, 0, p.numel())]
        else:
            raise RuntimeError(f"probe: unknown optimizer {type(opt).__name__}")
        return fm

    @torch.no_grad()
    def _record_outputs(self):
        if self._flat_map is None:
            self._flat_map = self._build_flat_map()
        for group in self.basic.param_groups:
            for q in group["params"]:
                if q.grad is None:
                    continue
                g = q.grad.detach().reshape(-1)
                for name, p_off, q_off, n in self._flat_map.get(id(q), ()):
                    self.outputs.append((name, p_off, g[q_off:q_off + n].double().clone()))

    def take_outputs(self):
        out, self.outputs = self.outputs, []
        return out


class RefParam:
    """What ``slices_from_params`` reads of a parameter, with the weight values kept apart from
    the gradient's dtype (a torch leaf cannot hold a grad of another dtype)."""

    def __init__(self, w, g):
        self.w, self.grad = w, g
        self.shape = w.shape

    def numel(self):
        return self.w.numel()

    def dim(self):
        return self.w.dim()

    def detach(self):
        return self.w


def tight_reference_step(ref_shaper, grads16, weights, scale):
    """``GradientShaper.apply_`` on copies of the captured gradient (storage dtype, loss scale
    ``scale`` inside) with the captured weights; returns (record or None, shaped grads)."""
    from megatron_shaping.stats.slices import SliceSet, slices_from_params
    sess = ref_shaper.session
    g = sess.grouping
    named = [(n, RefParam(weights[n], grads16[n].clone())) for n, _ in ref_shaper.named]
    needs_param = "unit_param_sumsq" in sess.shaper.needs       # a chain's needs: its members'
    ss = SliceSet(slices_from_params(named, g.group, with_param=needs_param, unit_base=g.unit_base), sess.layout)
    ss.loss_scale = scale
    rec = sess.step(ss)
    return rec, {n: rp.grad for n, rp in named}


def _stats_rel(a, b):
    worst = 0.0
    for k in ("sumsq", "sumabs", "unit_sumsq", "unit_param_sumsq"):
        x, y = getattr(a, k), getattr(b, k)
        if x is not None and y is not None:
            worst = max(worst, rel(x, y))
        elif (x is None) != (y is None):
            return float("inf")
    return worst


# ---------------------------------------------------------------------------------- scenario
def run_scenario(sc, world, rank):
    import megatron_shaping
    from megatron_shaping import GradientShaper
    from tests.distributed import mutants

    steps = sc.get("steps", 4)
    gas = sc.get("gas", 1)
    mb = sc.get("micro", 2)
    lr = sc.get("lr", 0.05)
    spike = {int(k): v for k, v in (sc.get("spike") or {}).items()}
    cfg = {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": gas,
        "steps_per_print": 10 ** 9,
        "zero_optimization": {"stage": sc["stage"]},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": sc.get("clip", 0.0),
        "gradient_shaping": sc["shaping"],
    }
    z = cfg["zero_optimization"]
    if sc["stage"] == 3:
        z["stage3_param_persistence_threshold"] = 0
        z["sub_group_size"] = sc.get("sub_group_size", 100)
    if sc["stage"] in (1, 2) and not sc.get("default_buckets"):
        z["reduce_bucket_size"] = 64
        z["allgather_bucket_size"] = 64
        z["round_robin_gradients"] = bool(sc.get("round_robin", False))
    if sc.get("offload"):
        z["offload_optimizer"] = {"device": "cpu"}
    dtype = sc.get("dtype", "fp32")
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
        if sc.get("grad_accum_fp32"):
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}   # ZeRO-1 + this: BF16_Optimizer
    elif dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": sc.get("scale_power", 8),
                       "loss_scale_window": sc.get("scale_window", 1000), "hysteresis": 1, "min_loss_scale": 1}
    # The dtype the hook's gradient is stored in: fp32 accumulators for BF16_Optimizer; with CPU
    # offload DeepSpeed copies the reduced 16-bit gradient into its fp32 host buffer (ZeRO 1/2) or
    # the fp32 partitions' gradients (ZeRO-3), which the hook then shapes (a clamp there stores
    # the bound itself, not its 16-bit rounding).
    gdtype = torch.float32 if sc.get("grad_accum_fp32") or sc.get("offload") else DTYPES[dtype]

    ref = make_model(hidden=sc.get("hidden", (11, 7)))
    model = copy.deepcopy(ref)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    engine, _, _, _ = megatron_shaping.initialize(model=model, optimizer=opt, config=cfg)
    shaping = engine.gradient_shaping
    if sc.get("disable_unscale_fix"):
        # Negative control: DeepSpeed's own unscale, to show the test sees the trap.
        import contextlib
        shaping.adapter.unscale_guard = lambda scale: contextlib.nullcontext()
    if sc.get("mutant"):
        mutants.install(shaping, sc["mutant"], rank, world)
    probe = Probe(engine, rank, world)
    tight = sc.get("tight", True)
    if tight:
        probe.wrap_hook(shaping)

    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
    # the same training without shaping (with DeepSpeed's clip where the cell has one): how far
    # shaping moves the parameters, the power of the whole-training comparison (a DeepSpeed run
    # that never shaped would score it)
    plain = copy.deepcopy(ref)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=lr, momentum=0.9)
    plain_clip = (GradientShaper(plain.named_parameters(), {"type": "norm_clip", "params": {"max_norm": sc["clip"]}},
                                 granularity="global") if sc.get("clip", 0.0) > 0 else None)

    def whole_batch_backward(net, opt, x, y):
        """One process, the whole batch: every rank's micro-batches, DeepSpeed's averaging."""
        opt.zero_grad()
        for m in range(gas):
            for r in range(world):
                i = (m * world + r) * mb
                (torch.nn.functional.mse_loss(net(x[i:i + mb]), y[i:i + mb]) / (gas * world)).backward()

    spec = dict(sc["shaping"])
    members = spec["shapers"] if spec["type"] == "chain" else [{"type": spec["type"], "params": spec.get("params", {})}]
    if sc.get("clip", 0.0) > 0:
        # DeepSpeed's gradient_clipping runs after shaping, on the shaped gradient.
        members = members + [{"type": "norm_clip", "params": {"max_norm": sc["clip"]}, "granularity": "global"}]
    ref_spec = {"type": "chain", "shapers": members} if len(members) > 1 else members[0]
    ref_shaper = GradientShaper(ref.named_parameters(), ref_spec, granularity=spec.get("granularity"),
                                block_pattern=spec.get("block_pattern"))
    # The tight reference: the configured shaper only (DeepSpeed's clip runs after the hook).
    tight_model = make_model(hidden=sc.get("hidden", (11, 7)))
    tight_shaper = GradientShaper(tight_model.named_parameters(), spec, granularity=spec.get("granularity"),
                                  block_pattern=spec.get("block_pattern"))
    ddtype = DTYPES[dtype]
    res = {"name": sc["name"], "rank": rank, "path": shaping.adapter.name, "stats": 0.0, "factor": 0.0,
           "params": 0.0, "skipped": [], "ref_skipped": [], "loss_scales": [], "collectives_per_step": [],
           "tight_grad": 0.0, "tight_effect": [], "tight_stats": 0.0, "tight_factor": 0.0, "tight_state": 0.0,
           "tight_skipped": [], "tight_scales": [], "grad_dtype": str(gdtype).replace("torch.", ""),
           "coverage": None, "active": 0.0, "kernels": kernels.available()}
    coverage = {n: torch.zeros(getattr(p, "ds_numel", p.numel()), dtype=torch.float64) for n, p in probe.named}
    for step in range(steps):
        x, y = batch(step, mb * gas * world, spike)
        # DeepSpeed: rank r takes micro-batches m*world + r
        c0 = shaping.collectives
        for m in range(gas):
            i = (m * world + rank) * mb
            probe.scale = 1.0
            out = engine(x[i:i + mb].to(ddtype))
            loss = torch.nn.functional.mse_loss(out.float(), y[i:i + mb])
            engine.backward(loss)
            engine.step()
        res["collectives_per_step"].append(shaping.collectives - c0)
        res["loss_scales"].append(shaping.last_loss_scale)
        outputs = probe.take_outputs()
        last = shaping.session.last
        ds_skipped = shaping.last_skipped or last is None

        # ---- tight: the same 16-bit gradient through the reference
        if tight:
            grads, weights, scale = probe.captured
            probe.captured = None
            res["tight_scales"].append(scale)
            grads16 = {n: g.to(gdtype) for n, g in grads.items()}
            if not all(torch.equal(grads16[n].float().nan_to_num(), g.nan_to_num()) for n, g in grads.items()):
                raise AssertionError("the captured gradient holds values its storage dtype cannot represent")
            trec, tout = tight_reference_step(tight_shaper, grads16, weights, scale)
            if trec is None:
                res["tight_skipped"].append(step)
            if trec is not None and not ds_skipped:
                res["tight_stats"] = max(res["tight_stats"], _stats_rel(last.stats_before, trec.stats_before),
                                         rel(last.stats_after.sumsq, trec.stats_after.sumsq))
                res["tight_factor"] = max(res["tight_factor"], rel(last.factor, trec.factor))
            res["tight_state"] = max(res["tight_state"], _state_rel(shaping.state_dict(), tight_shaper.state_dict()))
            if not ds_skipped and trec is not None:
                clip = 1.0
                if sc.get("clip", 0.0) > 0:
                    # DeepSpeed's gradient_clipping after the hook, as DeepSpeed computes it:
                    # g / max(1, (||g|| + 1e-6) / clip) on the unscaled shaped gradient.
                    total = torch.sqrt(sum((t.double() / scale).square().sum() for t in tout.values()))
                    clip = 1.0 / max(1.0, (float(total) + 1e-6) / sc["clip"])
                eff = 0.0
                for name, p_off, vals in outputs:
                    n = vals.numel()
                    ds_scaled = vals * scale      # DeepSpeed divided by the scale: a power of two, exact
                    want = tout[name].reshape(-1)[p_off:p_off + n].double() * clip
                    before = grads[name].reshape(-1)[p_off:p_off + n]
                    res["tight_grad"] = max(res["tight_grad"], ulps(ds_scaled, want, gdtype))
                    eff = max(eff, ulps(before, ds_scaled, gdtype))
                    coverage[name][p_off:p_off + n] += 1      # every compared step, not the first only
                res["tight_effect"].append(eff)

        # ---- whole training: one process, the whole batch, fp32.
        whole_batch_backward(ref, ref_opt, x, y)
        rec = ref_shaper.apply_()
        if rec is None:
            res["ref_skipped"].append(step)
        else:
            ref_opt.step()
        if not spike:
            whole_batch_backward(plain, plain_opt, x, y)
            if plain_clip is not None:
                plain_clip.apply_()
            plain_opt.step()
        if ds_skipped:
            res["skipped"].append(step)
            continue
        res["active"] = max(res["active"], float((last.factor - 1).abs().max()))
        if rec is not None:
            res["stats"] = max(res["stats"], rel(last.stats_before.sumsq, rec.stats_before.sumsq))
            res["factor"] = max(res["factor"], rel(last.factor, rec.factor))
    if tight:
        # Every gradient element reached the optimizer exactly once (sharded paths) or on
        # every rank (replicated paths): the comparison saw all of it.
        import deepspeed.comm as dist
        flat = torch.cat([coverage[n] for n, _ in probe.named])
        if world > 1:
            dist.all_reduce(flat)
        n = len(res["tight_effect"])        # steps compared: each must have covered every element
        res["coverage"] = [float(flat.min()) / n, float(flat.max()) / n] if n else None
    dsp = full_params(engine)
    for n, p in ref.named_parameters():
        d = (dsp[n].double() - p.detach().double()).abs().max() / p.detach().double().abs().max().clamp_min(1e-12)
        res["params"] = max(res["params"], float(d) if torch.isfinite(d) else math.inf)
    res["whole_effect"] = None if spike else max(
        float((p.detach().double() - q.detach().double()).abs().max() / p.detach().double().abs().max().clamp_min(1e-12))
        for p, q in zip(ref.parameters(), plain.parameters()))
    res["state_equal"] = _state_rel(shaping.state_dict(), ref_shaper.state_dict(),
                                    extra=1 if sc.get("clip", 0.0) > 0 else 0)
    res["global_steps"] = engine.global_steps
    res["skipped_steps"] = engine.skipped_steps
    res["deferred_steps"] = shaping.deferred_steps
    engine.destroy() if hasattr(engine, "destroy") else None
    return res


def _state_rel(a, b, extra: int = 0):
    """Largest relative state difference; inf when the two states do not have the same groups,
    members and fields (zip and one side's keys would compare a subset as equal). ``extra``:
    members ``b`` has beyond ``a``'s, at its end (the reference's stand-in for DeepSpeed's
    clipping, which DeepSpeed applies after the hook and keeps no state for)."""
    if a["groups"] != b["groups"] or len(a["members"]) + extra != len(b["members"]):
        return math.inf
    worst = 0.0
    for ma, mb_ in zip(a["members"], b["members"]):
        if ma["type"] != mb_["type"] or set(ma["fields"]) != set(mb_["fields"]):
            return math.inf
        for k in ma["fields"]:
            worst = max(worst, rel(ma["fields"][k], mb_["fields"][k]))
    return worst


def main():
    w = runner.start()
    results = []
    for sc, r in w.each(lambda sc: run_scenario(sc, w.world, w.rank)):
        # (a scenario that failed on one rank only leaves the ranks out of step: this
        # collective then fails and the launch reports the traceback printed on stderr)
        results.append({"name": sc["name"], "world": w.world, "ranks": w.gather(r)})
    w.write_lines(results)


if __name__ == "__main__":
    main()
    exit_process()      # not through finalization: megatron_shaping/shutdown.py
