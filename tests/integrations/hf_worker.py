"""Run under the ``deepspeed`` launcher (2 CPU processes): a tiny ``LlamaForCausalLM`` trained by
``transformers.Trainer`` with a DeepSpeed config that has a ``gradient_shaping`` section, after
``megatron_shaping.patch_deepspeed()``. Per ZeRO stage (``--stages``):

* ``hf``       Trainer, STEPS steps, checkpoints every SAVE steps, ShapingCallback installed with
               ``add_shaping_callback`` and ``report_to=["tensorboard"]``; records the micro
               batches the Trainer fed and the shaper's per-step statistics;
* ``manual``   the same model/data/seed through ``megatron_shaping.initialize`` and a hand-written
               loop replaying the recorded micro batches (the reference for the Trainer run);
* ``manual_other`` / ``manual_off``: the same with another shaper parameter / without shaping
               (shows how far the statistics move when the shaping differs: the power of the
               comparison);
* ``accelerate_gas1`` / ``accelerate_gas2``: Accelerate without the Trainer (``Accelerator`` with
               a ``DeepSpeedPlugin``, ``prepare``, ``accumulate``, ``backward``) over the same
               micro batches, one optimizer step per micro batch and one per GAS of them, each
               with the ``manual`` loop of the same config as its reference;
* ``resumed``  a new Trainer resumed from ``checkpoint-SAVE`` of ``hf`` (``resume_from_checkpoint``);
* ``fresh``    the same from a copy of that checkpoint without the shaper state and with
               ``allow_fresh_state`` (what a resume without the shaper state does);
* ``missing``  that copy without ``allow_fresh_state``: must stop (error class recorded).

Writes ``<out>/stage<N>.json`` (rank 0) with everything the pytest side compares.
"""
from __future__ import annotations

import faulthandler
import glob
import os
import shutil
import signal
import traceback

faulthandler.register(signal.SIGUSR1)     # kill -USR1 <pid>: Python stacks of a stuck rank on stderr

import torch  # noqa: E402

import megatron_shaping  # noqa: E402
from tests.distributed import runner  # noqa: E402

# Before transformers/accelerate build anything: every deepspeed.initialize attaches the shaper.
megatron_shaping.patch_deepspeed()

from transformers import (LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments)

from megatron_shaping.integrations.deepspeed.patch import engine_for_module  # noqa: E402
from megatron_shaping.integrations.hf import ObserveLossMixin, add_shaping_callback  # noqa: E402
from megatron_shaping.shutdown import exit_process  # noqa: E402

SEED = 1234
STEPS = 6
SAVE = 3
MBS = 2
SEQ = 16
VOCAB = 96
LR = 3e-3
CLIP = 1.0
SAMPLES = 64
GAS = 2                    # accumulation steps of the Accelerate-with-accumulation run
LOSS_GAS = 3               # ... of the loss-rule run (16 micro batches per epoch and rank: remainder 1)
SHAPING = {"type": "gradient_stabilizer", "params": {"beta1": 0.6, "beta2": 0.999}}
OTHER = {"type": "gradient_stabilizer", "params": {"beta1": 0.9, "beta2": 0.999}}
#: the spike rule on the loss only (a z no step reaches: nothing is skipped, the history is compared)
LOSS_RULE = dict(SHAPING, skip={"grad_norm_z": None, "loss_z": 50.0, "window": 16, "min_history": 2})


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def ds_config(stage: int, shaping, gas: int = 1) -> dict:
    cfg = {"train_batch_size": MBS * gas * world(), "train_micro_batch_size_per_gpu": MBS,
           "gradient_accumulation_steps": gas, "gradient_clipping": CLIP, "steps_per_print": 10 ** 9,
           "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-8,
                                                     "weight_decay": 0.0, "torch_adam": True}}}
    if shaping is not None:
        cfg["gradient_shaping"] = shaping
    return cfg


def llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                       tie_word_embeddings=False)


torch.manual_seed(SEED)
# One initial state for every run, built before any TrainingArguments exists (under a ZeRO-3
# TrainingArguments, transformers' from_config/from_pretrained build inside deepspeed.zero.Init),
# so every run starts from the same weights whatever the construction path.
INIT = {k: v.clone() for k, v in LlamaForCausalLM(llama_config()).state_dict().items()}


def make_model() -> LlamaForCausalLM:
    m = LlamaForCausalLM(llama_config())
    m.load_state_dict(INIT)
    return m


