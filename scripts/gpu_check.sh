#!/usr/bin/env bash
# Every check that needs a GPU, in one run of under 10 minutes on the lent machine (Python
# 3.12, torch 2.11, triton 3.6, no diffusers, no network): install the carried wheels and dcfx,
# run the CUDA tests, bench_kernels.py, the U-Net benchmarks (bench_unet.py) and the
# Flux-width cache benchmark (bench_dit_cache.py), write every table to
# $OUT (default ./gpu_results), print a summary table last.
#
# Prepare here, once (the wheels are not in git; .whl/ is ignored locally):
#   mkdir -p .git/info .whl && echo /.whl/ >> .git/info/exclude && cp ../shared/device/wheels/*.whl .whl/
# then run it through the device tool with carry [".whl"]:  bash scripts/gpu_check.sh
#
# Each stage has its own time limit (a cold compile must not eat the rest) and the script
# goes on after a failure; the summary says what failed. Without a GPU:
#   bash scripts/gpu_check.sh --dry-run
# rehearses every stage on the CPU with tiny sizes (CUDA tests skip, CUDA-only variants are
# left out), so that only the GPU itself can fail on the lent machine.
#
# GPU_CHECK_STAGES="install tests_cuda ..." runs only the stages named (install is needed
# on a fresh machine), e.g. to spread the check over two short device calls.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
OUT=${OUT:-./gpu_results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Seconds for all stages together (the device allows 600 per command); a CPU rehearsal is
# slower, so its limits are stretched.
if (( DRY_RUN )); then BUDGET=${GPU_CHECK_BUDGET:-3600}; STRETCH=10; else BUDGET=${GPU_CHECK_BUDGET:-560}; STRETCH=1; fi
STATUS="$OUT/stages.tsv"
printf 'stage\tstatus\tseconds\toutput\n' > "$STATUS"

if (( DRY_RUN )); then
    PY=${PYTHON:-.venv/bin/python}
else
    PY=${PYTHON:-python3}
fi

# stage NAME LIMIT_S COMMAND...: run with a limit (cut to what is left of the budget), log to
# $OUT/NAME.txt, record the outcome, never abort the script.
stage() {
    local name=$1 limit=$(( $2 * STRETCH ))
    shift 2
    if [[ -n "${GPU_CHECK_STAGES:-}" && " $GPU_CHECK_STAGES " != *" $name "* ]]; then
        printf '%s\tnot selected\t0\t-\n' "$name" >> "$STATUS"
        return
    fi
    local left=$(( BUDGET - SECONDS ))
    (( limit > left )) && limit=$left
    if (( limit < 10 )); then
        printf '%s\tskipped (budget)\t0\t-\n' "$name" >> "$STATUS"
        return
    fi
    echo "=== $name (limit ${limit}s) ==="
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]} status=ok
    (( rc == 124 || rc == 137 )) && status="timeout"
    (( rc != 0 && rc != 124 && rc != 137 )) && status="failed (rc $rc)"
    printf '%s\t%s\t%d\t%s\n' "$name" "$status" $(( SECONDS - start )) "$name.txt" >> "$STATUS"
}

