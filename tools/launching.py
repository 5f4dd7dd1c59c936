"""Starting processes under the ``deepspeed`` launcher on this machine: a free port, the launcher of
this interpreter and the environment of a launch. Used by ``tools/bench_overhead.py`` and by the
tests' launches (``tests/distributed/launch.py``)."""
import os
import socket
import sys
import time

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


# DeepSpeed 0.19.8's CPU shm comm op creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
# <port>_<rank> (about 69 MB) per rank and never unlinks it: many launches would fill the
# RAM-backed /dev/shm. ``unlink_leaked_shm`` removes the buffers that appeared since ``before``
# and that no live process still maps (a concurrent launch keeps its own).
SHM_DIR = "/dev/shm"
SHM_PREFIX = "deepspeed_allreduce_buffer_"


def shm_buffers() -> set:
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX)}
    except OSError:
        return set()


def _mapped_shm_buffers() -> set:
    mapped = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find(SHM_PREFIX)
                    if i >= 0:
                        mapped.add(line[i:].split()[0])
        except OSError:
            continue
    return mapped


def unlink_leaked_shm(before: set, min_age_s: float = 0.0) -> None:
    """Unlink DeepSpeed shm buffers not in ``before``, mapped by no process and older than
    ``min_age_s`` (a buffer a running launch has just created may not be mapped yet)."""
    new = shm_buffers() - before
    if not new:
        return
    now = time.time()
    for name in new - _mapped_shm_buffers():
        path = os.path.join(SHM_DIR, name)
        try:
            if now - os.stat(path).st_mtime >= min_age_s:
                os.unlink(path)
        except OSError:
            pass
