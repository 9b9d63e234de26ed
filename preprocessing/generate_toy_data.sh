#!/usr/bin/env bash
# Preprocess a quick subset: the first 2560 training images (in the shuffled order) and the
# first 2560 validation images, i.e. 10 batches each; label lists as for the full run, label
# files of exactly that subset (less any images --skip-bad left out), and no more.
#
#   preprocessing/generate_toy_data.sh                      # paths from preprocessing/paths.yaml
#   preprocessing/generate_toy_data.sh data/toy_imagenet/paths.yaml
#   preprocessing/generate_toy_data.sh my_paths.yaml --workers 4   # options of make_hkl.py
#
# Works from any folder; prints where the batches are at the end.
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HKL_MODE=toy exec bash "$HERE/generate_data.sh" "$@"
