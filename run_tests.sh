#!/usr/bin/env bash
# Installs the dependencies (setup.sh) and runs the CPU test suite.
# GPU tests: python3 -m pytest -m gpu   (on a machine with CUDA GPUs)
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash setup.sh
exec "${PYTHON:-python3}" -m pytest "$@"
