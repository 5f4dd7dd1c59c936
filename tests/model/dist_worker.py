"""Multi-process scenarios for the model, run under torchrun by test_parallel.py.

Each scenario compares a sharded run with the unsharded reference computed in the same
processes from the same seed, and raises on a mismatch. One launch runs all scenarios
because a launch costs far more than the scenarios.
Prints ``SCENARIO <name> OK`` for each scenario passed.
"""
from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_shaping.model import LlamaConfig, LlamaModel, gather_full_tensor, is_tp_duplicate  # noqa: E402
from megatron_shaping.model.parallel import init_parallel  # noqa: E402
from megatron_shaping.shutdown import exit_process  # noqa: E402
from tests.distributed import runner  # noqa: E402

SEED = 1234
ATOL = 1e-5


def tiny(**kw) -> LlamaConfig:
    base = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=128, vocab_size=300, seq_length=32, tie_embeddings=True)
    base.update(kw)
    return LlamaConfig(**base)


def batch(cfg, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, cfg.vocab_size, (b, cfg.seq_length + 1), generator=g)
    mask = torch.ones(b, cfg.seq_length)
    mask[0, :5] = 0.0      # a masked prefix exercises the loss mask
    return text[:, :-1].contiguous(), text[:, 1:].contiguous(), mask


def loss_and_full_grads(cfg):
    """Loss and name -> whole-model gradient (TP shards gathered)."""
    model = LlamaModel(cfg, seed=SEED)
    tokens, labels, mask = batch(cfg)
    loss = model(tokens, labels, mask)
    loss.backward()
    grads = {n: gather_full_tensor(p.grad, p).clone() for n, p in model.named_parameters()}
    weights = {n: gather_full_tensor(p.data, p).clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, weights, model


def check_close(what, a, b, atol=ATOL, rtol=1e-4):
    if not torch.allclose(a, b, atol=atol, rtol=rtol):
        raise AssertionError(f"rank {dist.get_rank()}: {what} differs: max abs diff "
                             f"{(a - b).abs().max().item():.3e}")


def scenario_tp(cfg, label):
    """TP=2 vs TP=1: same full weights, loss and gathered gradients."""
    init_parallel(tp=1)
    ref_loss, ref_grads, ref_w, _ = loss_and_full_grads(cfg)
    init_parallel(tp=2)
    loss, grads, w, model = loss_and_full_grads(cfg)
    assert set(grads) == set(ref_grads), "parameter names differ between TP=1 and TP=2"
    for n in ref_w:
        assert ref_w[n].shape == w[n].shape, (n, ref_w[n].shape, w[n].shape)
        check_close(f"{label} weight {n}", w[n], ref_w[n], atol=0, rtol=0)
    check_close(f"{label} loss", loss, ref_loss)
    for n in ref_grads:
        check_close(f"{label} grad {n}", grads[n], ref_grads[n])
    from megatron.core import parallel_state
    rank = parallel_state.get_tensor_model_parallel_rank()
    for n, p in model.named_parameters():
        if "norm" in n or n.endswith(f"{cfg.num_layers + 1}.weight"):
            assert getattr(p, "tensor_model_parallel", None) is False, n
            assert is_tp_duplicate(p) == (rank > 0), n
        else:
            assert p.tensor_model_parallel is True and p.partition_dim in (0, 1) and p.partition_stride == 1, n
            assert not is_tp_duplicate(p), n
    print(f"SCENARIO {label} OK loss={loss.item():.6f}", flush=True)


def scenario_fp8():
    """Simulated FP8: TP-invariant (amax all-reduced), close to but not equal to full precision."""
    cfg = tiny(fp8=True, fp8_backend="sim")
    init_parallel(tp=1)
    ref, ref_grads, _, _ = loss_and_full_grads(cfg)
    plain, plain_grads, _, _ = loss_and_full_grads(tiny())
    init_parallel(tp=2)
    loss, grads, _, _ = loss_and_full_grads(cfg)
    check_close("fp8 loss TP2 vs TP1", loss, ref, atol=1e-4)
    for n in ref_grads:
        check_close(f"fp8 grad {n} TP2 vs TP1", grads[n], ref_grads[n], atol=1e-4, rtol=1e-2)
    diff = (ref - plain).abs().item()
    assert 0 < diff < 0.05, f"fp8 loss should differ slightly from fp32: {ref.item()} vs {plain.item()}"
    print(f"SCENARIO fp8 OK loss_fp8={ref.item():.6f} loss_fp32={plain.item():.6f}", flush=True)


def scenario_pipeline(cfg, label, tp=1):
    """PP=2 (DeepSpeed PipelineEngine) vs the plain model: same parameter names, same loss, and
    the same loss after one SGD step (which checks every gradient, including the tied
    embedding's cross-stage all-reduce)."""
    import deepspeed
    from megatron_shaping.model.pipeline import build_pipeline_model
    lr, mb = 0.5, 2
    tokens, labels, mask = batch(cfg)
    micro = [(tokens[i:i + mb], (labels[i:i + mb], mask[i:i + mb])) for i in range(0, tokens.shape[0], mb)]

    # Reference: the pipeline's loss is the mean of the micro-batch losses.
    init_parallel(tp=1)
    ref = LlamaModel(cfg, seed=SEED)
    ref_loss = torch.stack([ref(t, lab, m) for t, (lab, m) in micro]).mean()
    ref_loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= lr * p.grad
        ref_after = torch.stack([ref(t, lab, m) for t, (lab, m) in micro]).mean()
    ref_names = {n for n, _ in ref.named_parameters()}

    ctx = init_parallel(tp=tp, pp=2)
    module = build_pipeline_model(cfg, ctx.topology, seed=SEED)
    names = [n for n, _ in module.named_parameters()]
    all_names = [None] * dist.get_world_size()
    dist.all_gather_object(all_names, names)
    union = set().union(*all_names)
    assert union == ref_names, f"pipeline names differ: {sorted(union ^ ref_names)}"
    if cfg.tie_embeddings:
        assert all("tied_modules.embed.word_embeddings.weight" in n for n in all_names)
    ds_config = {"train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": len(micro),
                 "steps_per_print": 10 ** 6, "gradient_clipping": 0.0}  # DeepSpeed's default is 1.0
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=ds_config)
    loss = engine.train_batch(iter(micro))
    after = engine.eval_batch(iter(micro))
    check_close(f"{label} loss", loss, ref_loss.detach())
    check_close(f"{label} loss after one step", after, ref_after, atol=1e-4)
    print(f"SCENARIO {label} OK loss={loss.item():.6f} after={after.item():.6f}", flush=True)


def main():
    runner.init_distributed()
    for sc in os.environ.get("SCENARIOS", "tp,fp8,pp").split(","):
        if sc == "tp":
            scenario_tp(tiny(), "tp2-tied-gqa")
            scenario_tp(tiny(tie_embeddings=False, num_query_groups=None), "tp2-untied-mha")
        elif sc == "fp8":
            scenario_fp8()
        elif sc == "pp":
            scenario_pipeline(tiny(tie_embeddings=False, num_layers=3), "pp2-untied")
            scenario_pipeline(tiny(), "pp2-tied")
        elif sc == "pp2tp2":     # needs 4 processes: pipe x model = 2 x 2
            scenario_pipeline(tiny(), "pp2-tp2-tied", tp=2)
    dist.barrier()
    print("ALL OK", flush=True)


if __name__ == "__main__":
    main()
    exit_process()      # not through finalization: megatron_shaping/shutdown.py
