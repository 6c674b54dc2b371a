#!/usr/bin/env bash
# Creates (or reuses) two small client venvs (and one shared dependency venv) for the twinkle-native protocol tests
# (tests/twinkle_kit.rs, tests/twinkle/*.py): the unmodified PyPI clients
#   twinkle-kit==0.5.1  (Gen-2: /api/v1/.../twinkle/<op>, sessions)
#   twinkle-kit==0.1.3  (Gen-1: the seed layout, /server, /models, /samplers, /processors)
#
# The clients import torch (twinkle.utils, peft), but ray, vllm, modelscope, fastapi and omegaconf
# are not needed on the client side (../shared/specs/twinkle-native-protocol.md §6). So each venv
# holds only the light dependencies, installed with --no-deps where the wheel metadata would pull
# the server stack, and reuses torch from the project venv (scripts/setup-venv.sh) through a .pth
# file that appends the base venv's site-packages to sys.path. Packages in the kit venv shadow the
# base venv's (transformers 4.57 here, 5.x there): the base venv is never written to. The .pth is
# written only after pip has finished, so pip resolves every dependency into the kit venv and never
# sees (or tries to replace) a base package.
#
# Idempotent: a stamp file per venv holds the requirement list; a matching stamp skips pip.
# Cost on a fresh 2-core machine (base venv present): ~1.5-2 min of pip downloads, ~650 MB on
# disk (kit-deps ~580 MB: pyarrow, transformers, pandas, numpy; each client venv ~35 MB).
#
# Usage: scripts/setup-twinkle-venv.sh      # prints KEY=VALUE lines (eval-able)
#   TWINKLE_VENV        the base venv (default: $HOME/.cache/twinkle/venv; created by setup-venv.sh
#                       when missing)
#   TWINKLE_KIT_ROOT    where the two kit venvs live (default: $HOME/.cache/twinkle)
# Output:
#   TWINKLE_KIT05_PYTHON=...   python of the twinkle-kit 0.5.1 venv
#   TWINKLE_KIT01_PYTHON=...   python of the twinkle-kit 0.1.3 venv
set -euo pipefail
cd "$(dirname "$0")/.."

BASE="${TWINKLE_VENV:-$HOME/.cache/twinkle/venv}"
ROOT="${TWINKLE_KIT_ROOT:-$HOME/.cache/twinkle}"

if [[ ! -x "$BASE/bin/python" ]]; then
  TWINKLE_VENV="$BASE" scripts/setup-venv.sh >/dev/null
fi

# Shared by both clients, in one venv ("kit-deps"); each client venv holds only twinkle-kit (and
# pyzmq) and reaches kit-deps and the base venv through its .pth file.
# Installed with --no-deps (their wheel metadata pulls torch, which the base venv provides).
NODEPS=(
  "peft==0.19.0"
  "accelerate==1.10.1"
)
# The rest, exact pins, with the full transitive set (from a working install) so a fresh machine
# resolves to the same tree. The top-level ones: requests, datasets==3.6.0, transformers<5
# (transformers 5.x disables torch < 2.6), tokenizers==0.22.1, huggingface_hub<1.0, psutil, pillow;
# numpy<2.3 is twinkle-kit's own bound.
REQUIREMENTS=(
  "requests==2.32.5" "datasets==3.6.0" "transformers==4.57.6" "tokenizers==0.22.1"
  "huggingface_hub==0.36.2" "psutil==7.1.3" "pillow==12.0.0" "numpy==2.2.6"
  "safetensors==0.7.0" "aiohappyeyeballs==2.7.1" "aiohttp==3.14.5" "aiosignal==1.4.0"
  "attrs==26.1.0" "certifi==2026.10.19.post1" "charset_normalizer==3.5.3" "dill==0.3.8"
  "filelock==4.3.2" "frozenlist==1.8.0" "fsspec==2025.3.0" "hf_xet==1.8.0" "idna==3.21"
  "multidict==7.2.1" "multiprocess==0.70.16" "packaging==26.4" "pandas==3.1.1"
  "propcache==0.5.4" "pyarrow==26.0.1" "python_dateutil==4.0.0" "pyyaml==6.0.4"
  "regex==2026.12.2" "tqdm==4.70.1" "typing_extensions==4.16.0" "tzdata==2026.6"
  "urllib3==2.8.0" "xxhash==4.1.0" "yarl==1.25.1"
)
# 0.1.3's sampler client subclasses twinkle.sampler.base.Sampler, which imports zmq.
EXTRA_01=("pyzmq==27.1.0")

