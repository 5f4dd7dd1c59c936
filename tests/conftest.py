"""Suite-wide settings.

CI (CI=true) runs hypothesis derandomized: the same examples every run, so a red CI is
reproducible and a green one is not luck. Local runs keep hypothesis' random exploration, which
is where new counterexamples come from.
"""
import os
import socket
import time

import pytest

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    settings.load_profile("ci")


# DeepSpeed 0.19.8's CPU shm comm op creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
# <port>_<rank> (about 69 MB) per rank and never unlinks it: a suite of many launches would fill
# the RAM-backed /dev/shm. After each test, remove the buffers that appeared since the session
# started and that no live process still maps (a running launch of a concurrent run keeps its own).
_SHM_DIR = "/dev/shm"
_SHM_PREFIX = "deepspeed_allreduce_buffer_"
_SHM_MIN_AGE_S = 30.0


def _shm_buffers() -> set:
    try:
        return {n for n in os.listdir(_SHM_DIR) if n.startswith(_SHM_PREFIX)}
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
                    i = line.find(_SHM_PREFIX)
                    if i >= 0:
                        mapped.add(line[i:].split()[0])
        except OSError:
            continue
    return mapped


@pytest.fixture(scope="session")
def _shm_at_start():
    return _shm_buffers()


@pytest.fixture(autouse=True)
def _unlink_leaked_deepspeed_shm(_shm_at_start):
    # Module-scoped fixtures launch before this runs, so compare with the session's start.
    yield
    new = _shm_buffers() - _shm_at_start
    if new:
        now = time.time()
        for name in new - _mapped_shm_buffers():
            path = os.path.join(_SHM_DIR, name)
            try:
                # A buffer a launch has just created may not be mapped yet: leave young ones.
                if now - os.stat(path).st_mtime > _SHM_MIN_AGE_S:
                    os.unlink(path)
            except OSError:
                pass


@pytest.fixture(scope="module")
def one_rank():
    """A world of one (gloo) for building a DeepSpeed engine in the test process; reuses a process
    group someone else already initialised. The environment DeepSpeed reads is set for the
    module only (later launches must not inherit it)."""
    pytest.importorskip("deepspeed")
    import torch.distributed as dist
    with pytest.MonkeyPatch.context() as mp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        for k, v in dict(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                         WORLD_SIZE="1", LOCAL_RANK="0").items():
            if k not in os.environ:
                mp.setenv(k, v)
        yield
