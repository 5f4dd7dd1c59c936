#!/usr/bin/env bash
# The wheels the GPU machines' image lacks, into .whl/ (git-ignored) for tools/gpu_check.sh.
#
#   bash tools/gpu_wheels.sh          # here, where the package registries are reachable
#
# The device image (docs: /work/.library/device/KINDS.md) has Python 3.12 and a CUDA torch but
# no DeepSpeed, pydantic (+ pydantic-core, annotated-types, typing-inspection), hjson or
# megatron-core, and nothing can be fetched there. This downloads cp312 manylinux wheels of the
# versions in this checkout's .venv, builds a wheel of DeepSpeed (none is published: its ops
# are left to JIT, as in the .venv) and lists what it wrote. Then call the device with
# carry [".whl"]: gpu_check.sh installs them with pip --no-index --target before it starts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
D="$ROOT/.whl"
mkdir -p "$D"
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done
for pkg in pydantic pydantic_core annotated_types typing_inspection hjson megatron-core; do
    spec="$pkg==$(ver "$pkg")"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$D" "$spec"
done
DS="deepspeed==$(ver deepspeed)"
if ! compgen -G "$D/deepspeed-*.whl" >/dev/null; then
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$D" "$DS"
fi
ls -l "$D"
du -sh "$D"
