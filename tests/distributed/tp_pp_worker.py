"""Shaping under tensor and pipeline parallelism, checked on every rank, in fp32 and bf16.

Run under the deepspeed launcher with ``--layouts tp2,pp2`` (each layout's tp*pp*dp must equal
the world size). For each layout, precision and case (every registered method, a chain, and
the mutants of tp_pp_mutants.py) the worker builds a fresh engine in this process (re-seeded:
the model is initialised from per-name seeds, the data from the step number) and runs a few
optimizer steps of a tiny LLaMA (megatron-core TP layers, ``PipelineModule`` when PP > 1,
the tied embedding on the first and last stage). Two comparisons:

* **tight, every step, both precisions.** At the hook boundary every rank reads, from the
  buffers DeepSpeed's optimizer steps on (found through DeepSpeed's own mapping
  ``param._hp_mapping`` / ``param._hp_grad``, not through the package's adapters), its slice
  of the reduced gradient before and after shaping, and the parameter values the shaper sees.
  Rank 0 reassembles the whole gradient from all ranks (every element must be held by some
  rank; replicas must agree), shapes it with ``megatron_shaping.GradientShaper`` in the same
  dtype and compares, for every rank: the shaped gradient slice (tolerance: one rounding in the
  buffer's dtype, 1 ulp per rounding the plan makes, plus the statistics' relative error
  carried by the factor, GRAD_RTOL; in bf16 the ulp dominates), the per-layer statistics and the shaper state (STAT_RTOL: the
  same gradient summed in other pieces), the master weights after the SGD step
  (``w - lr * g_ref``, tolerance lr x the gradient's tolerance + 1 fp32 ulp of w and of lr * g)
  and the 16/32-bit model weights the next forward uses (1 ulp of their dtype + the same).
  The effect of shaping on each rank, RMS(shaped - unshaped) / RMS(tolerance), is what a rank
  that did not shape would have scored: it must be >= 10 on every rank.
* **whole training, fp32.** The same model trained in one process (TP1/PP1/DP1, the whole
  batch, plain PyTorch + ``GradientShaper``): per-layer statistics every step on every rank,
  the loss, the final parameters and shaper state on every rank, relative 1e-5 (observed
  ~1e-7: TP and ZeRO sum in another order).

bf16: non-pipeline layouts run ZeRO-1 with bf16 gradients (DeepSpeedZeroOptimizer), pipelines
run ZeRO-0 bf16, which DeepSpeed routes through BF16_Optimizer with bf16 gradient
accumulation: both shape a 16-bit gradient. fp32: ZeRO-1 everywhere. fp8 (``--fp8-cases``):
the model's linears in simulated FP8 (``fp8_backend="sim"``: inputs and weights rounded to
e4m3 with amax scales reduced over the TP group, gradients to e5m2), the engine and its
gradient buffers fp32 as in fp32 (ZeRO-1); the tight comparison only, since FP8 rounding of
activations summed in another order by TP can flip an e4m3 rounding and so a whole run.

Rank 0 writes one JSON line per (layout, precision, case): every comparison as its worst
error/tolerance ratio over steps and ranks, with the worst rank.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
import traceback

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.distributed import runner  # noqa: E402
from tests.distributed.tp_pp_mutants import MUTANTS  # noqa: E402
from tests.distributed.tolerances import stats_rtol  # noqa: E402
from megatron_shaping.shutdown import exit_process  # noqa: E402
from megatron_shaping.stats import kernels  # noqa: E402

SEED = 1234
LR = 1.0
MB, GAS = 2, 2
# Tolerances. Statistics: with the CPU sum kernel (kernels.available(), the default where a C
# compiler exists) each chunk's squares are exact in float64 and summed in float64, so the same
# gradient cut into other pieces (TP shards, ZeRO partitions vs the whole tensor) gives sums
# that differ by float64 roundings only: at most n * 2^-53 for n summed elements (a few
# thousand per group here: < 1e-12). On the torch path (MEGATRON_SHAPING_KERNELS=0, no
# compiler) megatron_shaping sums each run of up to 2048 elements in fp32 (stats/slices.py,
# CHUNK) and adds the partial sums in float64: a few fp32 roundings of a 2048-term cascade
# sum, ~5e-7 relative observed, 2e-6 allowed. Shaping factors and elementwise-map parameters
# inherit that relative error (a norm-based factor half of it, a SPAMP power |g|^a up to
# |ln g| times it, < 30 here): a shaped gradient element may differ by GRAD_RTOL relative on
# top of the final rounding in its dtype (1 ulp). With the kernel, and in bf16 on either path,
# the rounding dominates: one final rounding.
ROUNDINGS = {"spamp": 3, "chain": 3}
EXACT_STATS = kernels.available()
STAT_RTOL = stats_rtol(EXACT_STATS)          # tolerances.py
STATE_RTOL = STAT_RTOL
GRAD_RTOL = (30 if EXACT_STATS else 10) * STAT_RTOL
WHOLE_RTOL = 1e-5


def method_specs():
    """Every registered method and a chain, with parameters that make each act on every
    tensor from the first steps (tiny model, gradient entries ~1e-4..1e-1)."""
    from megatron_shaping.model import BLOCK_PATTERN
    from megatron_shaping.shapers import REGISTRY
    specs = {
        "gradient_stabilizer": {"type": "gradient_stabilizer", "params": {}},
        "spamp": {"type": "spamp", "params": {"alpha_min": 0.1}},
        "norm_clip": {"type": "norm_clip", "params": {"max_norm": 1e-3}},
        "value_clip": {"type": "value_clip", "params": {"clip_value": 1e-4}},
        "agc": {"type": "agc", "params": {"clipping": 1e-3}},
        "zclip": {"type": "zclip", "params": {"warmup_steps": 1, "max_grad_norm": 1e-3, "z_thresh": 0.5}},
        "adagc": {"type": "adagc", "params": {"warmup_steps": 1, "warmup_max_norm": 1e-3, "lambda_rel": 1.0}},
        "entrywise_shrink": {"type": "entrywise_shrink", "params": {"threshold": 1.0}},
        "chain": {"type": "chain", "block_pattern": BLOCK_PATTERN,
                  "shapers": [{"type": "gradient_stabilizer", "granularity": "block"},
                              {"type": "norm_clip", "granularity": "global", "params": {"max_norm": 1e-3}}]},
    }
    missing = sorted(set(REGISTRY) - set(specs))
    if missing:
        raise SystemExit(f"tp_pp_worker: no case for registered method(s) {missing}")
    return specs


def tiny():
    from megatron_shaping.model import LlamaConfig
    return LlamaConfig(hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=64, vocab_size=120, seq_length=8, tie_embeddings=True,
                       make_vocab_size_divisible_by=64)


def batches(cfg, step, n):
    g = torch.Generator().manual_seed(100 + step)
    text = torch.randint(0, cfg.vocab_size, (n, cfg.seq_length + 1), generator=g)
    return text[:, :-1].contiguous(), text[:, 1:].contiguous(), torch.ones(n, cfg.seq_length)


def shaper_of(spec):
    """(shaper spec, granularity, block_pattern) for GradientShaper from a config section."""
    s = {k: v for k, v in spec.items() if k not in ("granularity", "block_pattern")}
    return s, spec.get("granularity"), spec.get("block_pattern")


# ---------------------------------------------------------------------------------- numbers
def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (float64 result); zero maps to the smallest normal's ulp."""
    fi = torch.finfo(dtype)
    a = x.double().abs().clamp_min(fi.tiny)
    return torch.exp2(torch.floor(torch.log2(a))) * fi.eps


