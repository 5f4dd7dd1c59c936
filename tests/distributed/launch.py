"""The test side of a launch: run a worker script under the ``deepspeed`` launcher (or ``torchrun``)
on CPU, one launch per call. The worker side is tests/distributed/runner.py."""
import json
import os
import subprocess
import sys

from tools.launching import deepspeed_cmd, free_port, launch_env  # noqa: F401 (used by the launch tests)


def init_world_of_one() -> int:
    """A gloo process group of one in this process, unless one exists already (another test's);
    returns the port it was made on (0 when reused)."""
    import torch.distributed as dist
    if dist.is_initialized():
        return 0
    port = free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return port


def run_deepspeed(world: int, script: str, *args: str, timeout: int = 1800, check: bool = True,
                  log: str = None) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus world script args`` with the CPU accelerator; ``log``: a file for the
    whole output. ``check``: raise, with the tail of the output, when the launch fails."""
    cmd = deepspeed_cmd() + ["--num_gpus", str(world), "--master_port", str(free_port()), script, *args]
    return _launch(cmd, f"deepspeed launch ({world} processes)", launch_env(), timeout, check, log)


def run_torchrun(world: int, script: str, *args: str, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node world script args`` (plain torch.distributed, no DeepSpeed) on
    CPU, ``env`` added to the launch environment; raises with the failure report when it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *args]
    return _launch(cmd, f"torchrun launch ({world} processes)", launch_env(**env), timeout)


def _launch(cmd: list, what: str, env: dict, timeout: int, check: bool = True,
            log: str = None) -> subprocess.CompletedProcess:
    """Run a launcher command; ``log``: write its whole output there; ``check``: raise with
    :func:`failed`'s report when it fails."""
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if log:
        with open(log, "w") as f:
            f.write(p.stdout + "\n" + p.stderr)
    if check and p.returncode != 0:
        raise RuntimeError(failed(what, p))
    return p


def failed(what: str, p: subprocess.CompletedProcess) -> str:
    """What a failed launch reports: its tracebacks, then the tail of its output."""
    return (f"{what} failed rc={p.returncode}:\n{_tracebacks(p.stdout + p.stderr)}\n--- output tail ---\n"
            f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def launch_scenarios(world: int, worker: str, scenarios: list, workdir, *args: str, label: str = "",
                     out: str = None, timeout: int = 1800) -> str:
    """Write ``scenarios`` to ``<workdir>/scenarios<label>.json``, run ``worker --scenarios that
    --out <workdir>/<out> args`` on ``world`` processes and return the ``--out`` path (default
    ``results<label>.jsonl``; a worker that writes a folder per scenario gets a folder name)."""
    sc_path = os.path.join(str(workdir), f"scenarios{label}.json")
    with open(sc_path, "w") as f:
        json.dump(scenarios, f)
    out_path = os.path.join(str(workdir), out or f"results{label}.jsonl")
    run_deepspeed(world, worker, "--scenarios", sc_path, "--out", out_path, *args, timeout=timeout)
    return out_path


def read_results(path: str, key: str = "name") -> dict:
    """The JSON lines a worker wrote, by ``key``."""
    with open(path) as f:
        return {r[key]: r for r in map(json.loads, f)}


def _tracebacks(text: str, limit: int = 3) -> str:
    """The last few Python tracebacks in ``text`` (warnings usually flood the tail)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line]
    out = []
    for i in starts[-limit:]:
        block = [lines[i]]
        for line in lines[i + 1:i + 80]:
            block.append(line)
            if line and not line.startswith((" ", "\t")) and ("Error" in line or "Exception" in line):
                break
        out.append("\n".join(block))
    return "\n\n".join(out) if out else "(no Python traceback in the output)"
