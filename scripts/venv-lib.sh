#!/usr/bin/env bash
# Shared by scripts/setup-venv.sh and scripts/setup-bench-venv.sh (sourced, not run): the one
# place that creates a venv and installs pinned requirements into it, so both stay idempotent the
# same way.

# ensure_venv VENV STAMP_NAME IMPORT_CHECK TORCH REQUIREMENT...
# Creates VENV when it has no python, then installs TORCH (--no-deps: its nvidia-* wheels are
# listed in REQUIREMENTS where they are wanted at all) and every REQUIREMENT unless
# VENV/STAMP_NAME already records exactly this list. IMPORT_CHECK is Python that must run after
# the install (the imports the caller relies on).
ensure_venv() {
  local venv="$1" stamp="$1/$2" check="$3" torch="$4"
  shift 4
  local wanted
  wanted="$(printf '%s\n' "$torch" "$@")"
  if [[ ! -x "$venv/bin/python" ]]; then
    mkdir -p "$(dirname "$venv")"
    if ! python3 -m venv "$venv" >&2; then
      echo "setup-venv: 'python3 -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
  if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "$wanted" ]]; then
    local pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input)
    "${pip[@]}" --no-deps "$torch" >&2
    "${pip[@]}" "$@" >&2
    "$venv/bin/python" -c "$check" >&2
    printf '%s\n' "$wanted" >"$stamp"
  fi
}
