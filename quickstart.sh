#!/usr/bin/env bash
# The quickstart: installs the dependencies, builds the embedded toy ImageNet (real handwritten
# digit images in the ILSVRC2012 layout), preprocesses it with the real scripts, trains AlexNet
# on it for a few epochs, validates the last snapshot and plots the curves.
#   bash quickstart.sh                 # on a GPU if one is visible, else on the CPU
#   GPU=cpu bash quickstart.sh         # force the CPU
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3}
bash setup.sh
GPU=${GPU:-$("$PY" -c "import torch; print('gpu0' if torch.cuda.is_available() else 'cpu')")}

echo "== 1/4 toy ImageNet tree (data/toy_imagenet)"
"$PY" preprocessing/make_toy_imagenet.py data/toy_imagenet
echo "== 2/4 preprocessing (data/toy)"
bash preprocessing/generate_toy_data.sh
echo "== 3/4 training on $GPU (spec_toy.yaml)"
"$PY" train.py spec_toy.yaml "gpu=$GPU" overwrite=True   # a quickstart run again replaces its run
WEIGHTS=$("$PY" -c "from alexnet_lib.config import load_config; print(load_config('spec_1gpu.yaml', ['spec_toy.yaml'])['weights_dir'])")
echo "== 4/4 the README's commands after the quickstart, as written there"
# the bash block after the line '<!-- after the quickstart -->' in README.md
AFTER=$(awk '/^<!-- after the quickstart -->$/ {on = 1; next} on && /^```bash$/ {block = 1; next}
             block && /^```$/ {exit} block {print}' README.md)
[ -n "$AFTER" ] || { echo "quickstart: README.md has no block after the quickstart" >&2; exit 1; }
PYTHON_CMD=$PY bash -euxo pipefail -c "python() { \"\$PYTHON_CMD\" \"\$@\"; }; $AFTER"
echo "done: batches in data/toy, snapshots and metrics.csv in $WEIGHTS"
