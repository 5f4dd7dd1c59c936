#!/usr/bin/env bash
# Create ./.venv with the pinned CPU stack and the package installed in editable mode.
# Idempotent: a second run only checks. Usage: bash tools/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.megatron_shaping_setup
want="$(cat requirements/cpu.txt pyproject.toml | sha1sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -r requirements/cpu.txt
python -m pip install -q --disable-pip-version-check --no-build-isolation "deepspeed==0.19.8"
python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
python - <<'PY'
import torch, deepspeed, megatron.core, sentencepiece, zclip
print(f"megatron-shaping env: torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
      f"megatron-core {megatron.core.__version__}")
PY
echo "$want" > "$stamp"
