#!/usr/bin/env bash
# Installs what this project needs into the current Python (a venv or conda env if one is active).
# torch first and pinned: an unpinned torch on a machine without one pulls the newest CUDA build
# and several GB of CUDA packages. Where a torch is already installed (your CUDA build), it is kept.
# Usage: bash setup.sh            (TORCH_SPEC=torch==X.Y.Z bash setup.sh to choose another torch)
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install -q -e ".[test]"
