"""pretrain.py's pieces in-process (they live in megatron_shaping.training): schedule, DeepSpeed
config overrides and errors, arguments."""
import json
import math
import subprocess
import sys

import pytest

from launch_helpers import ROOT

from megatron_shaping import training as pretrain


def args_for(*extra):
    return pretrain.parse_args(["--deepspeed_config", str(ROOT / "configs/deepspeed/zero1_bf16_spamp.json"), *extra])


def test_megatron_argument_names():
    a = args_for("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1",
                 "--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "64",
                 "--train-iters", "5", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2",
                 "--seed", "3", "--data-path", "0.5", "a", "0.5", "b", "--tokenizer-model", "t.model",
                 "--save", "s", "--load", "l", "--save-interval", "2", "--eval-interval", "2",
                 "--eval-iters", "1", "--log-interval", "1", "--model-preset", "llama-tiny", "--local_rank", "0")
    assert (a.tensor_model_parallel_size, a.global_batch_size, a.data_path) == (2, 8, ["0.5", "a", "0.5", "b"])


def test_data_path_needs_tokenizer():
    with pytest.raises(SystemExit):
        args_for("--data-path", "x")


def test_lr_schedule_warmup_then_cosine_to_min():
    a = args_for("--lr", "1.0", "--min-lr", "0.1", "--lr-warmup-iters", "10", "--train-iters", "110")
    lrs = [pretrain.lr_at(i, a) for i in range(130)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)          # linear warmup
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))  # half-way
    assert lrs[110] == pytest.approx(0.1) and lrs[129] == pytest.approx(0.1)      # floor at min-lr
    assert all(x >= y - 1e-12 for x, y in zip(lrs[10:], lrs[11:]))                 # monotone decay


def test_ds_config_overrides():
    a = args_for("--micro-batch-size", "2", "--global-batch-size", "12", "--lr", "5e-4")
    cfg = pretrain.load_ds_config(a, accumulation_steps=3, on_cpu=True)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (12, 2, 3)
    assert cfg["optimizer"]["params"]["lr"] == 5e-4 and cfg["optimizer"]["params"]["torch_adam"] is True
    assert cfg["gradient_shaping"]["type"] == "spamp"


def test_ds_config_errors(tmp_path):
    fp16 = args_for()
    fp16.deepspeed_config = str(ROOT / "configs/deepspeed/zero1_fp16_spamp.json")
    with pytest.raises(ValueError, match="fp16.*GPU"):
        pretrain.load_ds_config(fp16, 1, on_cpu=True)
    assert pretrain.load_ds_config(fp16, 1, on_cpu=False)["fp16"]["enabled"]
    pp = args_for("--pipeline-model-parallel-size", "2")
    pp.deepspeed_config = str(ROOT / "configs/deepspeed/zero2_bf16_spamp.json")
    with pytest.raises(ValueError, match="ZeRO stage 2 cannot be combined with pipeline"):
        pretrain.load_ds_config(pp, 1, on_cpu=True)
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    a = args_for()
    a.deepspeed_config = str(bad)
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        pretrain.load_ds_config(a, 1, on_cpu=True)


