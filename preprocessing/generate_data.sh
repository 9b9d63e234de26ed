#!/usr/bin/env bash
# Preprocess the full ImageNet: label lists, batch files, mean image, label files.
#
#   preprocessing/generate_data.sh                          # paths from preprocessing/paths.yaml
#   preprocessing/generate_data.sh my_paths.yaml            # another paths file
#   preprocessing/generate_data.sh my_paths.yaml --skip-bad --workers 8   # options of make_hkl.py
#   preprocessing/generate_data.sh --paths my_paths.yaml    # the same as my_paths.yaml
#
# Works from any folder. make_train_val_txt.py runs first: it only reads the devkit, so a
# devkit mismatch stops the run at once rather than after hours of make_hkl.py. Stopped or
# failed runs can be started again: complete batch files are kept. lists.txt lists the outputs.
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
PATHS="$HERE/paths.yaml"
if [[ $# -gt 0 && "$1" != -* ]]; then PATHS="$1"; shift; fi
options=()   # make_hkl.py's; --paths FILE, as the scripts take it, is for all three steps
while [[ $# -gt 0 ]]; do
    case "$1" in
        --paths) PATHS="${2:?--paths needs a file}"; shift 2 ;;
        --paths=*) PATHS="${1#--paths=}"; shift ;;
        *) options+=("$1"); shift ;;
    esac
done

"$PY" "$HERE/make_train_val_txt.py" --paths "$PATHS"
"$PY" "$HERE/make_hkl.py" "${HKL_MODE:-full}" --paths "$PATHS" ${options[@]+"${options[@]}"}  # toy: generate_toy_data.sh
"$PY" "$HERE/make_labels.py" --paths "$PATHS"
