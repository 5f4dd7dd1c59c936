"""TP/PP equivalence with the unsharded model, in one 4-process torchrun launch (world 4:
TP=2 runs with DP=2, PP=2 with DP=2, and PP=2 x TP=2). See dist_worker.py for the scenarios."""
from pathlib import Path

import pytest

from tests.distributed.launch import run_torchrun

HERE = Path(__file__).resolve().parent
SCENARIOS = ["tp2-tied-gqa", "tp2-untied-mha", "fp8", "pp2-untied", "pp2-tied", "pp2-tp2-tied"]


@pytest.fixture(scope="module")
def dist_log():
    proc = run_torchrun(4, str(HERE / "dist_worker.py"), SCENARIOS="tp,fp8,pp,pp2tp2")
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(dist_log, scenario):
    assert dist_log.count(f"SCENARIO {scenario} OK") == 4, dist_log[-4000:]
