import json
from pathlib import Path

from tests.distributed.launch import deepspeed_cmd, free_port, launch_env  # noqa: F401 (used by the launch tests)

ROOT = Path(__file__).resolve().parents[2]


def results(output: str):
    return [json.loads(line.split("RESULT ", 1)[1]) for line in output.splitlines() if line.startswith("RESULT ")]
