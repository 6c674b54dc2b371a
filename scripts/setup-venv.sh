#!/usr/bin/env bash
# Creates (or reuses) the project's Python venv: NVRTC for the kernel compile test, the tinker SDK
# for protocol tests, and CPU-usable torch (the SDK's forward_backward_custom computes the custom
# loss with torch in the client). Idempotent and fast when the venv already holds every requirement.
#
# PyPI's default Linux torch wheel is the CUDA build and links the CUDA runtime libraries at import
# time even on CPU, so its nvidia-* wheels are required (~2.5 GB, downloaded once; the stamp below
# reuses a cached venv). torch is installed with --no-deps and its deps listed here because torch
# pins nvidia-cuda-nvrtc-cu12 12.4 while the kernels want 12.8 (torch loads NVRTC lazily, so the
# newer one serves both); triton is left out (only torch.compile on a GPU uses it).
#
# Usage: scripts/setup-venv.sh            # prints KEY=VALUE lines (eval-able)
#   TWINKLE_VENV   venv location (default: $HOME/.cache/twinkle/venv)
# Output:
#   TWINKLE_VENV=...         the venv
#   TWINKLE_NVRTC_LIB=...    full path of libnvrtc.so.N (src/engine/cuda preloads it)
#   TWINKLE_NVRTC_LIBDIR=... its directory (put it on LD_LIBRARY_PATH)
set -euo pipefail

VENV="${TWINKLE_VENV:-$HOME/.cache/twinkle/venv}"

# One requirement per line, exact pins. Add new ones here (e.g. tinker==0.38.0).
# The kernels include no CUDA headers (bf16 is handled bit-wise), so only NVRTC itself is needed;
# 12.8 emits sm_80/sm_90 CUBIN that every driver >= 570 (CUDA 12.8+, incl. 580 / CUDA 13.0) loads.
REQUIREMENTS=(
  "nvidia-cuda-nvrtc-cu12==12.8.93"
  "tinker==0.38.0"
  "prometheus-client==0.26.0"
  "filelock" "sympy==1.13.1" "networkx" "jinja2" "fsspec" "typing-extensions" "numpy"
  "nvidia-cuda-runtime-cu12==12.4.127" "nvidia-cuda-cupti-cu12==12.4.127"
  "nvidia-cublas-cu12==12.4.5.8" "nvidia-cudnn-cu12==9.1.0.70" "nvidia-cufft-cu12==11.2.1.3"
  "nvidia-curand-cu12==10.3.5.147" "nvidia-cusolver-cu12==11.6.1.9"
  "nvidia-cusparse-cu12==12.3.1.170" "nvidia-nccl-cu12==2.21.5" "nvidia-nvjitlink-cu12==12.4.127"
  "nvidia-nvtx-cu12==12.4.127"
)
TORCH="torch==2.5.1"

# shellcheck source=scripts/venv-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/venv-lib.sh"
ensure_venv "$VENV" .twinkle-requirements \
  'import tinker, torch, prometheus_client; torch.ones(2) @ torch.ones(2)' "$TORCH" \
  "${REQUIREMENTS[@]}"

# Locate libnvrtc.so.<major> inside the venv (site-packages/nvidia/cuda_nvrtc/lib).
nvrtc_lib="$(find "$VENV/lib" -path '*nvidia/cuda_nvrtc/lib/*' -name 'libnvrtc.so.[0-9]*' \
  ! -name '*builtins*' 2>/dev/null | sort | head -n 1)"
if [[ -z "$nvrtc_lib" ]]; then
  echo "setup-venv: libnvrtc.so.* not found under $VENV/lib (pip install failed?)" >&2
  exit 1
fi

echo "TWINKLE_VENV=$VENV"
echo "TWINKLE_NVRTC_LIB=$nvrtc_lib"
echo "TWINKLE_NVRTC_LIBDIR=$(dirname "$nvrtc_lib")"