DEPS="$ROOT/kit-deps"

site_packages() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

# new_venv <dir>: an empty venv at dir (removed first), on the base venv's interpreter so the
# layered torch (a CPython-version-specific wheel) always matches.
new_venv() {
  rm -rf "$1"
  mkdir -p "$(dirname "$1")"
  if ! "$BASE/bin/python" -m venv "$1" >&2; then
    echo "setup-twinkle-venv: '$BASE/bin/python -m venv' failed" >&2
    exit 1
  fi
}

pip_install() {
  local venv="$1"
  shift
  # pip warns that torch, fastapi, modelscope, ... are "not installed": expected, see above.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input --no-cache-dir \
    "$@" >&2
}

base_sp="$(site_packages "$BASE")"
deps_wanted="$(printf '%s\n' "base=$BASE" "${NODEPS[@]}" "${REQUIREMENTS[@]}")"
deps_stamp="$DEPS/.twinkle-kit-requirements"
if [[ ! -x "$DEPS/bin/python" ]] || [[ ! -f "$deps_stamp" ]] \
  || [[ "$(cat "$deps_stamp")" != "$deps_wanted" ]]; then
  new_venv "$DEPS"
  pip_install "$DEPS" --no-deps "${NODEPS[@]}"
  pip_install "$DEPS" "${REQUIREMENTS[@]}"
  printf '%s\n' "$deps_wanted" >"$deps_stamp"
fi
deps_sp="$(site_packages "$DEPS")"

# setup_kit <dir> <twinkle-kit version> <extra no-deps requirements...>
setup_kit() {
  local venv="$1" kit="$2"
  shift 2
  local stamp="$venv/.twinkle-kit-requirements"
  local wanted
  wanted="$(printf '%s\n' "$deps_wanted" "twinkle-kit==$kit" "$@")"
  if [[ -x "$venv/bin/python" ]] && [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$wanted" ]]; then
    return 0
  fi
  new_venv "$venv"
  pip_install "$venv" --no-deps "twinkle-kit==$kit" "$@"
  # After the venv's own packages: the shared deps, then torch (and what it imports) from the base.
  printf '%s\n' "$deps_sp" "$base_sp" >"$(site_packages "$venv")/_twinkle_kit_layers.pth"
  # Import check in a temp dir: importing twinkle.utils creates ./.locks in the working directory.
  local tmp
  tmp="$(mktemp -d)"
  (cd "$tmp" && HF_HUB_OFFLINE=1 "$venv/bin/python" - "$BASE" <<'EOF' >&2)
import sys, torch, transformers
base = sys.argv[1]
assert torch.__file__.startswith(base), f"torch should come from the base venv, got {torch.__file__}"
assert transformers.__version__.startswith("4."), transformers.__version__
from twinkle_client import init_twinkle_client
from twinkle_client.model import MultiLoraTransformersModel
from twinkle_client.sampler import vLLMSampler
from twinkle_client.dataset import Dataset
from twinkle_client.dataloader import DataLoader
from twinkle.dataset import DatasetMeta
from peft import LoraConfig
EOF
  rm -rf "$tmp"
  printf '%s\n' "$wanted" >"$stamp"
}

setup_kit "$ROOT/kit-0.5.1" 0.5.1
setup_kit "$ROOT/kit-0.1.3" 0.1.3 "${EXTRA_01[@]}"

echo "TWINKLE_KIT05_PYTHON=$ROOT/kit-0.5.1/bin/python"
echo "TWINKLE_KIT01_PYTHON=$ROOT/kit-0.1.3/bin/python"