def test_generated_configs_up_to_date_and_valid():
    check = subprocess.run([sys.executable, "tools/make_configs.py", "--check"], cwd=ROOT, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    files = sorted((ROOT / "configs/deepspeed").glob("*.json"))
    from megatron_shaping.shapers import REGISTRY
    methods = set(REGISTRY) | {"none"}
    assert len(files) == 3 * 2 * len(methods)     # ZeRO 1-3 x bf16/fp16 x every method and none
    try:
        from megatron_shaping.integrations.deepspeed.config import get_gradient_shaping_config
    except ImportError:      # the DeepSpeed integration is optional for this check
        get_gradient_shaping_config = None
    kinds = set()
    for f in files:
        cfg = json.loads(f.read_text())
        section = cfg.get("gradient_shaping")
        kinds.add(section["type"] if section else "none")
        assert cfg["gradient_clipping"] == (1.0 if section is None else 0.0)
        if section and get_gradient_shaping_config:
            assert get_gradient_shaping_config(cfg).type == section["type"]
    assert kinds == methods


def test_bad_inputs_fail_fast_with_one_line(tmp_path):
    cases = [
        (["--data-path", str(tmp_path / "nope"), "--tokenizer-model", "t.model"], "nope.bin"),
        (["--data-path", str(ROOT / "configs/models/llama-tiny.json"), "--tokenizer-model", "t.model"],
         "llama-tiny.json is raw text.*preprocess_data.py"),
        (["--model-preset", "llama-99b"], "llama-99b"),
        # a misspelt --load trained from scratch with one log line
        (["--load", str(tmp_path / "ckpts-typo"), "--save", str(tmp_path / "ckpts")], "--load .*ckpts-typo: no such"),
    ]
    for extra, match in cases:
        with pytest.raises(SystemExit, match=match) as e:
            pretrain.pretrain(args_for(*extra))
        assert str(e.value).startswith("pretrain.py: error:")


def test_missing_load_directory_is_fine_when_it_is_the_save_directory(tmp_path):
    """--load X --save X: the auto-resume pattern, X does not exist on the first run."""
    pretrain.check_inputs(args_for("--load", str(tmp_path / "ck"), "--save", str(tmp_path / "ck")))
    pretrain.check_inputs(args_for("--load", str(tmp_path)))                      # exists


def test_resume_without_an_iteration_continues_from_the_engines_step(monkeypatch, capsys):
    """A checkpoint saved by another script (no 'iteration' in its client state) continued at
    iteration 0 with the engine at step N; now at N, said in the log."""
    from types import SimpleNamespace

    from megatron_shaping.integrations.deepspeed import checkpointing
    monkeypatch.setattr(checkpointing, "load_checkpoint", lambda engine, load, allow_fresh_state=None: ("ck/s7", {}))
    args = args_for("--load", "ck")
    assert pretrain._resume(SimpleNamespace(global_steps=7), args) == 7
    assert "no 'iteration'" in capsys.readouterr().out
    monkeypatch.setattr(checkpointing, "load_checkpoint",
                        lambda engine, load, allow_fresh_state=None: ("ck/s7", {"iteration": 5, "args": None}))
    assert pretrain._resume(SimpleNamespace(global_steps=7), args) == 5


def test_default_block_pattern_groups_llama_layers():
    """granularity "block" without a pattern: the library default names one block per layer
    index of this model (and the tied embedding), as the model's own BLOCK_PATTERN does."""
    import re
    from megatron_shaping.model import BLOCK_PATTERN
    from megatron_shaping.stats.layout import DEFAULT_BLOCK_PATTERN
    names = {"1.attn.q_proj.weight": "1", "12.mlp_norm.weight": "12", "5.weight": "5",
             "tied_modules.embed.word_embeddings.weight": "tied_modules.embed"}
    for n, block in names.items():
        assert re.match(DEFAULT_BLOCK_PATTERN, n).group(1) == block
        assert re.match(BLOCK_PATTERN, n).group(1) == block


@pytest.mark.parametrize("flag,value", [("--eval-iters", "0"), ("--train-iters", "0"), ("--micro-batch-size", "0"),
                                        ("--global-batch-size", "-1"), ("--log-interval", "-1")])
def test_counts_out_of_range_stop_at_parse_time(flag, value, capsys):
    # --eval-iters 0 crashed at the first evaluation (torch.stack of no losses)
    with pytest.raises(SystemExit):
        args_for(flag, value)
    assert flag in capsys.readouterr().err


def _trained_scheduler(lr, iters):
    import torch
    a = args_for("--lr", str(lr), "--min-lr", "1e-4", "--lr-warmup-iters", "2", "--train-iters", "20")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=a.lr)
    sched = pretrain.lr_scheduler(a)(opt)
    for _ in range(iters):
        opt.step()
        sched.step()
    return a, opt, sched


def test_resume_with_other_schedule_arguments_is_refused_or_follows_the_new_lr():
    from types import SimpleNamespace
    old, _, _ = _trained_scheduler(3e-3, 0)
    new = args_for("--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2", "--train-iters", "20")
    assert pretrain.resume_arg_changes(vars(old), old) == []
    assert pretrain.resume_arg_changes(None, new) == []              # a checkpoint without saved args
    assert pretrain.resume_arg_changes(vars(old), new) == [("lr", 3e-3, 1e-3)]
    later = args_for("--lr", "3e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2", "--train-iters", "40",
                     "--global-batch-size", "32")
    assert [k for k, _, _ in pretrain.resume_arg_changes(vars(old), later)] == ["train_iters", "global_batch_size"]
    # the default corpus of another Python (its cache entry's name; data_path is None for both)
    saved = dict(vars(old), default_corpus="stdlib-py3.11-v4096-0123456789ab")
    assert pretrain.resume_arg_changes(saved, SimpleNamespace(**dict(vars(old), default_corpus=saved["default_corpus"]))) == []
    assert pretrain.resume_arg_changes(saved, SimpleNamespace(**dict(vars(old), default_corpus="stdlib-py3.12-v4096-ba98"))) \
        == [("default_corpus", "stdlib-py3.11-v4096-0123456789ab", "stdlib-py3.12-v4096-ba98")]
    # --override-resume-args: the restored LambdaLR kept the old base LR (3e-3) under the new
    # factor lr_at(it) / 1e-3, three times the new schedule's LR
    _, opt, sched = _trained_scheduler(3e-3, 5)
    sched.lr_lambdas = [lambda it: pretrain.lr_at(it, new) / new.lr]    # what the resumed run builds
    assert sched.base_lrs[0] * sched.lr_lambdas[0](5) == pytest.approx(3 * pretrain.lr_at(5, new))
    pretrain.follow_new_lr(SimpleNamespace(lr_scheduler=sched), new)
    assert opt.param_groups[0]["lr"] == pytest.approx(pretrain.lr_at(5, new), rel=1e-12)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(pretrain.lr_at(6, new), rel=1e-12)


