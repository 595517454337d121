#!/usr/bin/env bash
# Make a virtual environment with a Python >= 3.12 (jax 0.12 needs it):
#   bash tools/venv.sh [DIR]        # default .venv
# Takes python3.12 if it runs, else python3 if it is new enough, else a pyenv-installed 3.12
# (a pyenv shim for a version that is not selected does not run); one-line error otherwise.
set -euo pipefail
VENV="${1:-.venv}"
PY=""
for cand in python3.12 python3 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
  if "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
    PY="$cand"; break
  fi
done
[ -n "$PY" ] || { echo "tools/venv.sh: needs Python >= 3.12 (python3.12 or python3); none found" >&2; exit 1; }
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
