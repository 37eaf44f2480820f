#!/usr/bin/env bash
# The test command of the README and of CI: set up, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,docs
PY=${PYTHON:-python3}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$PY" -m pytest -q -p no:cacheprovider "$@"