class Tokens(torch.utils.data.Dataset):
    """Synthetic token ids (no tokenizer needed): a noisy repeating pattern, so the loss falls."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        base = torch.arange(SEQ).repeat(SAMPLES, 1) * 7 % VOCAB
        noise = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=g)
        keep = torch.rand(SAMPLES, SEQ, generator=g) < 0.7
        self.x = torch.where(keep, base, noise)

    def __len__(self):
        return SAMPLES

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def step_stats(gs, record) -> dict:
    out = {"figures": gs.log_dict()}
    if record is not None:
        out.update(before=record.stats_before.sumsq.tolist(), factor=record.factor.tolist(),
                   after=record.stats_after.sumsq.tolist())
    return out


class Recorder(TrainerCallback):
    """Appends every optimizer step's shaping statistics (hooked on the engine the patched
    deepspeed.initialize built for the Trainer)."""

    def __init__(self):
        self.steps = []
        self.attached = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        engine = engine_for_module(model)
        gs = getattr(engine, "gradient_shaping", None)
        self.attached = gs is not None
        if gs is not None:
            gs.callbacks.append(lambda s, r: self.steps.append(step_stats(s, r)))


class RecordingTrainer(Trainer):
    """Records the micro batches it trains on (input ids, num_items_in_batch, and the loss it
    backpropagates), so that a hand-written loop can replay them."""

    def __init__(self, *a, batches=None, **k):
        super().__init__(*a, **k)
        self.batches = batches

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if self.batches is not None and model.training:
            # The Trainer may rescale the model's loss in place (outputs.loss is then the same
            # tensor): keep the value it backpropagates; the replay derives the factor from it.
            nib = num_items_in_batch.clone() if torch.is_tensor(num_items_in_batch) else num_items_in_batch
            self.batches.append({"input_ids": inputs["input_ids"].clone(), "labels": inputs["labels"].clone(),
                                 "num_items_in_batch": nib, "loss": float(loss.detach()),
                                 "step": int(self.state.global_step)})
        return (loss, outputs) if return_outputs else loss


class ObservingTrainer(ObserveLossMixin, RecordingTrainer):
    """The Trainer a user of the spike rule's loss_z test writes (docs/INTEGRATIONS.md)."""


