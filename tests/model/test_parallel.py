"""TP/PP equivalence with the unsharded model, in one 4-process torchrun launch (world 4:
TP=2 runs with DP=2, PP=2 with DP=2, and PP=2 x TP=2). See dist_worker.py for the scenarios."""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.launch import free_port, launch_env

HERE = Path(__file__).resolve().parent
SCENARIOS = ["tp2-tied-gqa", "tp2-untied-mha", "fp8", "pp2-untied", "pp2-tied", "pp2-tp2-tied"]


@pytest.fixture(scope="module")
def dist_log():
    env = launch_env(SCENARIOS="tp,fp8,pp,pp2tp2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(HERE / "dist_worker.py")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(dist_log, scenario):
    assert dist_log.count(f"SCENARIO {scenario} OK") == 4, dist_log[-4000:]
