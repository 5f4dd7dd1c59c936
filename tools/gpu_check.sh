#!/usr/bin/env bash
# One command for a CUDA machine: the GPU-side checks of issue 11, figures into one file.
#
#   bash tools/gpu_wheels.sh                   (here, once: the wheels the device image lacks, into .whl/)
#   bash tools/gpu_check.sh [OUT_DIR]          (there; default: $OUT, else ./gpu_check_out)
#
# With the device tool: run `bash tools/gpu_check.sh "$OUT"` with carry [".whl"] and a
# timeout of about 560 s. OUT_DIR receives three files: figures.md (also printed at the end, so
# the reply's output carries it), gpu_check.log and details.tar.gz (the per-step files). A
# .whl/ folder in the checkout is installed first (pip --no-index --target, no network), and a
# preflight lists any module still missing before a step needs it. Every step runs under its own
# timeout (GPU_CHECK_STEP_TIMEOUT, default 150 s) so that a hang cannot eat the budget.
#
# 1. environment (GPUs, torch, DeepSpeed, Transformer Engine);
# 2. the statistics pass on the device vs float64 sums of the same values (fp32/bf16 slices at
#    partition offsets, spikes of 1e30 and tiny 1e-30 gradients: whether CUDA's fused float64
#    norm keeps the range the CPU path keeps);
# 3. DeepSpeed's global norm replaced by the shaping statistics vs DeepSpeed's own pass, with
#    NCCL on 1, 2, 4, ... up to all GPUs (tests/stats/ds_norm_worker.py, the assertions of
#    tests/stats/test_stats_ds_norm.py);
# 4. a subset of the sharded-vs-unsharded equivalence suite (tests/distributed: its workers run
#    on the CPU accelerator with gloo whatever the machine, so this is the CPU check: skipped on
#    a CUDA machine, where it would spend device time on what CI already runs);
# 5. the benchmark (tools/bench_overhead.py) on the GPUs (its wall-time table: CPU time is not
#    the measure there), bf16 on ZeRO-2 and ZeRO-3 (on CPU: fp32 and bf16, ZeRO-2 and ZeRO-3);
# 6. FP8: the simulated path vs Transformer Engine on the same model and data, where TE is
#    installed (otherwise the simulated path alone, as a smoke test);
# 7. launch/pretrain.py itself for 10 iterations on every GPU (bf16, ZeRO-2, GradientStabilizer).
#
# Without a CUDA device the script still runs what does not need one (2 on CPU, 3 with gloo on
# 1-2 processes, 4, a short CPU benchmark, 6 simulated, 7 on 2 CPU processes) so that it can be checked anywhere.
# Every step's status is written to the figures file; the script exits non-zero if a check failed.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
OUT="${1:-${OUT:-$ROOT/gpu_check_out}}"
mkdir -p "$OUT"
FIG="$OUT/figures.md"
LOG="$OUT/gpu_check.log"
WORK="$(mktemp -d)"                     # per-step files, packed into OUT/details.tar.gz at the end
: > "$LOG"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
STEP_TIMEOUT="${GPU_CHECK_STEP_TIMEOUT:-150}"
T() { timeout -k 15 "$STEP_TIMEOUT" "$@"; }      # every step: a hang costs at most this
FAILED=0