def grad_tol(x: torch.Tensor, dtype: torch.dtype, roundings: int = 1) -> torch.Tensor:
    """Allowed difference of a shaped gradient element from the reference: its roundings
    (1 ulp of the buffer's dtype each) plus the statistics' relative error carried by the factor."""
    return roundings * ulp(x, dtype) + GRAD_RTOL * x.double().abs()


def _larger(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.maximum(a.double().abs(), b.double().abs())


def ratio(err: torch.Tensor, tol: torch.Tensor) -> float:
    # a NaN error is an infinite one (max() and Worst would drop it)
    return float((err / tol).nan_to_num(nan=math.inf).max()) if err.numel() else 0.0


def rel_ratio(a, b, rtol: float, atol: float = 1e-300) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if not a.numel():
        return 0.0
    both_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
    err = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    tol = rtol * torch.maximum(a.abs(), b.abs()).nan_to_num(posinf=0.0) + atol
    return float((err / tol).nan_to_num(nan=math.inf).max())


# ---------------------------------------------------------------------------------- one process
def tp1_reference(cfg, spec, steps, n_micro, lr):
    """TP1/PP1/DP1, the whole batch, plain PyTorch: per-step sumsq by group name, losses, final
    parameters and shaper state (spec None: no shaping, for the whole-training effect)."""
    from megatron_shaping import GradientShaper
    from megatron_shaping.model import LlamaModel
    torch.manual_seed(SEED)
    model = LlamaModel(cfg, seed=SEED)
    gs = None
    if spec is not None:
        s, gran, bp = shaper_of(spec)
        gs = GradientShaper(model.named_parameters(), s, granularity=gran, block_pattern=bp)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    stats, losses = [], []
    for step in range(steps):
        tokens, labels, mask = batches(cfg, step, n_micro * MB)
        opt.zero_grad()
        total = 0.0
        for i in range(n_micro):
            s_ = slice(i * MB, (i + 1) * MB)
            loss = model(tokens[s_], labels[s_], mask[s_]) / n_micro
            loss.backward()
            total += loss.item()
        if gs is not None:
            rec = gs.apply_()
            stats.append(dict(zip(gs.session.layout.names, rec.stats_before.sumsq.tolist())))
        losses.append(total)
        opt.step()
    return {"stats": stats, "loss": losses, "state": gs.state_dict() if gs else None,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


# ---------------------------------------------------------------------------------- capture
def _tp_meta(p, tp, tp_rank):
    from deepspeed.runtime.utils import is_model_parallel_parameter
    sharded = tp > 1 and is_model_parallel_parameter(p)
    return {"tp_rank": tp_rank, "sharded": sharded, "pdim": int(getattr(p, "partition_dim", 0)),
            "local_shape": tuple(p.shape)}


def grad_fragments(engine, tp, tp_rank):
    """name -> (meta, start, 1-D clone) of the gradient this rank's optimizer will step on,
    located through DeepSpeed's own mapping: BF16_Optimizer's accumulation buffer
    ``param._hp_grad`` (whole parameter, every DP rank), or the ZeRO-1/2 partition fragment
    ``param._hp_mapping.get_lp_grad_fragment`` (parameters this rank's partition holds)."""
    out = {}
    for name, p in engine.module.named_parameters():
        hp_grad = getattr(p, "_hp_grad", None)
        m = getattr(p, "_hp_mapping", None)
        if hp_grad is not None:
            out[name] = (_tp_meta(p, tp, tp_rank), 0, hp_grad.detach().reshape(-1).clone())
        elif m is not None:
            g = m.get_lp_grad_fragment(p._index_in_param_group).detach().reshape(-1)
            out[name] = (_tp_meta(p, tp, tp_rank), m.lp_fragment_address.start, g.clone())
    return out


def master_fragments(engine, tp, tp_rank):
    """name -> (meta, start, fp32 master fragment) of this rank's optimizer partition."""
    out = {}
    for name, p in engine.module.named_parameters():
        m = getattr(p, "_hp_mapping", None)
        if m is not None:
            out[name] = (_tp_meta(p, tp, tp_rank), m.lp_fragment_address.start,
                         m.get_hp_fragment().detach().reshape(-1).clone())
    return out


def model_weights(engine, tp, tp_rank):
    """name -> (meta, 0, the whole local shard the next forward uses)."""
    return {n: (_tp_meta(p, tp, tp_rank), 0, p.detach().reshape(-1).clone())
            for n, p in engine.module.named_parameters()}


def state_fields(shaping):
    sd = shaping.session.state_dict()
    return [{"groups": m["groups"], "fields": {k: v.clone() for k, v in m["fields"].items()}} for m in sd["members"]]


class Capture:
    """Wraps ``shaping.shape`` on this engine: reads the gradient before and after shaping and
    the parameters the shaper sees, at the hook boundary."""

    def __init__(self, engine, shaping, tp, tp_rank):
        self.engine, self.shaping, self.tp, self.tp_rank = engine, shaping, tp, tp_rank
        self.last = None
        orig = shaping.shape

        def shape():
            pre = grad_fragments(engine, tp, tp_rank)
            masters = master_fragments(engine, tp, tp_rank)
            weights = model_weights(engine, tp, tp_rank)
            ok = orig()
            post = grad_fragments(engine, tp, tp_rank)
            rec = shaping.session.last
            stats = None if rec is None else {
                k: getattr(rec.stats_before, k).clone() for k in ("sumsq", "sumabs")
                if getattr(rec.stats_before, k) is not None}
            self.last = {"pre": pre, "post": post, "master_old": masters, "weights_old": weights,
                         "stats": stats, "names": list(shaping.session.layout.names), "ok": ok,
                         "state": state_fields(shaping)}
            return ok

        shaping.shape = shape


# ---------------------------------------------------------------------------------- assembly
def assemble(per_rank, key, tp):
    """Whole tensors from the fragments every rank holds. Returns (name -> tensor, largest
    disagreement between copies of one element). Raises when some element is held by none."""
    bufs, seen, meta_of, mismatch = {}, {}, {}, 0.0
    for frags in per_rank:
        for name, (meta, start, v) in frags[key].items():
            k = (name, meta["tp_rank"] if meta["sharded"] else 0)
            meta_of[name] = meta
            n = 1
            for d in meta["local_shape"]:
                n *= d
            if k not in bufs:
                bufs[k] = torch.zeros(n, dtype=v.dtype)
                seen[k] = torch.zeros(n, dtype=torch.bool)
            b, s = bufs[k], seen[k]
            sl = slice(start, start + v.numel())
            both = s[sl]
            if bool(both.any()):
                mismatch = max(mismatch, float((b[sl][both].double() - v[both].double()).abs().max()))
            b[sl] = torch.where(both, b[sl], v.to(b.dtype))
            s[sl] = True
    out = {}
    for name, meta in meta_of.items():
        parts = range(tp) if meta["sharded"] else (0,)
        chunks = []
        for r in parts:
            if (name, r) not in bufs or not bool(seen[(name, r)].all()):
                raise AssertionError(f"{key}: elements of {name} (TP rank {r}) are held by no rank")
            chunks.append(bufs[(name, r)].view(meta["local_shape"]))
        out[name] = torch.cat(chunks, dim=meta["pdim"]) if meta["sharded"] else chunks[0]
    return out, mismatch


def local_view(full: torch.Tensor, meta, tp: int) -> torch.Tensor:
    if meta["sharded"]:
        full = full.chunk(tp, dim=meta["pdim"])[meta["tp_rank"]]
    return full.contiguous().reshape(-1)


class Worst:
    """Largest error/tolerance ratio over steps and ranks, and where it was."""

    def __init__(self):
        self.value, self.rank, self.step, self.where = 0.0, None, None, None

    def add(self, value, rank, step, where=None):
        value = math.inf if value != value else value      # NaN: worse than anything (a > NaN is False)
        if value > self.value or self.rank is None:
            self.value, self.rank, self.step, self.where = float(value), rank, step, where

    def as_dict(self):
        return {"ratio": self.value, "rank": self.rank, "step": self.step, "where": self.where}


class TightReference:
    """Rank 0: the reference shaper fed with the gathered 16/32-bit gradient, and the
    per-rank comparisons."""

    def __init__(self, spec, param_order, tp, agc_on_weights, roundings=1, lr=LR):
        self.spec, self.order, self.tp, self.roundings, self.lr = spec, param_order, tp, roundings, lr
        self.agc_on_weights = agc_on_weights      # BF16_Optimizer: AGC reads the bf16 weights
        self.gs = None
        self.params = None
        self.worst = {k: Worst() for k in ("grad", "stats", "state", "master", "weights", "replicas")}
        self.effect_by_rank = {}
        self.effect_rel_by_rank = {}

    def step(self, step, per_rank, after):
        from megatron_shaping import GradientShaper
        tp = self.tp
        pre, mm = assemble(per_rank, "pre", tp)
        self.worst["replicas"].add(mm, None, step, "pre-shaping gradient copies")
        masters, _ = assemble(per_rank, "master_old", tp)
        weights, _ = assemble(per_rank, "weights_old", tp)
        seen_params = weights if self.agc_on_weights else masters
        if self.gs is None:
            self.params = {n: torch.nn.Parameter(seen_params[n].clone()) for n in self.order}
            for p in self.params.values():
                p.grad_dtype = None     # a bf16 gradient on the fp32 master, as ZeRO holds them
            s, gran, bp = shaper_of(self.spec)
            self.gs = GradientShaper([(n, self.params[n]) for n in self.order], s, granularity=gran, block_pattern=bp)
        for n in self.order:
            self.params[n].data = seen_params[n].clone()
            self.params[n].grad = pre[n].clone()
        rec = self.gs.apply_()
        ref = {n: self.params[n].grad for n in self.order}
        lr = self.lr
        ref_master = {n: masters[n].add(ref[n].to(masters[n].dtype), alpha=-lr) for n in self.order}
        ref_state = self.gs.state_dict()["members"]
        ref_stats = {k: getattr(rec.stats_before, k) for k in ("sumsq", "sumabs")
                     if getattr(rec.stats_before, k) is not None}
        for r, cap in enumerate(per_rank):
            # shaped gradient slices, and the effect shaping had on them
            num, den, d_pre, n_pre = 0.0, 0.0, 0.0, 0.0
            for name, (meta, start, got) in cap["post"].items():
                want = local_view(ref[name], meta, tp)[start:start + got.numel()]
                # ulp of the larger of the two: a rounding may cross into the next binade
                tol = grad_tol(_larger(want, got), got.dtype, self.roundings)
                self.worst["grad"].add(ratio((got.double() - want.double()).abs(), tol), r, step, name)
                before = cap["pre"][name][2].double()
                num += float(((got.double() - before) ** 2).sum())
                den += float((grad_tol(got, got.dtype, self.roundings) ** 2).sum())
                d_pre += float(((got.double() - before) ** 2).sum())
                n_pre += float((before ** 2).sum())
            if den:
                eff = math.sqrt(num / den)
                self.effect_by_rank[r] = max(self.effect_by_rank.get(r, 0.0), eff)
                self.effect_rel_by_rank[r] = max(self.effect_rel_by_rank.get(r, 0.0), math.sqrt(d_pre / max(n_pre, 1e-300)))
            # per-layer statistics (by group name)
            if cap["stats"] is None:
                self.worst["stats"].add(math.inf, r, step, "step skipped")
            else:
                for k, want in ref_stats.items():
                    got = dict(zip(cap["names"], cap["stats"][k].tolist()))
                    want_d = dict(zip(self.gs.session.layout.names, want.tolist()))
                    if sorted(got) != sorted(want_d):
                        self.worst["stats"].add(math.inf, r, step, "group names differ")
                        continue
                    for n in want_d:
                        self.worst["stats"].add(rel_ratio(got[n], want_d[n], STAT_RTOL), r, step, f"{k} {n}")
            # shaper state
            for m_got, m_want in zip(cap["state"], ref_state):
                if list(m_got["groups"]) != list(m_want["groups"]):
                    self.worst["state"].add(math.inf, r, step, "group order")
                    continue
                for f, want in m_want["fields"].items():
                    self.worst["state"].add(rel_ratio(m_got["fields"][f], want, STATE_RTOL), r, step, f)
            # the optimizer's update of the master weights, and the weights the next forward uses
            for name, (meta, start, got) in after[r]["master_new"].items():
                want = local_view(ref_master[name], meta, tp)[start:start + got.numel()]
                g_ref = local_view(ref[name], meta, tp)[start:start + got.numel()]
                # the update's rounding (1 ulp of w), lr * g rounded first or fused (1 ulp of
                # lr * g), and the gradient's own tolerance times lr
                tol = (lr * grad_tol(g_ref, ref[name].dtype, self.roundings) + ulp(_larger(want, got), got.dtype)
                       + ulp(lr * g_ref.double(), got.dtype))
                self.worst["master"].add(ratio((got.double() - want.double()).abs(), tol), r, step, name)
            for name, (meta, start, got) in after[r]["weights_new"].items():
                if name not in ref_master:
                    continue
                # the master is only complete for the elements some rank's partition holds:
                # all of them (assemble checked); the weights are its rounding to their dtype
                want = local_view(ref_master[name], meta, tp).to(got.dtype)
                g_ref = local_view(ref[name], meta, tp)
                # |round(a) - round(b)| <= |a - b| + 1 ulp; a, b the masters (tolerance above)
                tol = (ulp(_larger(want, got), got.dtype) + lr * grad_tol(g_ref, ref[name].dtype, self.roundings)
                       + ulp(lr * g_ref.double(), torch.float32))
                if got.dtype != torch.float32:
                    tol = tol + ulp(_larger(want, got), torch.float32)
                self.worst["weights"].add(ratio((got.double() - want.double()).abs(), tol), r, step, name)

    def result(self):
        out = {k: w.as_dict() for k, w in self.worst.items()}
        if self.effect_by_rank:
            r = min(self.effect_by_rank, key=self.effect_by_rank.get)
            out["effect"] = {"ratio": self.effect_by_rank[r], "rank": r,
                             "relative": min(self.effect_rel_by_rank.values()),
                             "by_rank": [self.effect_by_rank[k] for k in sorted(self.effect_by_rank)]}
        return out


# ---------------------------------------------------------------------------------- one case
def run_case(cfg, ctx, precision, spec, mutant, steps, whole_ref, roundings=1, lr=LR):
    import megatron_shaping
    from megatron_shaping.model import LlamaModel
    rank, world = dist.get_rank(), dist.get_world_size()
    tp, pp, dp = ctx.tp, ctx.pp, ctx.dp
    tp_rank, dp_rank = ctx.mpu.get_tensor_model_parallel_rank(), ctx.mpu.get_data_parallel_rank()
    pipe = pp > 1
    stage = 0 if (precision == "bf16" and pipe) else 1
    if precision == "fp8":
        cfg = dataclasses.replace(cfg, fp8=True, fp8_backend="sim")
    config = {"train_micro_batch_size_per_gpu": MB, "gradient_accumulation_steps": GAS,
              "steps_per_print": 10 ** 9, "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "gradient_shaping": spec}
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    torch.manual_seed(SEED)
    if pipe:
        from megatron_shaping.model.pipeline import build_pipeline_model
        module = build_pipeline_model(cfg, ctx.topology, seed=SEED)
    else:
        module = LlamaModel(cfg, seed=SEED)
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    patch = mutant.patch(rank, world) if mutant is not None else contextlib.nullcontext()
    with patch:
        # DeepSpeed takes the layout from PipelineModule's topology and refuses an mpu beside it.
        engine, _, _, _ = megatron_shaping.initialize(model=module, optimizer=opt, config=config,
                                                      mpu=None if pipe else ctx.mpu)
        shaping = engine.gradient_shaping
        cap = Capture(engine, shaping, tp, tp_rank)
        tight = None
        if rank == 0:
            agc_on_weights = type(engine.optimizer).__name__ == "BF16_Optimizer"
            tight = TightReference(spec, [p.name for p in shaping.session.grouping.params], tp, agc_on_weights,
                                   roundings, lr)
        stats_steps, losses = [], []
        tight_error = None
        for step in range(steps):
            tokens, labels, mask = batches(cfg, step, GAS * dp * MB)
            micro = []
            for m in range(GAS):
                i = (m * dp + dp_rank) * MB       # data-parallel rank r takes micro-batches m * dp + r
                micro.append((tokens[i:i + MB], (labels[i:i + MB], mask[i:i + MB])))
            if pipe:
                loss = engine.train_batch(iter(micro))
            else:
                loss = 0.0
                for t, (lab, msk) in micro:
                    l_ = engine(t, lab, msk)
                    engine.backward(l_)
                    engine.step()
                    loss += l_.detach().float() / GAS
                dist.all_reduce(loss, group=ctx.mpu.get_data_parallel_group())
                loss = loss / dp
            losses.append(float(loss))
            c = cap.last
            if c is None:
                raise RuntimeError("the shaping hook did not run")
            cap.last = None
            stats_steps.append((c["names"], None if c["stats"] is None else c["stats"]["sumsq"].tolist()))
            after = {"master_new": master_fragments(engine, tp, tp_rank), "weights_new": model_weights(engine, tp, tp_rank)}
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(c, gathered, dst=0)
            gathered_after = [None] * world if rank == 0 else None
            dist.gather_object(after, gathered_after, dst=0)
            if rank == 0 and tight_error is None:
                try:        # keep taking part in the collectives whatever happens here
                    tight.step(step, gathered, gathered_after)
                except Exception as e:
                    tight_error = f"rank 0 reference: {type(e).__name__}: {e}\n" + traceback.format_exc()[-3000:]
        final = {"weights": model_weights(engine, tp, tp_rank), "state": state_fields(shaping),
                 "stats": stats_steps, "loss": losses}
        info = {"optimizer": type(engine.optimizer).__name__, "adapter": shaping.adapter.name,
                "linears": _linears_everywhere(engine),
                "groups": shaping.session.layout.num_groups, "collectives": shaping.collectives}
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(final, gathered, dst=0)
    if rank != 0:
        return None
    if tight_error:
        raise RuntimeError(tight_error)
    res = dict(info)
    res["tight"] = tight.result()
    if precision == "fp32" and whole_ref is not None:
        res["whole"] = compare_whole(whole_ref, gathered, tp)
    return res


def _linears_everywhere(engine) -> list:
    """The linear classes of every rank's part of the model (a pipeline stage holds its own)."""
    mine = sorted({type(m).__name__ for m in engine.module.modules() if "Linear" in type(m).__name__})
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def compare_whole(ref, per_rank, tp):
    """fp32 whole training vs the TP1/PP1/DP1 run, every rank: ratios error / (1e-5 relative)."""
    w = {k: Worst() for k in ("stats", "loss", "params", "state")}
    for r, fin in enumerate(per_rank):
        for step, (names, sumsq) in enumerate(fin["stats"]):
            if sumsq is None:
                w["stats"].add(math.inf, r, step, "step skipped")
                continue
            got = dict(zip(names, sumsq))
            want = ref["stats"][step]
            keys = sorted(want)
            if sorted(got) != keys:
                w["stats"].add(math.inf, r, step, "group names differ")
                continue
            w["stats"].add(rel_ratio([got[k] for k in keys], [want[k] for k in keys], WHOLE_RTOL), r, step)
        for step, (a, b) in enumerate(zip(fin["loss"], ref["loss"])):
            w["loss"].add(rel_ratio(a, b, WHOLE_RTOL), r, step)
        for name, (meta, _, got) in fin["weights"].items():
            want = local_view(ref["params"][name], meta, tp)
            err = float((got.double() - want.double()).abs().max())
            w["params"].add(err / (WHOLE_RTOL * float(want.abs().max().clamp_min(1e-12))), r, None, name)
        for m_got, m_want in zip(fin["state"], ref["state"]["members"]):
            for f, want in m_want["fields"].items():
                # state is one value per group, compared by group name
                got = m_got["fields"][f]
                if want.dim() >= 1 and want.shape[0] == len(m_want["groups"]) and list(m_got["groups"]) != list(m_want["groups"]):
                    idx = [list(m_got["groups"]).index(g) for g in m_want["groups"]]
                    got = got[idx]
                w["state"].add(rel_ratio(got, want, WHOLE_RTOL, 1e-30), r, None, f)
    return {k: v.as_dict() for k, v in w.items()}


def params_effect(ref, unshaped):
    """How far shaping moves the TP1 run's final parameters, in units of the whole-training
    tolerance: the power of the whole-training parameter comparison."""
    best = 0.0
    for n, p in ref["params"].items():
        u = unshaped["params"][n]
        best = max(best, float((p - u).abs().max() / (WHOLE_RTOL * float(p.abs().max().clamp_min(1e-12)))))
    return best


# ---------------------------------------------------------------------------------- main
def parse_layout(layout, world):
    sizes = {k: int(v) for k, v in re.findall(r"(tp|pp|dp)(\d+)", layout)}
    tp, pp = sizes.get("tp", 1), sizes.get("pp", 1)
    dp = world // (tp * pp)
    if sizes.get("dp", dp) != dp or tp * pp * dp != world:
        raise SystemExit(f"layout {layout} does not fit world size {world}")
    return tp, pp, dp


def main():
    w = runner.start(("--layouts", dict(required=True, help="comma list like tp2,pp2,tp2pp2,dp2tp2,tp2pp2dp2")),
                     ("--cases", dict(default="all", help="comma list of method cases, or 'all'")),
                     ("--mutants", dict(default="all", help="comma list of mutants, 'all' or 'none'")),
                     ("--precisions", dict(default="fp32,bf16")), ("--steps", dict(type=int, default=3)),
                     ("--fp8-cases", dict(default="", help="comma list of method cases also run in fp8 (sim)")),
                     items=None, quiet=True)
    from megatron_shaping.model.parallel import init_parallel
    args, rank, world = w.args, w.rank, w.world
    cfg = tiny()
    specs = method_specs()
    cases = list(specs) if args.cases == "all" else args.cases.split(",")
    mutants = [] if args.mutants == "none" else (list(MUTANTS) if args.mutants == "all" else args.mutants.split(","))
    precisions = args.precisions.split(",")
    fp8_cases = [c for c in args.fp8_cases.split(",") if c]
    layouts = [(l, *parse_layout(l, world)) for l in args.layouts.split(",")]

    # TP1 references for the fp32 whole-training check, one per (data-parallel size, case),
    # shared out over the ranks (the mutants reuse their method's reference).
    t0 = time.time()
    init_parallel(tp=1, pp=1)
    work = []
    for dp in sorted({l[3] for l in layouts}):
        for name in cases:
            work.append((dp, name, specs[name]))
        for m in mutants:
            work.append((dp, "mutant:" + m, MUTANTS[m].spec))
        work.append((dp, "unshaped", None))
    mine = {}
    if "fp32" in precisions:
        for i, (dp, name, spec) in enumerate(work):
            if i % world == rank:
                mine[(dp, name)] = tp1_reference(cfg, spec, args.steps, GAS * dp, LR)
    allrefs = [None] * world if rank == 0 else None
    dist.gather_object(mine, allrefs, dst=0)
    refs = {}
    if rank == 0:
        for d in allrefs:
            refs.update(d)
    t_ref = time.time() - t0

    results = []
    for layout, tp, pp, dp in layouts:
        ctx = init_parallel(tp=tp, pp=pp)
        todo = [(p, c, specs[c], None) for p in precisions for c in cases]
        todo += [("fp8", c, specs[c], None) for c in fp8_cases]
        todo += [(p, "mutant:" + m, MUTANTS[m].spec, MUTANTS[m]) for p in precisions for m in mutants
                 if MUTANTS[m].applies(tp, pp, dp)]
        for precision, name, spec, mutant in todo:
            t1 = time.time()
            res = {"layout": layout, "world": world, "precision": precision, "case": name,
                   "mutant": mutant is not None}
            try:
                ref = refs.get((dp, name)) if rank == 0 else None
                out = run_case(cfg, ctx, precision, spec, mutant, args.steps, ref, ROUNDINGS.get(name, 1))
                if rank == 0:
                    res.update(out)
                    if precision == "fp32":
                        res["whole_effect"] = params_effect(ref, refs[(dp, "unshaped")])
            except Exception as e:
                res["error"] = f"rank {rank}: {type(e).__name__}: {e}\n" + traceback.format_exc()[-3000:]
            errs = [None] * world if rank == 0 else None
            dist.gather_object(res.get("error"), errs, dst=0)
            if rank == 0:
                e = [x for x in errs if x]
                if e:
                    res["error"] = e[0]
                res["seconds"] = time.time() - t1
                results.append(res)
                print(f"[tp_pp_worker] {layout} {precision} {name}: {res['seconds']:.1f}s", flush=True)
    w.write_lines([{"meta": True, "reference_seconds": t_ref}] + results)


if __name__ == "__main__":
    main()
    exit_process()      # not through finalization: megatron_shaping/shutdown.py
