"""Shaping under tensor and pipeline parallelism equals the TP1/PP1/DP1 run.

Run under the deepspeed launcher with ``--layouts tp2,pp2`` (each layout's tp*pp*dp must equal
the world size). For each layout and shaper, every rank first trains the LLaMA in one process
(TP1, PP1, the whole batch, plain PyTorch + ``GradientShaper``), then the same model with
DeepSpeed (megatron-core TP layers, ``PipelineModule`` when PP > 1, ZeRO-1 over data
parallelism, tied embeddings shared by the first and last stage) and compares per-layer
statistics at every step and the parameters this rank holds after the last step.
Rank 0 writes one JSON line per case.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

SEED = 1234
SHAPERS = {
    "gradient_stabilizer": {"type": "gradient_stabilizer", "params": {}},
    "spamp": {"type": "spamp", "params": {}},
    "norm_clip": {"type": "norm_clip", "params": {"max_norm": 0.5}},
    "agc": {"type": "agc", "params": {"clipping": 0.01}},
    "zclip": {"type": "zclip", "params": {"warmup_steps": 2, "max_grad_norm": None, "z_thresh": 0.5}},
    "block_gs": {"type": "gradient_stabilizer", "granularity": "block", "params": {}},
}


def tiny():
    from megatron_shaping.model import LlamaConfig
    return LlamaConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=128, vocab_size=300, seq_length=16, tie_embeddings=True)


def batches(cfg, step, n):
    g = torch.Generator().manual_seed(100 + step)
    text = torch.randint(0, cfg.vocab_size, (n, cfg.seq_length + 1), generator=g)
    return text[:, :-1].contiguous(), text[:, 1:].contiguous(), torch.ones(n, cfg.seq_length)


def spec_for(name):
    from megatron_shaping.model import BLOCK_PATTERN
    s = dict(SHAPERS[name])
    if s.get("granularity") == "block":
        s["block_pattern"] = BLOCK_PATTERN
    return s


def reference(cfg, shaper, steps, n_micro, mb, lr):
    """One process, TP1/PP1: per-step {group: sumsq} and final {name: param}."""
    from megatron_shaping import GradientShaper
    from megatron_shaping.model import LlamaModel
    from megatron_shaping.model.parallel import init_parallel
    init_parallel(tp=1, pp=1)
    model = LlamaModel(cfg, seed=SEED)
    spec = spec_for(shaper)
    gs = GradientShaper(model.named_parameters(), {"type": spec["type"], "params": spec["params"]},
                        granularity=spec.get("granularity"), block_pattern=spec.get("block_pattern"))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    stats, losses = [], []
    for step in range(steps):
        tokens, labels, mask = batches(cfg, step, n_micro * mb)
        opt.zero_grad()
        total = 0.0
        for i in range(n_micro):
            s = slice(i * mb, (i + 1) * mb)
            loss = model(tokens[s], labels[s], mask[s]) / n_micro
            loss.backward()
            total += loss.item()
        rec = gs.apply_()
        stats.append(dict(zip(gs.session.layout.names, rec.stats_before.sumsq.tolist())))
        losses.append(total)
        opt.step()
    return stats, losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def sharded(cfg, shaper, steps, tp, pp, mb, gas, lr):
    import megatron_shaping
    from megatron_shaping.model import LlamaModel, gather_full_tensor
    from megatron_shaping.model.parallel import init_parallel
    ctx = init_parallel(tp=tp, pp=pp)
    dp, dp_rank = ctx.dp, ctx.mpu.get_data_parallel_rank()
    spec = spec_for(shaper)
    config = {"train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": gas,
              "steps_per_print": 10 ** 9, "gradient_clipping": 0.0, "zero_optimization": {"stage": 1},
              "zero_allow_untested_optimizer": True, "gradient_shaping": spec}
    if pp > 1:
        from megatron_shaping.model.pipeline import build_pipeline_model
        module = build_pipeline_model(cfg, ctx.topology, seed=SEED)
    else:
        module = LlamaModel(cfg, seed=SEED)
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    # DeepSpeed takes the layout from PipelineModule's topology and refuses an mpu beside it.
    engine, _, _, _ = megatron_shaping.initialize(model=module, optimizer=opt, config=config,
                                                  mpu=None if pp > 1 else ctx.mpu)
    shaping = engine.gradient_shaping
    stats, losses = [], []
    for step in range(steps):
        tokens, labels, mask = batches(cfg, step, gas * dp * mb)
        # data-parallel rank r takes micro-batches m * dp + r
        micro = []
        for m in range(gas):
            i = (m * dp + dp_rank) * mb
            micro.append((tokens[i:i + mb], (labels[i:i + mb], mask[i:i + mb])))
        if pp > 1:
            loss = engine.train_batch(iter(micro))
        else:
            loss = 0.0
            for t, (lab, msk) in micro:
                l = engine(t, lab, msk)
                engine.backward(l)
                engine.step()
                loss += l.detach() / gas
            dist.all_reduce(loss, group=ctx.mpu.get_data_parallel_group())
            loss = loss / dp
        losses.append(float(loss))
        rec = shaping.session.last
        stats.append(dict(zip(shaping.session.layout.names, rec.stats_before.sumsq.tolist())))
    params = {n: gather_full_tensor(p.data, p).clone() for n, p in engine.module.named_parameters()}
    return stats, losses, params, shaping


def compare(ref, got):
    (rs, rl, rp), (gs, gl, gp, shaping) = ref, got
    worst_stat = 0.0
    for a, b in zip(rs, gs):
        assert set(a) == set(b), f"group names differ: {sorted(set(a) ^ set(b))[:6]}"
        for k in a:
            worst_stat = max(worst_stat, abs(a[k] - b[k]) / max(abs(a[k]), 1e-30))
    worst_param = 0.0
    for n, p in gp.items():
        r = rp[n]
        worst_param = max(worst_param, float((p - r).abs().max() / r.abs().max().clamp_min(1e-12)))
    worst_loss = max(abs(a - b) / abs(a) for a, b in zip(rl, gl))
    return {"stats": worst_stat, "params": worst_param, "loss": worst_loss, "n_params_here": len(gp),
            "collectives": shaping.collectives, "groups": shaping.session.layout.num_groups}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True, help="comma list like tp2,pp2,tp2pp2,dp2tp2,tp2pp2dp2")
    ap.add_argument("--shapers", default=",".join(SHAPERS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    world = dist.get_world_size()
    cfg = tiny()
    mb, gas, lr = 2, 2, 0.2
    results = []
    for layout in args.layouts.split(","):
        import re
        sizes = {k: int(v) for k, v in re.findall(r"(tp|pp|dp)(\d+)", layout)}
        tp, pp = sizes.get("tp", 1), sizes.get("pp", 1)
        dp = world // (tp * pp)
        if sizes.get("dp", dp) != dp or tp * pp * dp != world:
            raise SystemExit(f"layout {layout} does not fit world size {world}")
        for sh in args.shapers.split(","):
            res = {"layout": layout, "shaper": sh, "world": world}
            try:
                ref = reference(cfg, sh, args.steps, gas * dp, mb, lr)
                got = sharded(cfg, sh, args.steps, tp, pp, mb, gas, lr)
                res.update(compare(ref, got))
            except Exception as e:
                res["error"] = f"{type(e).__name__}: {e}"
                res["trace"] = traceback.format_exc()[-3000:]
            gathered = [None] * world
            dist.all_gather_object(gathered, res)
            if dist.get_rank() == 0:
                merged = dict(res)
                for k in ("stats", "params", "loss"):
                    vals = [g.get(k) for g in gathered if g.get(k) is not None]
                    if vals:
                        merged[k] = max(vals)
                errs = [g["error"] + "\n" + g.get("trace", "") for g in gathered if "error" in g]
                if errs:
                    merged["error"] = errs[0]
                merged["params_checked"] = sum(g.get("n_params_here", 0) for g in gathered)
                results.append(merged)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