# Wheels carried for an image without DeepSpeed, pydantic, megatron-core (tools/gpu_wheels.sh).
if compgen -G "$ROOT/.whl/*.whl" >/dev/null && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    # (the wheels are cp312, for the device image: another interpreter keeps its own packages)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
            "$ROOT"/.whl/*.whl >>"$LOG" 2>&1; then
        export PYTHONPATH="$ROOT:/tmp/gpu_check_site:$PYTHONPATH"     # ahead of any older copy there
        export PATH="/tmp/gpu_check_site/bin:$PATH"
    else
        echo "installing .whl/ failed (see $LOG)" >&2
    fi
fi
MISSING="$("$PY" - 2>>"$LOG" <<'PY'
import importlib
need = ["torch", "deepspeed", "pydantic", "hjson", "megatron.core", "sentencepiece", "numpy"]
missing = []
for m in need:
    try:
        importlib.import_module(m)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{m} ({type(e).__name__}: {str(e)[:80]})")
print("MISSING:" + "; ".join(missing))      # (DeepSpeed logs to stdout on import: the last line)
PY
)"
MISSING="$(printf '%s\n' "$MISSING" | sed -n 's/^MISSING://p' | tail -1)"

NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>>"$LOG" | tail -1)"
NGPU="${NGPU:-0}"
if [[ "$NGPU" -gt 0 ]]; then
    ACC=cuda; BACKEND=nccl
    WORLDS=""; w=1
    while [[ "$w" -le "$NGPU" ]]; do WORLDS="$WORLDS $w"; w=$((w * 2)); done
    [[ " $WORLDS " == *" $NGPU "* ]] || WORLDS="$WORLDS $NGPU"
else
    ACC=cpu; BACKEND=gloo; WORLDS="1 2"
fi

section() { printf '\n## %s\n\n' "$1" >> "$FIG"; echo "== $1"; }
status() {  # status NAME RC
    if [[ "$2" -eq 0 ]]; then echo "- $1: ok" >> "$FIG"; else echo "- $1: **FAILED** (rc $2, see $LOG)" >> "$FIG"; FAILED=1; fi
}

finish() {
    tar -czf "$OUT/details.tar.gz" -C "$WORK" . 2>>"$LOG"
    echo
    cat "$FIG"
    echo
    echo "figures: $FIG (log: $LOG, per-step files: $OUT/details.tar.gz)"
    exit "$FAILED"
}

{
    echo "# gpu_check $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "accelerator: $ACC, backend: $BACKEND, GPUs: $NGPU, worlds:$WORLDS, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    [[ -n "$MISSING" ]] && echo && echo "**missing modules**: $MISSING (carry them: bash tools/gpu_wheels.sh here, then carry .whl)"
} > "$FIG"
if [[ -n "$MISSING" ]]; then
    FAILED=1
    "$PY" -c "import torch" 2>>"$LOG" || finish          # nothing below runs without torch
fi

# ---------------------------------------------------------------------------------- 1. environment
section "1. Environment"
{
    echo '```'
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - <<'PY' 2>&1 | grep -v "^\[20"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import deepspeed
    print("deepspeed", deepspeed.__version__)
except Exception as e:  # noqa: BLE001
    print("deepspeed: not importable:", e)
try:
    import transformer_engine
    print("transformer_engine", getattr(transformer_engine, "__version__", "?"))
except Exception as e:  # noqa: BLE001
    print("transformer_engine: not installed (", type(e).__name__, ")")
PY
    echo '```'
} >> "$FIG"

# ---------------------------------------------------------------------------------- 2. statistics on the device
section "2. Statistics pass on $ACC vs float64"
T "$PY" - "$ACC" >> "$FIG" 2>>"$LOG" <<'PY'
import sys
import torch
from megatron_shaping.shapers import make_layout
from megatron_shaping.shapers.base import SUMABS, SUMSQ, UNIT_PARAM_SUMSQ, UNIT_SUMSQ
from megatron_shaping.stats.slices import GradSlice, SliceSet

dev = torch.device("cuda" if sys.argv[1] == "cuda" else "cpu")
ALL = frozenset({SUMSQ, SUMABS, UNIT_SUMSQ, UNIT_PARAM_SUMSQ})
print("| dtype | R x C | offset | case | sumsq rel | sumabs rel | unit rel | param unit rel | finite |")
print("|---|---|---:|---|---:|---:|---:|---:|---|")
worst = 0.0
for dtype in (torch.float32, torch.bfloat16):
    for R, C, off in ((300, 512, 0), (97, 4096, 1234), (60, 4099, 5000)):
        for case in ("randn", "spike 1e30", "tiny 1e-30"):
            gen = torch.Generator().manual_seed(0)
            g64 = torch.randn(R * C, generator=gen, dtype=torch.float64) * 1e-3
            if case == "spike 1e30":
                g64[off + 11] = 1e30
            if case == "tiny 1e-30":
                g64[off:off + 2 * C] = 1e-30
            w64 = torch.randn(R * C, generator=gen, dtype=torch.float64)
            g, w = g64.to(dtype), w64.to(dtype)
            gd = torch.zeros(R * C, dtype=torch.float64)
            wd = torch.zeros(R * C, dtype=torch.float64)
            gd[off:] = g[off:].double()
            wd[off:] = w[off:].double()
            layout = make_layout(["w"], [R * C], units_per_group=[R], unit_numel=[C] * R, device=dev)
            ss = SliceSet([GradSlice(grad=g[off:].to(dev), group=0, param=w[off:].to(dev), offset=off, row_len=C)],
                          layout)
            st = ss.compute(ALL)
            ref = {SUMSQ: gd.square().sum().view(1), SUMABS: gd.abs().sum().view(1),
                   UNIT_SUMSQ: gd.view(R, C).square().sum(1), UNIT_PARAM_SUMSQ: wd.view(R, C).square().sum(1)}
            errs = []
            for k in (SUMSQ, SUMABS, UNIT_SUMSQ, UNIT_PARAM_SUMSQ):
                got = getattr(st, k).double().cpu()
                r = ref[k]
                nz = r > 0
                errs.append(float(((got[nz] - r[nz]).abs() / r[nz]).max()) if bool(nz.any()) else 0.0)
            fin = bool(torch.isfinite(st.sumsq).all())
            worst = max(worst, *errs) if fin else float("inf")
            print(f"| {str(dtype).replace('torch.', '')} | {R} x {C} | {off} | {case} | "
                  + " | ".join(f"{e:.1e}" for e in errs) + f" | {fin} |")
print(f"\nworst relative error: {worst:.2e} (CPU path: <= 5e-6 by tests/stats/test_stats_partials.py)")
sys.exit(0 if worst <= 5e-6 else 1)
PY
status "statistics on $ACC" $?

# ---------------------------------------------------------------------------------- 3. norm replacement
section "3. DeepSpeed's global norm replaced by the statistics ($BACKEND)"
for W in $WORLDS; do
    SC="$WORK/ds_norm_scenarios.json"
    RES="$WORK/ds_norm_w$W.jsonl"
    "$PY" -c "import json; from tests.stats.test_stats_ds_norm import SCENARIOS; json.dump(SCENARIOS, open('$SC', 'w'))" 2>>"$LOG"
    DS_ACCELERATOR="$ACC" MS_DIST_BACKEND="$BACKEND" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" \
        T "$PY" -m deepspeed.launcher.runner --num_gpus "$W" --master_port $((29500 + W)) \
        tests/stats/ds_norm_worker.py --scenarios "$SC" --out "$RES" >>"$LOG" 2>&1
    rc=$?
    if [[ $rc -eq 0 ]]; then
        T "$PY" - "$RES" >> "$FIG" 2>>"$LOG" <<'PY'
import json, sys
from tests.stats import test_stats_ds_norm as T
res = {r["name"]: r for r in map(json.loads, open(sys.argv[1]))}
bad = 0
print("| scenario | path | max rel. norm diff (all ranks) | params rel. diff | result |")
print("|---|---|---:|---:|---|")
for sc in T.SCENARIOS:
    ranks = res[sc["name"]]["ranks"]
    try:
        T.test_replaced_norm_equals_deepspeeds(sc, res)
        ok = "ok"
    except Exception as e:  # noqa: BLE001
        ok, bad = f"FAILED: {str(e)[:120]}", bad + 1
    d = max((abs(a - b) / max(abs(b), 1e-12) for r in ranks
             for a, b in zip(r.get("norm_ours", []), r.get("norm_ds", [])) if a is not None and b is not None),
            default=0.0)
    p = max((r.get("params", float("nan")) for r in ranks), default=float("nan"))
    print(f"| {sc['name']} | {ranks[0].get('path', '?')} | {d:.1e} | {p:.1e} | {ok} |")
sys.exit(1 if bad else 0)
PY
        rc=$?
    fi
    status "norm replacement, $W process(es)" $rc
done

# ---------------------------------------------------------------------------------- 4. equivalence subset
section "4. Equivalence suite subset (tests/distributed, CPU accelerator, gloo)"
if [[ "$ACC" == cuda ]]; then
    echo "- skipped on a CUDA machine: its workers run on the CPU with gloo (what CI runs)" >> "$FIG"
else
DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 T "$PY" - >> "$FIG" 2>>"$LOG" <<'PY'
import re, sys, tempfile
from tests.distributed import scenarios as S
from tests.distributed import test_deepspeed_equivalence as T
from tests.distributed.launch import launch_scenarios, read_results
pat = re.compile(r"^(gradient_stabilizer|spamp|agc|entrywise_shrink)/z[123]/(fp32|bf16)$|ds_clip$")
bad = total = 0
for world in (1, 2):
    scs = [sc for sc in S.matrix(world) if pat.search(sc["name"])]
    d = tempfile.mkdtemp()
    T._cache[world] = read_results(launch_scenarios(world, T.WORKER, scs, d, "--fake-fp16"))
    for sc in scs:
        total += 1
        try:
            T.test_sharded_equals_unsharded(world, sc, d)
        except Exception as e:  # noqa: BLE001
            bad += 1
            print(f"- w{world} {sc['name']}: FAILED {str(e)[:200]}")
print(f"{total - bad}/{total} scenarios equal the unsharded reference")
sys.exit(1 if bad else 0)
PY
status "equivalence subset" $?
fi

# ---------------------------------------------------------------------------------- 5. benchmark
section "5. Benchmark (tools/bench_overhead.py, $ACC)"
if [[ "$ACC" == cuda ]]; then
    BW=$(( NGPU < 8 ? NGPU : 8 ))
    # one configuration of each kind, 12 rounds, bf16 on ZeRO-2 and ZeRO-3 (what GPUs train in):
    # the whole script then fits one 10-minute device command
    BENCH_ARGS=(--accelerator cuda --world "$BW" --width 2048 --layers 24 --steps 12 --warmup 3
                --configs ds_clip,norm_clip,gradient_stabilizer,spamp,agc,entrywise_shrink)
else
    BENCH_ARGS=(--world 2 --layers 8 --steps 4 --warmup 1 --configs ds_clip,norm_clip,spamp,agc)
fi
if [[ "$ACC" == cuda ]]; then RUNS="bf16:2 bf16:3"; else RUNS="fp32:2 fp32:3 bf16:2 bf16:3"; fi
for run in $RUNS; do
        dt="${run%%:*}"; st="${run##*:}"
        MD="$WORK/bench_${dt}_z${st}.md"
        T "$PY" tools/bench_overhead.py "${BENCH_ARGS[@]}" --dtype "$dt" --stage "$st" --markdown "$MD" \
            --json "$WORK/bench_${dt}_z${st}.json" >>"$LOG" 2>&1
        rc=$?
        if [[ $rc -eq 0 ]]; then { echo "### $dt, ZeRO-$st"; echo; cat "$MD"; echo; } >> "$FIG"; fi
        status "benchmark $dt ZeRO-$st" $rc
done

# ---------------------------------------------------------------------------------- 6. FP8
section "6. FP8: simulated vs Transformer Engine"
T "$PY" - >> "$FIG" 2>>"$LOG" <<'PY'
import os, socket, sys
import torch
import torch.distributed as dist
from megatron_shaping import GradientShaper
from megatron_shaping.model import LlamaConfig, LlamaModel
from megatron_shaping.model.fp8 import te_available

if not dist.is_initialized():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
from megatron.core import parallel_state as ps
if not ps.model_parallel_is_initialized():
    ps.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if dev.type == "cuda":
    torch.cuda.set_device(0)


def train(backend, steps=20):
    # TE's FP8 GEMMs need dimensions that are multiples of 16
    cfg = LlamaConfig(hidden_size=128, num_layers=2, num_attention_heads=4, ffn_hidden_size=256, vocab_size=256,
                      seq_length=32, tie_embeddings=True, fp8=backend is not None, fp8_backend=backend or "sim")
    model = LlamaModel(cfg, seed=7).to(dev)
    shaper = GradientShaper(model.named_parameters(), "norm_clip", {"max_norm": 1.0})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    text = torch.randint(0, 64, (16, 33), generator=torch.Generator().manual_seed(1)).to(dev)
    losses, norms = [], []
    for _ in range(steps):
        loss = model(text[:, :-1], text[:, 1:])
        opt.zero_grad()
        loss.backward()
        rec = shaper.apply_()
        norms.append(float(rec.stats_before.sumsq.sum().sqrt()) if rec is not None else float("nan"))
        opt.step()
        losses.append(float(loss.detach()))
    return losses, norms


runs = {"no FP8 (fp32)": train(None), "FP8 simulated": train("sim")}
if te_available():
    runs["FP8 Transformer Engine"] = train("te")
else:
    print("Transformer Engine with CUDA not available: simulated path only.\n")
print("| run | loss step 1 | loss step 20 | grad norm step 1 | grad norm step 20 |")
print("|---|---:|---:|---:|---:|")
for k, (l, n) in runs.items():
    print(f"| {k} | {l[0]:.4f} | {l[-1]:.4f} | {n[0]:.4f} | {n[-1]:.4f} |")
ref = runs["FP8 simulated"]
ok = ref[0][-1] < ref[0][0]
if "FP8 Transformer Engine" in runs:
    te = runs["FP8 Transformer Engine"]
    d = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(te[1][:5], ref[1][:5]))
    print(f"\nmax relative difference of the first 5 gradient norms, TE vs simulated: {d:.2e} "
          "(TE uses delayed scaling, the simulation current scaling: a few percent is expected)")
    ok = ok and te[0][-1] < te[0][0] and d < 0.2
if dist.is_initialized():
    dist.destroy_process_group()
sys.exit(0 if ok else 1)
PY
status "FP8" $?

# ---------------------------------------------------------------------------------- 7. pretrain.py
# The entry users run, on the device: batches from the (CPU) data loader must reach the engine's
# device, the shaper must attach and train. A short llama-tiny run on the default corpus, ZeRO-2
# bf16 GradientStabilizer, every GPU (2 CPU processes without one), one evaluation in between.
section "7. launch/pretrain.py on the device ($ACC)"
PW=$([[ "$ACC" == cuda ]] && echo "$NGPU" || echo 2)
DS_ACCELERATOR="$ACC" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" \
    T "$PY" -m deepspeed.launcher.runner --num_gpus "$PW" --master_port 29650 launch/pretrain.py \
    --deepspeed_config configs/deepspeed/zero2_bf16_gradient_stabilizer.json --model-preset llama-tiny \
    --micro-batch-size 2 --global-batch-size $((2 * PW)) --train-iters 10 --lr-warmup-iters 2 \
    --eval-interval 5 --eval-iters 2 --log-interval 5 > "$WORK/pretrain.log" 2>&1
rc=$?
cat "$WORK/pretrain.log" >> "$LOG"
{ echo '```'; grep -E "^\[(model|train|eval|checkpoint|shaping)\]|iteration|val" "$WORK/pretrain.log" | tail -8; echo '```'; } >> "$FIG"
status "pretrain.py, $PW process(es)" $rc

finish