install_deps() {
    if (( DRY_RUN )); then
        # Rehearse the wheel install into a scratch folder; keep the CPU environment as it is.
        local scratch
        scratch=$(mktemp -d)
        "$PY" -m pip install -q --no-index --no-deps --target "$scratch" .whl/*.whl && ls "$scratch" | head -5
        rm -rf "$scratch"
    else
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || return 1
        "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
    fi
    "$PY" -c "import torch, triton, diffusers, DeepCache, dcfx; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
}
export -f install_deps
export PY DRY_RUN
(( DRY_RUN )) || export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# Inductor's on-disk cache inside $OUT would not come back (too many files); keep it local.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/dcfx_inductor}

# bench_unet.py settings: SD1.5 at 512px and SDXL at 1024px, fp16, DeepCache N=3, b=0 (the
# dry run: tiny architectures, 4 steps, one repeat, CPU variants only).
if (( DRY_RUN )); then
    SD=(--arch tiny --resolution 8 --steps 4 --device cpu --dtype fp32 --repeats 1)
    XL=(--arch sdxl-tiny --resolution 8 --steps 4 --device cpu --dtype fp32 --repeats 1)
    EAGER=(eager reference dcfx)
    COMPILED=(eager compile dcfx-compile)
    XL_VARIANTS=(eager reference dcfx)
    KERNEL_BENCH=(--estimate-only)
    PROFILE=(--size tiny --device cpu --steps 4)
    HEAD_SPLIT=(--arch tiny --resolution 8 --device cpu --dtype fp32 --repeats 3)
    POLICY_VARIANTS=(eager dcfx)
    FLUX_WIDTH=(--width 96 --tokens 64 16 --steps 4 --repeats 1)
else
    SD=(--arch sd15 --resolution 64 --steps 50 --device cuda --dtype fp16 --repeats 3)
    XL=(--arch sdxl --resolution 128 --steps 30 --device cuda --dtype fp16 --repeats 2)
    EAGER=(eager reference cudagraph dcfx dcfx-cudagraph)
    COMPILED=(eager compile dcfx-compile)
    XL_VARIANTS=(eager reference dcfx dcfx-cudagraph)
    KERNEL_BENCH=(--rep 50)
    PROFILE=(--size small --device cuda --dtype float16 --steps 10)
    HEAD_SPLIT=(--arch sd15 --resolution 64 --device cuda --dtype fp16 --repeats 21)
    POLICY_VARIANTS=(eager dcfx dcfx-cudagraph)
    FLUX_WIDTH=(--device cuda --steps 10 --repeats 3)
fi
# bench_dit_cache.py at Flux's width (3072 = 24 heads of 128; 2 double- and 4 single-stream
# blocks, random weights, bf16, 1024x1024: 4096 image and 512 text tokens; the dry run: width
# 96, 64 + 16 tokens on the CPU, where dcfx.cuda_graphs runs its steps uncaptured).
FLUX_WIDTH+=(--model flux-width --dtype bf16 --rows eager compile fbc-2-compile dcfx-2-compile dcfx-2-cudagraph --out "$OUT/flux_width.md")
UNET=(--interval 3 --branch 0 --no-progress)

# Most valuable first: a stage cut by the budget loses only what comes after it.
stage install 60 bash -c install_deps
stage tests_cuda 120 "$PY" -m pytest -q -m "cuda and not inductor" tests/test_kernel_cat_group_norm_silu.py tests/test_kernel_plan.py tests/test_kernel_ops.py tests/test_cuda_reference.py tests/test_cuda_graphs.py tests/test_cuda_graph_recipe.py
# The adaptive and forecast policies: what the head split costs a full step (goal: <= 2%),
# and SD1.5 generations under them, eager and replayed by dcfx.cuda_graphs (random weights:
# the adaptive decisions mean nothing, their mechanics and overheads do).
stage head_split 60 "$PY" benchmarks/bench_head_split.py "${HEAD_SPLIT[@]}"
stage unet_sd15_adaptive 80 "$PY" benchmarks/bench_unet.py "${SD[@]}" "${UNET[@]}" --adaptive cut --threshold 0.2 --variants "${POLICY_VARIANTS[@]}" --csv "$OUT/unet_sd15_adaptive.csv" --md "$OUT/unet_sd15_adaptive.md"
stage unet_sd15_forecast 80 "$PY" benchmarks/bench_unet.py "${SD[@]}" "${UNET[@]}" --forecast 2 --variants "${POLICY_VARIANTS[@]}" --csv "$OUT/unet_sd15_forecast.csv" --md "$OUT/unet_sd15_forecast.md"
stage bench_kernels 60 "$PY" benchmarks/bench_kernels.py --dtype fp16 "${KERNEL_BENCH[@]}"
stage flux_width 150 "$PY" -P benchmarks/bench_dit_cache.py "${FLUX_WIDTH[@]}"
stage unet_sd15 110 "$PY" benchmarks/bench_unet.py "${SD[@]}" "${UNET[@]}" --variants "${EAGER[@]}" --csv "$OUT/unet_sd15.csv" --md "$OUT/unet_sd15.md"
# Cold compiles of the SD1.5 U-Net (plain, and dcfx's full + shallow graphs) dominate here.
stage unet_sd15_compiled 220 "$PY" benchmarks/bench_unet.py "${SD[@]}" --repeats 2 "${UNET[@]}" --variants "${COMPILED[@]}" --csv "$OUT/unet_sd15_compiled.csv" --md "$OUT/unet_sd15_compiled.md"
stage unet_sdxl 110 "$PY" benchmarks/bench_unet.py "${XL[@]}" "${UNET[@]}" --variants "${XL_VARIANTS[@]}" --csv "$OUT/unet_sdxl.csv" --md "$OUT/unet_sdxl.md"
stage bench_kernels_channels_last 40 "$PY" benchmarks/bench_kernels.py --dtype fp16 --channels-last --cuts-only "${KERNEL_BENCH[@]}"
# dcfx profile's CUDA path (kernels attributed to the dcfx.full/shallow ranges); the trace stays local.
stage profile 40 "$PY" -m dcfx profile "${PROFILE[@]}" --top 8 --trace /tmp/dcfx_profile_trace.json --force
stage tests_cuda_compile 240 "$PY" -m pytest -q --tb=short -m "cuda and inductor" tests/test_kernel_cat_group_norm_silu.py tests/test_kernel_plan.py tests/test_kernel_ops.py tests/test_cuda_reference.py tests/test_cuda_graphs.py tests/test_cuda_graph_recipe.py

echo
echo "=== summary ($(( SECONDS ))s; results in $OUT) ==="
column -t -s $'\t' "$STATUS" 2>/dev/null || cat "$STATUS"
# The U-Net tables without their notes paragraph, which is printed once (output stays short).
[[ -f "$OUT/head_split.txt" ]] && { echo; echo "[head_split]"; grep -vi "warn\|kept in float32" "$OUT/head_split.txt"; }
[[ -f "$OUT/flux_width.md" ]] && { echo; echo "[flux_width]"; grep "^|" "$OUT/flux_width.md"; }
for name in unet_sd15 unet_sd15_adaptive unet_sd15_forecast unet_sdxl unet_sd15_compiled; do
    [[ -f "$OUT/$name.md" ]] && { echo; echo "[$name]"; grep -v "^s/gen:" "$OUT/$name.md"; }
done
grep -h -m1 "^s/gen:" "$OUT"/unet_*.md 2>/dev/null | head -1
for name in bench_kernels bench_kernels_channels_last; do
    [[ -f "$OUT/$name.txt" ]] && { echo; echo "[$name]"; grep -E '^(SD|SDXL|shape|NVIDIA|H1|[A-Z].*copy bandwidth)' "$OUT/$name.txt"; }
done
exit 0
