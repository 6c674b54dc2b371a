#!/usr/bin/env bash
# Creates (or reuses) the benchmark venv with PyTorch + transformers + PEFT, used only by
# scripts/bench_vs_torch.py. Kept apart from scripts/setup-venv.sh so CI never downloads torch.
#
# PyPI's default Linux torch wheel is the CUDA build; its nvidia-* dependencies (several GB) are
# only needed on a GPU, so torch is installed with --no-deps plus its small pure-Python deps,
# which imports and runs fine on CPU.
#
# Usage: scripts/setup-bench-venv.sh     # prints TWINKLE_BENCH_VENV=... (eval-able)
#   TWINKLE_BENCH_VENV   venv location (default: $HOME/.cache/twinkle/bench-venv)
set -euo pipefail

VENV="${TWINKLE_BENCH_VENV:-$HOME/.cache/twinkle/bench-venv}"
TORCH="torch==2.5.1"
REQUIREMENTS=(
  "filelock" "sympy==1.13.1" "networkx" "jinja2" "fsspec" "typing-extensions"
  "numpy" "transformers==4.46.3" "peft==0.13.2"
)

# shellcheck source=scripts/venv-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/venv-lib.sh"
ensure_venv "$VENV" .twinkle-bench-requirements \
  'import torch, transformers, peft; torch.ones(2) @ torch.ones(2)' "$TORCH" "${REQUIREMENTS[@]}"
echo "TWINKLE_BENCH_VENV=$VENV"
