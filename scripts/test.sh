#!/usr/bin/env bash
# The whole test suite, from a fresh clone: formatting, lints, unit and integration tests.
# Sets up (or reuses) the Python venv under ~/.cache/twinkle/venv: NVRTC for the CUDA kernel
# compile check, the tinker SDK for the protocol tests; and the twinkle-kit client venvs beside it
# (~/.cache/twinkle/kit-*) for the twinkle-native protocol tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_INCREMENTAL=0
export RUST_BACKTRACE=1

eval "$(scripts/setup-venv.sh)"
export TWINKLE_VENV TWINKLE_NVRTC_LIB
export LD_LIBRARY_PATH="$TWINKLE_NVRTC_LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# In this suite a missing NVRTC or SDK is a failure, not a skip.
export TWINKLE_REQUIRE_NVRTC=1
# The tinker SDK tests run for real (the venv above installs tinker==0.38.0).
export TWINKLE_REQUIRE_SDK=1
# The unmodified twinkle-kit clients (0.5.1 and 0.1.3) in two small venvs layered on the one
# above (scripts/setup-twinkle-venv.sh); tests/twinkle_kit.rs fails rather than skips without them.
eval "$(scripts/setup-twinkle-venv.sh)"
export TWINKLE_KIT05_PYTHON TWINKLE_KIT01_PYTHON
export TWINKLE_REQUIRE_KIT=1

# tools/cuda-emu: a CPU stand-in for libcuda and libcublas (the unmodified kernels compiled as
# host C++, one fiber per CUDA thread, argument/barrier/shuffle/shared-memory/guard-page checks;
# tools/cuda-emu/README.md). It builds in seconds. Tests that start `device_type: cuda`
# applications put it on their children's library path through TWINKLE_CUDA_EMU; the test
# processes themselves keep seeing no driver.
emu_dir="${CARGO_TARGET_DIR:-target}/cuda-emu"
tools/cuda-emu/build.sh "$emu_dir"
# the emulator's own checks (each fires on the mistake it exists for; graph capture and replay)
"$emu_dir/cuda-emu-selftest"
emu_lib="$(cd "$emu_dir" && pwd)"
export TWINKLE_CUDA_EMU="$emu_lib" TWINKLE_REQUIRE_CUDA_EMU=1

cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --no-fail-fast

# The CUDA path on the CPU, through tools/cuda-emu:
# 1. scripts/gpu-check.sh end to end against it (GPU_CHECK_EMULATED=1): the whole GPU suite
#    (tests/cuda_gpu.rs), the tinker SDK flow on a `device_type: cuda` model application, and
#    the benchmarks' code paths at a small size. Its executables are the ones `cargo test` just
#    built (BUNDLE_PROFILE=dev).
# 2. The GPU suite again with warps in reverse order (CUDA_EMU_SHUFFLE=1), so a missing
#    __syncthreads shows up whichever warp happens to consume the shared data.
# 3. The GPU suite on the AddressSanitizer build of the emulator (out-of-bounds global and
#    shared memory, with the kernels' source lines).
unset TWINKLE_CUDA_EMU TWINKLE_REQUIRE_CUDA_EMU
BUNDLE_PROFILE=dev BUNDLE_WHEELS=0 scripts/build-gpu-bundle.sh >/dev/null
emu_status=0
LD_LIBRARY_PATH="$emu_lib:$LD_LIBRARY_PATH" GPU_CHECK_EMULATED=1 OUT="$emu_dir" \
  PYTHON="$TWINKLE_VENV/bin/python" bash scripts/gpu-check.sh || emu_status=1
echo "cuda-emu: tests/cuda_gpu.rs with CUDA_EMU_SHUFFLE=1"
LD_LIBRARY_PATH="$emu_lib:$LD_LIBRARY_PATH" TWINKLE_REQUIRE_GPU=1 CUDA_EMU_SHUFFLE=1 \
  gpu-bundle/cuda_gpu --test-threads 2 || emu_status=1
echo "cuda-emu: tests/cuda_gpu.rs on the AddressSanitizer build"
asan_dir="${CARGO_TARGET_DIR:-target}/cuda-emu-asan"
SAN=address tools/cuda-emu/build.sh "$asan_dir"
LD_PRELOAD="$(g++ -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0 \
  LD_LIBRARY_PATH="$(cd "$asan_dir" && pwd):$LD_LIBRARY_PATH" TWINKLE_REQUIRE_GPU=1 \
  gpu-bundle/cuda_gpu --test-threads 2 || emu_status=1
exit $emu_status
