"""Starting processes under the ``deepspeed`` launcher on this machine: a free port, the launcher of
this interpreter and the environment of a launch. Used by ``tools/bench_overhead.py`` and by the
tests' launches (``tests/distributed/launch.py``)."""
import os
import socket
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cmd() -> list:
    """The ``deepspeed`` launcher of this interpreter."""
    exe = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "deepspeed.launcher.runner"]


def launch_env(**extra) -> dict:
    """The environment of a launch: CPU accelerator, one thread per process, unbuffered output and the
    repository root on ``PYTHONPATH`` (workers import the package and, in tests,
    ``tests.distributed.runner``); ``extra`` overrides any of them."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)
    env.update(extra)
    return env
