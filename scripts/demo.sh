#!/usr/bin/env bash
# The main demo of the README: set up, then fit a neural ODE to a spiral (writes spiral.png).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh examples
PY=${PYTHON:-python3}
"$PY" examples/spiral.py "$@"
