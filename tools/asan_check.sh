#!/usr/bin/env bash
# The C kernels (megatron_shaping/stats/_maps.c) under AddressSanitizer: every read and write
# past a tensor's allocation is reported. Builds the library with -fsanitize=address into its
# own cache directory (the package's cached library is not touched), preloads libasan, then
#   1. a control: one map call over one element more than its tensor holds must be reported
#      (else the check could not fail and the script stops with an error);
#   2. the kernel and statistics tests (tests/stats, in-process; the DeepSpeed worker test aside);
#   3. short benchmark runs through DeepSpeed (LLaMA ZeRO-2 fp32, mlp ZeRO-3 bf16): the kernels
#      on real ZeRO slices, every shaper.
# Overflows inside one larger allocation (a slice of a flat ZeRO buffer) are beyond its reach.
# Usage: bash tools/asan_check.sh   (after tools/setup_env.sh; gcc with libasan; about 5 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
asan=$(gcc -print-file-name=libasan.so)
[ -f "$asan" ] || { echo "asan_check: gcc's libasan.so not found ($asan)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '#!/bin/sh\nexec gcc -fsanitize=address -fno-omit-frame-pointer "$@"\n' > "$work/cc"
chmod +x "$work/cc"
export CC="$work/cc" MEGATRON_SHAPING_KERNEL_DIR="$work/kernels" DS_ACCELERATOR=cpu
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 PYTHONWARNINGS=ignore

echo "[asan] 1/3 control: an overflow by one element must be reported"
if LD_PRELOAD="$asan" python - > "$work/control.log" 2>&1 <<'PY'
import ctypes, torch
from megatron_shaping.stats import kernels
lib = kernels._load()
assert lib is not None, "kernels did not load under ASan"
t = torch.randn(1000)
ptrs, lens = (ctypes.c_void_p * 1)(t.data_ptr()), (ctypes.c_long * 1)(1001)   # one past the end
dt, a, b = (ctypes.c_int * 1)(0), (ctypes.c_double * 1)(0.1), (ctypes.c_double * 1)(0.0)
lib.ms_run(kernels.MAPS["clamp"][0], 1, ptrs, lens, dt, a, b, 1.0)
PY
then
    echo "asan_check: the control overflow was NOT reported: the check has no power here" >&2
    tail -20 "$work/control.log" >&2
    exit 1
fi
grep -q "heap-buffer-overflow" "$work/control.log" || { echo "asan_check: the control failed otherwise:" >&2; tail -20 "$work/control.log" >&2; exit 1; }
echo "[asan]     reported (heap-buffer-overflow), as it must be"

echo "[asan] 2/3 tests/stats under ASan"
LD_PRELOAD="$asan" python -m pytest -q -x -p no:cacheprovider --capture=sys tests/stats --ignore=tests/stats/test_stats_ds_norm.py

echo "[asan] 3/3 benchmark runs under ASan (every shaper, real ZeRO slices)"
for run in "--model llama --stage 2 --dtype fp32" "--stage 3 --dtype bf16"; do
    # no --configs: every configuration, i.e. every registered shaper
    # shellcheck disable=SC2086
    LD_PRELOAD="$asan" python tools/bench_overhead.py $run --steps 2 --warmup 1 > "$work/bench.log" 2>&1 || { echo "asan_check: benchmark run failed ($run):" >&2; grep -A30 -m1 "AddressSanitizer" "$work/bench.log" >&2 || tail -30 "$work/bench.log" >&2; exit 1; }
    if grep -q "AddressSanitizer" "$work/bench.log"; then
        echo "asan_check: ASan report in the benchmark run ($run):" >&2; grep -A30 -m1 "AddressSanitizer" "$work/bench.log" >&2; exit 1
    fi
    echo "[asan]     $run: clean"
done
echo "[asan] no ASan report"
