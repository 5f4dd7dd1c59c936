"""launch/run_demo.sh picks its precision (DRY_RUN: the command is printed, nothing is trained)."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def dry_run(tmp_path, cpu_flags=None, **env):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {cpu_flags or ''}\n")
    e = {k: v for k, v in os.environ.items() if k not in ("PRECISION", "DS_ACCELERATOR", "SHAPER", "ZERO")}
    e.update(DRY_RUN="1", CPUINFO=str(cpuinfo), **env)
    p = subprocess.run(["bash", str(ROOT / "launch" / "run_demo.sh")], cwd=ROOT, env=e, capture_output=True, text=True)
    return p


def config_of(out: str) -> dict:
    cmd = out.strip().splitlines()[-1].split()
    with open(ROOT / cmd[cmd.index("--deepspeed_config") + 1]) as f:
        return json.load(f)


@pytest.mark.parametrize("flags", ["", "avx512f avx512_bf16"])
def test_cpu_without_amx_runs_fp32(tmp_path, flags):
    """avx512_bf16 alone is not enough: bf16 trained 8x slower than fp32 on such a CPU."""
    p = dry_run(tmp_path, flags)
    assert p.returncode == 0, p.stderr
    assert "run_demo: fp32" in p.stdout
    cfg = config_of(p.stdout)
    assert cfg["bf16"] == {"enabled": False}
    assert "fp16" not in cfg or not cfg["fp16"].get("enabled")
    assert cfg["gradient_shaping"]["type"] == "gradient_stabilizer"      # the rest of the config kept
    assert "--train-iters 150" in p.stdout


def test_amx_cpu_accelerator_or_request_runs_bf16(tmp_path):
    for kw in ({"cpu_flags": "amx_bf16 amx_tile"}, {"PRECISION": "bf16"}, {"DS_ACCELERATOR": "cuda"}):
        p = dry_run(tmp_path, **kw)
        assert p.returncode == 0, (kw, p.stderr)
        assert "run_demo: bf16" in p.stdout, kw
        assert config_of(p.stdout)["bf16"] == {"enabled": True}
    p = dry_run(tmp_path, "amx_bf16", PRECISION="fp32")
    assert "run_demo: fp32" in p.stdout


def test_bad_precision_is_refused(tmp_path):
    p = dry_run(tmp_path, PRECISION="fp8")
    assert p.returncode == 2 and "PRECISION must be auto, bf16 or fp32" in p.stderr
