#!/usr/bin/env bash
# Installs the dependencies (setup.sh), checks the code with ruff (configured in
# pyproject.toml) and runs the CPU test suite in two worker processes (pytest-xdist: many tests
# wait on the processes they start, and a second worker fills that time) and lists the 30
# slowest (the suite must stay under 20 minutes on a 2-core machine); arguments go to pytest:
#   bash run_tests.sh                           # what CI runs
#   bash run_tests.sh tests/test_train.py -x    # one file, stop at the first failure
#   python3 -m pytest -m "not slow"             # the fast tier: every module, under 2 minutes
# GPU tests: python3 -m pytest -m gpu   (on a machine with CUDA GPUs)
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash setup.sh
"${PYTHON:-python3}" -m ruff check .
exec "${PYTHON:-python3}" -m pytest -n 2 --durations=30 "$@"
