import pytest

from tests.distributed.launch import init_world_of_one


@pytest.fixture(scope="session")
def single_rank():
    """A world of one (gloo) with megatron-core parallel_state at TP=PP=1, for in-process model
    tests. Reuses a process group someone else already initialised."""
    init_world_of_one()
    from megatron.core import parallel_state as ps
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    yield
