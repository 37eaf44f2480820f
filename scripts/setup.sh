#!/usr/bin/env bash
# Install pyneuralode and what it needs. torch==2.13.0 first (a CPU build kept on local disk
# where available; any other spec downloads a multi-GB CUDA build), then the package itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-test}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch>=2.3"
fi
"$PY" -m pip install -q -e ".[$extras]"
