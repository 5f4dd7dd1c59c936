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
                           f"{_tracebacks(p.stdout + p.stderr)}\n--- output tail ---\n"
                           f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


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
