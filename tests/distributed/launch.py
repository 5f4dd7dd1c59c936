"""Run a worker script under the ``deepspeed`` launcher on CPU (one launch per call)."""
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_deepspeed(world: int, script: str, *args: str, timeout: int = 1800) -> None:
    """``deepspeed --num_gpus world script args`` with the CPU accelerator; raises with the
    tail of the output when the launch fails."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(world),
           "--master_port", str(free_port()), script, *args]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"deepspeed launch ({world} processes) failed rc={p.returncode}:\n"
                           f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