def test_tokens_per_second_leaves_out_only_the_evaluation(monkeypatch):
    # eval every 15, log every 10: resetting the window's clock after the evaluation at 15
    # dropped the time of iterations 11-15 while still counting them (2x the true rate)
    clock = [0.0]
    monkeypatch.setattr(pretrain.time, "time", lambda: clock[0])
    t = pretrain.Trainer.__new__(pretrain.Trainer)
    t.train_iters, t.intervals, t.save = 100, pretrain.Intervals(10, 15, 0), None

    def evaluate(done, h):
        clock[0] += 7.0                      # the evaluation takes 7 s
    t._evaluate = evaluate
    t._window = [0.0, 5, 100.0]              # iterations 11-15 in the window, started at t=100
    clock[0] = 105.0                         # 1 s per iteration
    spent = t._at_iteration_end(15, pretrain.History())
    assert spent == 7.0 and t._window[2] == 107.0     # 112 - 107 = the 5 s of training so far


def test_each_micro_batch_loss_reaches_the_spike_rule():
    # gradient_shaping.skip.loss_z never acted in pretrain.py: nothing called observe_loss
    import torch
    from types import SimpleNamespace
    seen = []
    losses = iter([2.0, 4.0])

    class Engine:
        gradient_shaping = SimpleNamespace(observe_loss=lambda loss: seen.append(float(loss)))
        monitor = SimpleNamespace(enabled=False)
        global_samples = 0
        device = torch.device("cpu")

        def __call__(self, *batch):
            return torch.tensor(next(losses))

        def backward(self, loss):
            pass

        def step(self):
            pass

    t = pretrain.Trainer.__new__(pretrain.Trainer)
    t.engine, t.ctx = Engine(), SimpleNamespace(is_pipeline=False, dp=1)
    mb = {"tokens": torch.zeros(1), "labels": torch.zeros(1), "loss_mask": torch.ones(1)}
    t.data = SimpleNamespace(schedule=SimpleNamespace(micro_batches=lambda ds, it: [mb, mb]), train_ds=None)
    t.dist, t.dp_group = SimpleNamespace(all_reduce=lambda x, group=None: None, get_rank=lambda: 0), None
    assert t.step(0) == pytest.approx(3.0) and seen == [2.0, 4.0]


def test_batches_reach_the_engines_device():
    """The data loader gives CPU tensors and DeepSpeed's plain engine does not move its inputs:
    on a GPU, the first forward (the start-of-run evaluation) stopped on a device mismatch.
    A stand-in engine on the ``meta`` device records where its inputs are."""
    import torch
    from types import SimpleNamespace

    seen = []

    class Engine:
        device = torch.device("meta")
        monitor = SimpleNamespace(enabled=False)
        global_samples = 0

        def __call__(self, *inputs):
            seen.append({t.device.type for t in inputs})
            return torch.tensor(2.0, requires_grad=True)

        def backward(self, loss):
            pass

        def step(self):
            pass

        def eval(self):
            pass

        def train(self):
            pass

    mb = {"tokens": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long),
          "loss_mask": torch.ones(2, 4)}
    t = pretrain.Trainer.__new__(pretrain.Trainer)
    t.engine = Engine()
    t.ctx = SimpleNamespace(is_pipeline=False, dp=1)
    t.data = SimpleNamespace(schedule=SimpleNamespace(micro_batches=lambda ds, it: [mb, mb]), train_ds=None,
                             valid_batches=[[mb]])
    t.dist = SimpleNamespace(all_reduce=lambda x, group=None: None, get_rank=lambda: 0)
    t.dp_group = None
    assert t.step(0) == 2.0
    assert t.evaluate() == 2.0
    assert seen == [{"meta"}] * 3, seen
