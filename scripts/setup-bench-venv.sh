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

stamp="$VENV/.twinkle-bench-requirements"
wanted="$(printf '%s\n' "$TORCH" "${REQUIREMENTS[@]}")"

if [[ ! -x "$VENV/bin/python" ]]; then
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV" >&2
fi
if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "$wanted" ]]; then
  pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input)
  "${pip[@]}" --no-deps "$TORCH" >&2
  "${pip[@]}" "${REQUIREMENTS[@]}" >&2
  "$VENV/bin/python" -c 'import torch, transformers, peft; torch.ones(2) @ torch.ones(2)' >&2
  printf '%s\n' "$wanted" >"$stamp"
fi
echo "TWINKLE_BENCH_VENV=$VENV"
