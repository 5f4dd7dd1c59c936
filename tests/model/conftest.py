import os
import socket

import pytest
import torch.distributed as dist


@pytest.fixture(scope="session")
def single_rank():
    """A world of one (gloo) with megatron-core parallel_state at TP=PP=1, for in-process model
    tests. Reuses a process group someone else already initialised."""
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    from megatron.core import parallel_state as ps
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    yield
