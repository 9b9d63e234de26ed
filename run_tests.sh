#!/usr/bin/env bash
# Installs the dependencies (setup.sh) and runs the CPU test suite.
# GPU tests: python3 -m pytest -m gpu   (on a machine with CUDA GPUs)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash setup.sh
exec "${PYTHON:-python3}" -m pytest "$@"
