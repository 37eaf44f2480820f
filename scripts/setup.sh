#!/usr/bin/env bash
# Install pyneuralode and what it needs. torch==2.13.0 first (a CPU build kept on local disk
# where available; any other spec downloads a multi-GB CUDA build), then the package itself
# with the extras given (default: test,docs). With the docs extra, headless Chromium (Debian's
# `chromium`) is installed too where apt-get may be used, for the docs rendering test (which skips
# with its reason where there is none).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-test,docs}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch>=2.3"
fi
"$PY" -m pip install -q -e ".[$extras]"
if [[ ",$extras," == *",docs,"* ]] && ! command -v chromium >/dev/null 2>&1 \
    && ! command -v chromium-browser >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo -n"; fi
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || echo "setup.sh: could not install chromium; the docs rendering test will skip" >&2
fi
