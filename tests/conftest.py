"""Suite-wide settings.

CI (CI=true) runs hypothesis derandomized: the same examples every run, so a red CI is
reproducible and a green one is not luck. Local runs keep hypothesis' random exploration, which
is where new counterexamples come from.
"""
import os

import pytest

from hypothesis import settings

from tests.distributed.launch import init_world_of_one
from tools.launching import free_port, shm_buffers, unlink_leaked_shm

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    settings.load_profile("ci")


# DeepSpeed's CPU shm comm op never unlinks its /dev/shm buffers (tools/launching.py): after each
# test, remove those that appeared since the session started and that no live process maps.
_SHM_MIN_AGE_S = 30.0


@pytest.fixture(scope="session")
def _shm_at_start():
    return shm_buffers()


@pytest.fixture(autouse=True)
def _unlink_leaked_deepspeed_shm(_shm_at_start):
    # Module-scoped fixtures launch before this runs, so compare with the session's start.
    yield
    unlink_leaked_shm(_shm_at_start, _SHM_MIN_AGE_S)


@pytest.fixture(scope="module")
def one_rank():
    """A world of one (gloo) for building a DeepSpeed engine in the test process; reuses a process
    group someone else already initialised. The environment DeepSpeed reads is set for the
    module only (later launches must not inherit it)."""
    pytest.importorskip("deepspeed")
    with pytest.MonkeyPatch.context() as mp:
        port = init_world_of_one() or free_port()
        for k, v in dict(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                         WORLD_SIZE="1", LOCAL_RANK="0").items():
            if k not in os.environ:
                mp.setenv(k, v)
        yield
