#!/usr/bin/env bash
# One prepared run on a GPU machine (CUDA 13 driver, PyTorch + transformers + PEFT, no Rust, no
# network): the GPU test suite, then the benchmarks against PyTorch, all within ~8 minutes.
#
# Prepare here:  scripts/build-gpu-bundle.sh          (fills gpu-bundle/: twinkle, cuda_gpu)
# Run there:     bash scripts/gpu-check.sh            (device tool: carry ["gpu-bundle"])
# Results go to $OUT/gpu-check.txt (or ./gpu-check.txt without $OUT), written as each step
# ends, so a step that fails or times out still leaves the others' results. Exits 1 when a step
# failed.
#
# GPU_CHECK_EMULATED=1 runs the same steps on a machine without a GPU against the CPU execution
# layer (tools/cuda-emu, put on LD_LIBRARY_PATH by the caller; scripts/test.sh does this): small
# benchmark shapes, no PyTorch baselines, timings meaningless.
set -uo pipefail
cd "$(dirname "$0")/.."
RES="${OUT:-.}/gpu-check.txt"
: >"$RES"
T0=$(date +%s)
EMU="${GPU_CHECK_EMULATED:-0}"
FAILED=0
say() { echo "$*" | tee -a "$RES"; }
# step NAME TIMEOUT_S CMD...: runs with a timeout, appends its output and exit code
step() {
    local name=$1 limit=$2
    shift 2
    say ""
    say "=== $name (timeout ${limit}s, t+$(($(date +%s) - T0))s) ==="
    PYTHONUNBUFFERED=1 timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$RES"
    local rc=${PIPESTATUS[0]}
    say "=== $name: exit $rc$([ "$rc" = 124 ] && echo ' (TIMEOUT)') ==="
    [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
}

say "gpu-check $(date -u +%FT%TZ) on $(hostname)$([ "$EMU" = 1 ] && echo ' (emulated: tools/cuda-emu)')"
[ "$EMU" = 1 ] || step nvidia-smi 20 nvidia-smi

# NVRTC, cuBLAS and cuBLASLt for the kernels: the toolkit's first (its NVRTC matches the driver; a newer
# NVRTC's CUBIN would be refused), then the pip wheels next to PyTorch. (Emulated: the caller's
# LD_LIBRARY_PATH already has the stand-in first, and no real cuBLAS may come before it.)
if [ "$EMU" != 1 ]; then
    libdirs=$(
        {
            find /usr/local/cuda/ /usr/local/cuda-*/ -maxdepth 5 \
                \( -name 'libnvrtc.so*' -o -name 'libcublas.so*' -o -name 'libcublasLt.so*' \) \
                2>/dev/null
            python3 -c '
import os, site
for d in site.getsitepackages():
    for root, _, files in os.walk(os.path.join(d, "nvidia")):
        for f in files:
            if f.startswith(("libnvrtc.so", "libcublas.so", "libcublasLt.so")):
                print(os.path.join(root, f))
' 2>/dev/null
        } | xargs -r -n1 dirname | awk '!seen[$0]++' | paste -sd:
    )
    export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

if [ ! -x gpu-bundle/cuda_gpu ] || [ ! -x gpu-bundle/twinkle ] || [ ! -x gpu-bundle/tinker_sdk ]; then
    say "gpu-bundle/ is missing: run scripts/build-gpu-bundle.sh and carry gpu-bundle"
    exit 1
fi

# 1. GPU tests: every kernel vs its CPU twin, the golden fixtures through the CUDA path
#    (f32 and bf16), greedy and sampling vs the CPU engine, one training step CPU vs GPU.
if [ "$EMU" = 1 ]; then
    step "cuda_gpu tests" 900 env TWINKLE_REQUIRE_GPU=1 gpu-bundle/cuda_gpu --test-threads 2
else
    step "cuda_gpu tests" 120 env TWINKLE_REQUIRE_GPU=1 gpu-bundle/cuda_gpu --test-threads 4 --nocapture
fi

# 2. The unmodified tinker SDK against `twinkle serve` with a `device_type: cuda` model
#    application (train, save, restore, sample). The SDK comes from gpu-bundle/wheels (no network
#    on the GPU machine) into a venv that sees the system's torch; an existing TWINKLE_VENV with
#    tinker is used as it is.
sdk_venv="${TWINKLE_VENV:-}"
if [ -z "$sdk_venv" ] || ! "$sdk_venv/bin/python" -c 'import tinker' 2>/dev/null; then
    sdk_venv="${TMPDIR:-/tmp}/twinkle-gpu-sdk-venv"
    if [ -d gpu-bundle/wheels ] && python3 -m venv --system-site-packages "$sdk_venv" >/dev/null 2>&1; then
        # --no-deps: the wheels are tinker plus what a PyTorch + transformers machine lacks.
        "$sdk_venv/bin/python" -m pip install --quiet --no-index --no-deps \
            --find-links gpu-bundle/wheels gpu-bundle/wheels/*.whl >/dev/null 2>&1 ||
            say "could not install tinker from gpu-bundle/wheels ($(python3 --version))"
    fi
fi
step "tinker SDK flow on a cuda model app" 300 env TWINKLE_BIN=gpu-bundle/twinkle \
    TWINKLE_VENV="$sdk_venv" TWINKLE_REQUIRE_SDK=1 TWINKLE_REQUIRE_GPU=1 \
    gpu-bundle/tinker_sdk --exact sdk_flow_on_a_cuda_model_app --nocapture

# 3. Benchmarks (random weights; one JSON line each, twinkle and PyTorch, with the ratio).
B="${PYTHON:-python3} scripts/bench_torch_cuda.py"
TW="--twinkle gpu-bundle/twinkle"
if [ "$EMU" = 1 ]; then
    # The code paths of the benchmarks, at a size the emulator runs in seconds.
    step "train tiny seq 64 r8 (emulated)" 300 \
        $B train --shape tiny --seq 64 --rank 8 --steps 1 --skip-torch $TW
    step "sample tiny batch 2 (emulated)" 300 \
        $B sample --shape tiny --batch 2 --prompt 8 --max-tokens 4 --skip-torch $TW
    step "multi-tenant tiny (emulated)" 300 gpu-bundle/twinkle bench multi-tenant --device cuda \
        --shape tiny --tenants 3 --seq 16 --rank 4 --steps 1 --decode-tokens 4 --json
    step "explain train tiny (emulated)" 300 gpu-bundle/twinkle bench train --device cuda \
        --shape tiny --seq 64 --rank 8 --steps 1 --explain
else
    step "train qwen2.5-0.5b seq 2048 r32" 75 $B train --shape qwen2.5-0.5b --seq 2048 --steps 2 $TW
    step "train qwen2.5-7b seq 2048 r32" 130 $B train --shape qwen2.5-7b --seq 2048 --steps 2 $TW
    step "sample qwen2.5-0.5b batch 1" 40 $B sample --shape qwen2.5-0.5b --batch 1 $TW
    step "sample qwen2.5-0.5b batch 64" 40 $B sample --shape qwen2.5-0.5b --batch 64 $TW
    step "sample qwen2.5-7b batch 1" 50 $B sample --shape qwen2.5-7b --batch 1 $TW
    step "sample qwen2.5-7b batch 64" 50 $B sample --shape qwen2.5-7b --batch 64 $TW
    # the same batch-1 decode launched kernel by kernel: what the captured graphs save
    step "sample qwen2.5-7b batch 1, CUDA graphs off" 40 env TWINKLE_CUDA_GRAPHS=0 \
        $B sample --shape qwen2.5-7b --batch 1 --skip-torch $TW
    # 8 tenants x 128 tokens batched vs serial vs one 1024-token step; 8 x 64 sampled tokens
    step "multi-tenant qwen2.5-0.5b" 120 gpu-bundle/twinkle bench multi-tenant --device cuda \
        --shape qwen2.5-0.5b --steps 3 --json
    # the per-kernel roofline (FLOPs, bytes, time at the card's peak, measured) of one step each
    step "explain train qwen2.5-7b seq 2048" 120 gpu-bundle/twinkle bench train --device cuda \
        --shape qwen2.5-7b --seq 2048 --rank 32 --steps 1 --explain
    step "explain sample qwen2.5-7b batch 1" 60 gpu-bundle/twinkle bench sample --device cuda \
        --shape qwen2.5-7b --batch 1 --max-tokens 8 --explain
fi

say ""
say "gpu-check done in $(($(date +%s) - T0))s, $FAILED step(s) failed"
[ "$FAILED" = 0 ]
