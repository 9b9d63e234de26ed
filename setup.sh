#!/usr/bin/env bash
# Installs what this project needs into the current Python (a venv or conda env if one is active).
# torch first and pinned: an unpinned torch on a machine without one pulls the newest CUDA build
# and several GB of CUDA packages. Where a torch is already installed (your CUDA build), it is kept.
# Then this checkout, editable: its dependencies and the package alexnet_lib. Run the scripts from
# a checkout: each runs its own checkout's code (those in preprocessing/, bench/, pretrained/, tests/
# through the links there to ../alexnet_lib, ../alex_net.py, ../layers.py), so checkouts can
# share one environment. A non-editable install (pip install ., a wheel) refuses at import.
# Usage: bash setup.sh            (TORCH_SPEC=torch==X.Y.Z bash setup.sh to choose another torch)
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3}
for link in {preprocessing,bench,pretrained,tests}/{alexnet_lib,alex_net.py,layers.py}; do
    if [ ! -L "$link" ]; then
        echo "setup.sh: $PWD/$link is not a symbolic link; check out the repository with" \
            "symbolic links (git config core.symlinks true)" >&2
        exit 1
    fi
done
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install -q -e ".[test]"
