"""launch/pretrain.py through the deepspeed launcher on CPU (gloo): a short training run on the
default corpus that must lower the validation loss, an exact resume, and a two-"node" run on one
machine (--no_ssh, one launcher per node) whose nodes must agree on the losses."""
import subprocess
import time

import pytest

from launch_helpers import ROOT, deepspeed_cmd, free_port, launch_env, results

CONFIG = str(ROOT / "configs/deepspeed/zero1_bf16_gradient_stabilizer.json")
COMMON = ["--model-preset", "llama-tiny", "--micro-batch-size", "4", "--global-batch-size", "16",
          "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "5", "--eval-iters", "2", "--log-interval", "5"]


def run(cmd, timeout=300, env=None):
    proc = subprocess.run(cmd, cwd=ROOT, env=env or launch_env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    save = tmp_path_factory.mktemp("ckpt")
    out = run(deepspeed_cmd() + ["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
                                 "--deepspeed_config", CONFIG, *COMMON, "--train-iters", "20",
                                 "--eval-interval", "10", "--save", str(save), "--save-interval", "10"])
    return out, save


def test_short_run_lowers_validation_loss(first_run):
    out, _ = first_run
    (r,) = results(out)
    assert r["world_size"] == 2 and r["dp"] == 2 and r["shaper"] == "gradient_stabilizer"
    assert r["final_val_loss"] < r["initial_val_loss"] - 1.0, r
    assert r["shaping_steps"] == 20 and r["shaping_skipped"] == 0
    for text in ("[train] iteration    20/20 | loss", "tokens/s", "shaping[gradient_stabilizer]: grad norm",
                 "[eval] iteration 20: val loss"):
        assert text in out


def test_resume_reproduces_the_uninterrupted_run(first_run):
    out, save = first_run
    (full,) = results(out)
    # Point "latest" at the iteration-10 checkpoint and train 10..20 again.
    (save / "latest").write_text("iter_0000010")
    resumed = run(deepspeed_cmd() + ["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
                                     "--deepspeed_config", CONFIG, *COMMON, "--train-iters", "20",
                                     "--eval-interval", "10", "--load", str(save)])
    (r,) = results(resumed)
    assert r["start_iteration"] == 10
    assert r["final_val_loss"] == pytest.approx(full["final_val_loss"], abs=1e-4)
    assert r["final_train_loss"] == pytest.approx(full["final_train_loss"], abs=1e-4)
    # the same resume with another --lr: stopped with the argument named (it went on with the
    # old base LR under the new schedule's factor)
    common = [a if a != "3e-3" else "1e-3" for a in COMMON]
    proc = subprocess.run(deepspeed_cmd() + ["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
                                             "--deepspeed_config", CONFIG, *common, "--train-iters", "20",
                                             "--eval-interval", "10", "--load", str(save)],
                          cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "--lr 0.003 -> 0.001" in out and "--override-resume-args" in out, out[-4000:]


def test_multinode_refuses_a_missing_hostfile(tmp_path):
    """The deepspeed launcher only warns about a missing hostfile and trains on this node alone
    (exit 0 after a one-node run): the script stops first, naming it."""
    p = subprocess.run(["bash", str(ROOT / "launch/run_multinode.sh"), "--deepspeed_config", CONFIG], cwd=tmp_path,
                       env=dict(launch_env(), HOSTFILE="hostfiel"), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "HOSTFILE hostfiel: no such file" in p.stderr, p.stderr


def test_two_nodes_on_one_machine_agree(tmp_path):
    """Hostfile of two 'nodes' (localhost, 127.0.0.1) with one slot each, one launcher per node
    through launch/run_multinode.sh with NO_SSH=1 (--no_ssh --node_rank), started from another
    directory with a relative HOSTFILE; pipeline-parallel across the nodes, so stage 0 and stage
    1 live on different nodes."""
    (tmp_path / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    script = str(ROOT / "launch/run_multinode.sh")
    args = ["--deepspeed_config", str(ROOT / "configs/deepspeed/zero1_bf16_spamp.json"), *COMMON,
            "--train-iters", "8", "--eval-interval", "8", "--pipeline-model-parallel-size", "2"]
    env = dict(launch_env(), NO_SSH="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, HOSTFILE="hostfile",
               DEEPSPEED=" ".join(deepspeed_cmd()) if len(deepspeed_cmd()) == 1 else "deepspeed")
    procs = [subprocess.Popen(["bash", script, *args], cwd=tmp_path, env=dict(env, NODE_RANK=str(n)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    deadline = time.time() + 300
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1, deadline - time.time()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-6000:]
    r0, r1 = results(outs[0]), results(outs[1])
    assert len(r0) == 1 and len(r1) == 1, (r0, r1)
    assert (r0[0]["rank"], r1[0]["rank"]) == (0, 1)
    assert r0[0]["pp"] == 2 and r0[0]["world_size"] == 2
    for key in ("initial_val_loss", "final_val_loss", "final_train_loss"):
        assert r0[0][key] == r1[0][key], key
    assert r0[0]["final_val_loss"] < r0[0]["initial_val_loss"]