class MeanLossTrainer(ObservingTrainer):
    """A model whose loss takes no ``num_items_in_batch``: each micro batch's loss is its own
    mean (the Trainer divides it by the accumulation steps after compute_loss)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.model_accepts_loss_kwargs = False


def full_params(engine, stage: int) -> dict:
    import deepspeed
    params = list(engine.module.parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def hf_run(stage, shaping, out_dir, resume=None, save=False, batches=None, report=False,
           trainer_cls=None, evaluate=False, gas=1):
    extra = dict(eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=MBS) if evaluate else {}
    args = TrainingArguments(
        output_dir=out_dir, use_cpu=True, ddp_backend="gloo", deepspeed=ds_config(stage, shaping, gas),
        per_device_train_batch_size=MBS, gradient_accumulation_steps=gas, max_steps=STEPS,
        learning_rate=LR, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0,
        max_grad_norm=CLIP, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=1, save_strategy="steps" if save else "no", save_steps=SAVE,
        report_to=["tensorboard"] if report else "none", seed=SEED, data_seed=SEED,
        disable_tqdm=True, dataloader_num_workers=0, **extra)
    trainer = (trainer_cls or RecordingTrainer)(model=make_model(), args=args, train_dataset=Tokens(),
                                                eval_dataset=Tokens() if evaluate else None, batches=batches)
    add_shaping_callback(trainer)
    rec = Recorder()
    trainer.add_callback(rec)
    trainer.train(resume_from_checkpoint=resume)
    engine = trainer.model_wrapped
    return {"steps": rec.steps, "attached": rec.attached, "log_history": trainer.state.log_history,
            "params": full_params(engine, stage), "engine": engine}


def replay_loss(engine, b):
    """The loss of the recorded micro batch ``b`` as the Trainer backpropagated it. transformers
    multiplies the loss by the number of processes when it averages tokens across devices
    (num_items_in_batch is the global token count): the same integer factor here (the runs with
    other shaping have other weights after step 1, hence other losses)."""
    out = engine(input_ids=b["input_ids"], labels=b["labels"], num_items_in_batch=b["num_items_in_batch"])
    ratio = b["loss"] / float(out.loss.detach())
    assert abs(ratio - round(ratio)) < 0.1 and round(ratio) >= 1, f"loss factor {ratio}"
    return out.loss * float(round(ratio))


def recording(engine) -> list:
    """The list every optimizer step's statistics of ``engine``'s shaper are appended to."""
    steps = []
    if getattr(engine, "gradient_shaping", None) is not None:
        engine.gradient_shaping.callbacks.append(lambda s, r: steps.append(step_stats(s, r)))
    return steps


def manual_run(stage, shaping, batches, gas=1):
    """megatron_shaping.initialize and the plain DeepSpeed loop over the Trainer's micro batches
    (with ``gas`` > 1, DeepSpeed's own accumulation boundary every ``gas`` micro batches)."""
    model = make_model()
    engine, _, _, _ = megatron_shaping.initialize(model=model, model_parameters=model.parameters(),
                                                  config=ds_config(stage, shaping, gas))
    steps = recording(engine)
    model.train()
    for b in batches:
        engine.backward(replay_loss(engine, b))
        engine.step()
    return {"steps": steps, "params": full_params(engine, stage)}


def accelerate_run(stage, shaping, batches, gas=1):
    """Accelerate without the Trainer (docs/INTEGRATIONS.md): ``Accelerator(deepspeed_plugin=
    DeepSpeedPlugin(hf_ds_config=...))``, ``accelerator.prepare(model, DummyOptim)`` through the
    patched ``deepspeed.initialize``, the loop in ``accelerator.accumulate`` with
    ``accelerator.backward`` (which sets DeepSpeed's accumulation boundary itself from
    ``sync_gradients``), ``optimizer.step()`` and ``zero_grad()``, over the same micro batches."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DeepSpeedPlugin, DummyOptim

    # the Trainer runs before left their Accelerator state behind (a process-wide singleton)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    plugin = DeepSpeedPlugin(hf_ds_config=ds_config(stage, shaping, gas), gradient_accumulation_steps=gas)
    # (no cpu=True: Accelerate then leaves DeepSpeed out; the engine finds its 2 ranks itself)
    acc = Accelerator(deepspeed_plugin=plugin)
    model = make_model()
    model, opt = acc.prepare(model, DummyOptim(model.parameters(), lr=LR))
    engine = acc.deepspeed_engine_wrapped.engine
    steps = recording(engine)
    boundaries = []
    model.train()
    for b in batches:
        with acc.accumulate(model):
            acc.backward(replay_loss(model, b))
            boundaries.append(bool(acc.sync_gradients))
            opt.step()
            opt.zero_grad()
    res = {"steps": steps, "params": full_params(engine, stage), "attached": engine is model
           and getattr(engine, "gradient_shaping", None) is not None, "boundaries": boundaries,
           "dp_world": engine.dp_world_size}
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return res


def param_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over all parameters (0.0: bit-identical)."""
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def scenario(stage: int, out: str) -> dict:
    base = os.path.join(out, f"z{stage}")
    res = {"stage": stage}
    batches = []
    hf = hf_run(stage, SHAPING, os.path.join(base, "hf"), save=True, batches=batches, report=True)
    res["hf"] = {"steps": hf["steps"], "attached": hf["attached"], "log_history": hf["log_history"]}
    res["batches"] = len(batches)
    if rank() == 0:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        tb = {}
        for ev in glob.glob(os.path.join(base, "hf", "runs", "**", "events.out.tfevents.*"), recursive=True):
            acc = EventAccumulator(ev)
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                tb.setdefault(tag, []).extend([(e.step, e.value) for e in acc.Scalars(tag)])
        res["tensorboard"] = {k: sorted(v) for k, v in tb.items() if "shaping" in k or k.endswith("grad_norm")}

    man = manual_run(stage, SHAPING, batches)
    res["manual"] = {"steps": man["steps"], "param_diff_vs_hf": param_diff(man["params"], hf["params"])}
    res["manual_other"] = {"steps": manual_run(stage, OTHER, batches)["steps"]}
    off = manual_run(stage, None, batches)
    res["manual_off"] = {"param_diff_vs_hf": param_diff(off["params"], hf["params"])}
    # Accelerate without the Trainer, one optimizer step per micro batch and one per GAS of them
    for gas in (1, GAS):
        a = accelerate_run(stage, SHAPING, batches, gas)
        m = man if gas == 1 else manual_run(stage, SHAPING, batches, gas)
        res[f"accelerate_gas{gas}"] = {"steps": a["steps"], "attached": a["attached"], "boundaries": a["boundaries"],
                                       "manual_steps": m["steps"], "param_diff": param_diff(a["params"], m["params"]),
                                       "param_diff_vs_gas1": param_diff(a["params"], man["params"]),
                                       "dp_world": a["dp_world"]}

    ckpt = os.path.join(base, "hf", f"checkpoint-{SAVE}")
    res["ckpt_files"] = sorted(os.path.relpath(p, ckpt) for p in glob.glob(os.path.join(ckpt, "**"), recursive=True)
                               if os.path.isfile(p))
    resumed = hf_run(stage, SHAPING, os.path.join(base, "resumed"), resume=ckpt)
    res["resumed"] = {"steps": resumed["steps"], "log_history": resumed["log_history"],
                      "param_diff_vs_hf": param_diff(resumed["params"], hf["params"]),
                      "last_load": dict(resumed["engine"].gradient_shaping.checkpointing.last_load or {},
                                        meta=None)}

    # The same checkpoint without the shaper state.
    bare = os.path.join(base, "bare", f"checkpoint-{SAVE}")
    if rank() == 0:
        shutil.copytree(ckpt, bare)
        for p in glob.glob(os.path.join(bare, "global_step*", "gradient_shaping_state.pt")):
            os.remove(p)
    torch.distributed.barrier()
    fresh = hf_run(stage, dict(SHAPING, allow_fresh_state=True), os.path.join(base, "fresh"), resume=bare)
    res["fresh"] = {"steps": fresh["steps"], "param_diff_vs_hf": param_diff(fresh["params"], hf["params"]),
                    "last_load": dict(fresh["engine"].gradient_shaping.checkpointing.last_load or {}, meta=None)}
    if stage == 2:
        res["loss_rule"] = loss_rule_runs(base)
    try:
        hf_run(stage, SHAPING, os.path.join(base, "missing"), resume=bare)
        res["missing"] = {"error": None}
    except Exception as e:            # noqa: BLE001 - the class and message are what the test checks
        res["missing"] = {"error": type(e).__name__, "message": str(e)[:500]}
    return res


def loss_rule_runs(base) -> dict:
    """The spike rule's loss history after a Trainer run with evaluations every 2 steps: fed by
    ObserveLossMixin (``mixin``), and by nothing with the plain Trainer (``plain``); ``mixin_gas``:
    LOSS_GAS accumulation steps, which do not divide the epoch's 16 micro batches per rank, so the
    last of the 6 steps has 1 micro batch. ``expected``: each step's training loss, the sum of
    its micro batches' losses as the Trainer backpropagated them (their shares of the step's
    token count), averaged over the ranks; ``micro``: micro batches per step. ``mixin_gas_mean``:
    the same where the model's loss takes no token count (each micro batch's loss its own
    mean, so the step's loss is their mean)."""
    out = {}
    for name, cls, gas in (("mixin", ObservingTrainer, 1), ("plain", RecordingTrainer, 1),
                           ("mixin_gas", ObservingTrainer, LOSS_GAS), ("mixin_gas_mean", MeanLossTrainer, LOSS_GAS)):
        batches = []
        run = hf_run(2, LOSS_RULE, os.path.join(base, f"loss_{name}"), batches=batches, trainer_cls=cls,
                     evaluate=True, gas=gas)
        rule = run["engine"].gradient_shaping.skip
        per_step = {}
        for b in batches:
            per_step.setdefault(b["step"], []).append(b["loss"])
        # shares of the step add up to its loss; a micro batch's own mean loss is averaged
        agg = (lambda v: sum(v) / len(v)) if cls is MeanLossTrainer else sum
        mine = [agg(per_step[k]) for k in sorted(per_step)]
        every = [None] * world()
        torch.distributed.all_gather_object(every, mine)
        out[name] = {"history": rule.losses.values().tolist(), "skips": rule.skips,
                     "evals": sum(1 for e in run["log_history"] if "eval_loss" in e),
                     "micro": [len(per_step[k]) for k in sorted(per_step)], "shaped_steps": len(run["steps"]),
                     "global_steps": int(run["engine"].global_steps),
                     "expected": [sum(r[i] for r in every) / len(every) for i in range(len(every[0]))]}
    return out


def main():
    # transformers' Trainer builds the process group itself: no runner.init_distributed
    w = runner.start(("--stages", dict(default="2,3")), items=None, init=False)
    stages = [int(st) for st in w.args.stages.split(",")]
    for stage, res in w.each(lambda st: scenario(st, w.args.out), items=stages,
                             on_error=lambda e, st, r: {"stage": st, "error": traceback.format_exc()}):
        w.write_json(os.path.join(w.args.out, f"stage{stage}.json"), res)


if __name__ == "__main__":
    main()
    exit_process()      # not through finalization: megatron_shaping/shutdown.py
