#!/usr/bin/env python
"""Hugging Face Trainer + DeepSpeed + gradient shaping, end to end.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/hf_trainer_example.py              # ZeRO-2, CPU
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/hf_trainer_example.py --zero 3 --max-steps 40
    deepspeed --num_gpus 8 launch/hf_trainer_example.py --bf16 --report-to tensorboard   # GPUs

    # save every 20 steps, then resume from the last Trainer checkpoint (the shaper state comes
    # back with it) and train on to step 60
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/hf_trainer_example.py --save-steps 20 --max-steps 40
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/hf_trainer_example.py --save-steps 20 --max-steps 60 --resume

A small ``LlamaForCausalLM`` built from a ``LlamaConfig`` (no download) is trained by
``transformers.Trainer`` on the running interpreter's standard-library sources (tokenised by
``megatron_shaping.data``, cached in ./cache; about 15 s the first time). What megatron-shaping
adds to an ordinary Trainer script is three lines:

    megatron_shaping.patch_deepspeed()          # deepspeed.initialize now honours "gradient_shaping"
    ds_config["gradient_shaping"] = {...}       # the section, in the config given to TrainingArguments
    add_shaping_callback(trainer)               # shaping figures in the logs and report_to loggers

On 2 CPU cores the default 60 steps take about a minute after start-up.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import warnings  # noqa: E402

# megatron-core (the indexed dataset reader) warns per module that its GPU fast paths are absent.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

import megatron_shaping  # noqa: E402

megatron_shaping.patch_deepspeed()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from megatron_shaping.integrations.hf import add_shaping_callback  # noqa: E402
from megatron_shaping.shutdown import exit_process  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zero", type=int, default=2, choices=[1, 2, 3], help="ZeRO stage")
    p.add_argument("--shaping", default='{"type": "gradient_stabilizer", "params": {"beta1": 0.6, "beta2": 0.999}}',
                   help="the gradient_shaping section, as JSON")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0, help="DeepSpeed gradient_clipping = Trainer max_grad_norm "
                                                          "(applied after shaping; 0 for the shaper alone)")
    p.add_argument("--bf16", action="store_true", help="bf16 (GPUs, or CPUs with AMX); default fp32")
    p.add_argument("--output-dir", default="runs/hf_trainer_example")
    p.add_argument("--save-steps", type=int, default=0, help="Trainer checkpoints every N steps (0: none)")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    p.add_argument("--report-to", default="none", help="Trainer report_to: none, tensorboard, wandb, ...")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help="set by the deepspeed launcher")
    return p.parse_args()


class TokenChunks(torch.utils.data.Dataset):
    """Consecutive ``seq_length`` token windows of an indexed dataset (documents concatenated)."""

    def __init__(self, prefix: str, seq_length: int, samples: int):
        from megatron.core.datasets.indexed_dataset import IndexedDataset
        docs = IndexedDataset(prefix)
        need, parts, have = samples * seq_length, [], 0
        for i in range(len(docs)):
            parts.append(np.asarray(docs[i], dtype=np.int64))
            have += len(parts[-1])
            if have >= need:
                break
        tokens = torch.from_numpy(np.concatenate(parts)[:need])
        if len(tokens) < need:
            raise ValueError(f"{prefix}: {len(tokens)} tokens, {need} needed")
        self.x = tokens.view(samples, seq_length)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def main():
    args = parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpu = os.environ.get("DS_ACCELERATOR", "") == "cpu" or not torch.cuda.is_available()

    from megatron_shaping.data.corpus import prepare_stdlib_corpus
    from megatron_shaping.data.tokenizer import SentencePieceTokenizer
    corpus = prepare_stdlib_corpus(log=print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a: None))
    vocab = SentencePieceTokenizer(corpus.tokenizer_model).vocab_size
    train = TokenChunks(corpus.data_prefix, args.seq_length, args.max_steps * args.micro_batch_size * world)

    ds_config = {
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "train_batch_size": args.micro_batch_size * world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": args.clip,
        "zero_optimization": {"stage": args.zero},
        "bf16": {"enabled": args.bf16},
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 0.1, "torch_adam": on_cpu}},
        "steps_per_print": 10 ** 9,
        "gradient_shaping": json.loads(args.shaping),
    }
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=192, intermediate_size=512,
                                         num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                                         max_position_embeddings=args.seq_length, tie_word_embeddings=True))
    targs = TrainingArguments(
        output_dir=args.output_dir, use_cpu=on_cpu, deepspeed=ds_config, bf16=args.bf16,
        per_device_train_batch_size=args.micro_batch_size, gradient_accumulation_steps=1, max_steps=args.max_steps,
        learning_rate=args.lr, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.1,
        max_grad_norm=args.clip, lr_scheduler_type="cosine", warmup_steps=max(1, args.max_steps // 10),
        logging_steps=10, save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        report_to=args.report_to, seed=args.seed, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=train)
    add_shaping_callback(trainer)
    resume = None
    if args.resume:
        ckpts = sorted(Path(args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        resume = str(ckpts[-1]) if ckpts else None
        if resume is None:
            raise SystemExit(f"--resume: no checkpoint-* in {args.output_dir}")
    trainer.train(resume_from_checkpoint=resume)
    gs = trainer.model_wrapped.gradient_shaping
    if trainer.is_world_process_zero():
        last = [e for e in trainer.state.log_history if "loss" in e][-1]
        print("RESULT " + json.dumps({"step": last["step"], "loss": last["loss"], "grad_norm": last.get("grad_norm"),
                                      **{k: v for k, v in last.items() if k.startswith("shaping/")},
                                      "shaper": repr(gs.session.shaper), "shaping_steps": gs.session.steps}))


if __name__ == "__main__":
    main()
    exit_process()      # not through finalization: megatron_shaping/shutdown.py
