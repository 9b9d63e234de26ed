#!/usr/bin/env bash
# The GPU runs that issues 5 and 8 still need, one stage per device call (each well inside 10
# minutes), so that a lease goes on measuring rather than typing:
#
#   bash bench_results/gpu_session.sh tests     OUT   # every GPU-marked test this machine can run
#   bash bench_results/gpu_session.sh table1    OUT   # one GPU: Table 1, bf16 compiled (with the
#                                                     # peers), then tf32 compiled
#   bash bench_results/gpu_session.sh precision OUT   # bf16 vs fp32 on the toy data, 4 seeds each
#   bash bench_results/gpu_session.sh modes     OUT   # 1 GPU, and 2 GPUs in every exchange x
#                                                     # average, at 128 per GPU, eager
#   bash bench_results/gpu_session.sh scale128  OUT   # 1..N GPUs at 128 per GPU, nccl, gradients
#   bash bench_results/gpu_session.sh scale256  OUT   # the same at 256 per GPU, over the toy
#                                                     # files twice (a step of 8 x 256 is 2,048)
#
# On the device tool's machine: OUT is $OUT; carry .whl with the pyzmq and hickle wheels
# (the device README says how to download them); the toy data is built there when missing.
# Every figure goes to OUT/*.json and OUT/*.log; copy the JSON files into bench_results/ and
# the figures, with the machine, date and command, into BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stage=${1:?usage: gpu_session.sh tests|table1|precision|modes|scale128|scale256 OUT}
out=${2:?usage: gpu_session.sh STAGE OUT}
case "$stage" in
    tests | table1 | precision | modes | scale128 | scale256) ;;
    *) echo "unknown stage '$stage': tests, table1, precision, modes, scale128 or scale256"
       exit 2 ;;
esac
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# NVLink multicast stays off on the shared hosts (the device tool's KINDS.md)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } \
    | tee "$out/gpus.txt"
python3 -c 'import torch; print("torch", torch.__version__)' | tee -a "$out/gpus.txt"
if [ ! -e data/toy/train_hkl_b256_b_256/0004.hkl ]; then
    python3 preprocessing/make_toy_imagenet.py data/toy_imagenet >"$out/toy_data.log"
    bash preprocessing/generate_toy_data.sh >>"$out/toy_data.log"
fi
doubled() {   # the toy training files twice over (links) with their labels: 2,560 images
    local d=data/toy_x2
    if [ ! -e "$d/train/0009.hkl" ]; then
        mkdir -p "$d/train" "$d/labels"
        for i in 0 1 2 3 4; do
            ln -sf "../../toy/train_hkl_b256_b_256/000$i.hkl" "$d/train/000$i.hkl"
            ln -sf "../../toy/train_hkl_b256_b_256/000$i.hkl" "$d/train/000$((i + 5)).hkl"
        done
        ln -sf ../../toy/labels/val_labels.npy "$d/labels/val_labels.npy"
        python3 -c "import numpy as np; l = np.load('data/toy/labels/train_labels.npy')[:1280]
np.save('$d/labels/train_labels.npy', np.concatenate([l, l]))"
    fi
    echo "train_folder=$d/train label_folder=$d/labels"
}
counts() {   # 2,4,8 up to the GPUs here
    local c list=""
    for c in 2 4 8; do [ "$c" -le "$gpus" ] && list="$list${list:+,}$c"; done
    echo "$list"
}
case "$stage" in
tests)
    python3 -m pytest -m gpu -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" ;;
table1)
    python3 bench.py --out "$out/table1_bf16_compiled.json" compile=True \
        2>&1 | tee "$out/table1_bf16.log"
    python3 bench.py --no-peers --iters 60 --max-gpus 1 --out "$out/table1_tf32_compiled.json" \
        compile=True precision=tf32 2>&1 | tee "$out/table1_tf32.log" ;;
precision)
    # the runs' snapshots stay out of OUT (what comes back is a few small files)
    python3 bench_precision.py --out /tmp/precision 2>&1 | tee "$out/precision.log"
    cp /tmp/precision/precision.json "$out/precision_toy.json" ;;
modes)
    [ "$gpus" -ge 2 ] || { echo "modes needs two GPUs; this machine has $gpus"; exit 1; }
    rm -rf /tmp/modes && mkdir -p /tmp/modes
    first=""   # the 1-GPU row once, with the first mode
    for ex in p2p nccl gloo host; do
        for avg in weights gradients; do
            python3 bench.py --no-peers --iters 60 --parallel-only --per-gpu-batch 128 $first \
                --out "/tmp/modes/${ex}_${avg}.json" batch_size=128 exchange=$ex average=$avg
            first=--multi-only
        done
    done 2>&1 | tee "$out/modes.log"
    python3 - "$out/modes_2gpu.json" <<'PY'
import glob, json, os, sys
runs = {os.path.basename(f)[:-5]: json.load(open(f)) for f in sorted(glob.glob('/tmp/modes/*.json'))}
json.dump(runs, open(sys.argv[1], 'w'), indent=1)
one = next(r['rows']['1 GPU, parallel loading'] for r in runs.values()
           if '1 GPU, parallel loading' in r['rows'])['images_per_s']
print(f"1 GPU at 128: {one:.0f} img/s")
for mode, r in runs.items():
    two = r['rows']['2 GPUs, parallel loading']['images_per_s']
    print(f"2 GPUs x 128, {mode:18s} {two:8.0f} img/s  {two / one:5.2f}x")
PY
    ;;
scale128 | scale256)
    per=${stage#scale}
    c=$(counts)
    [ -n "$c" ] || { echo "scaling needs two or more GPUs; this machine has $gpus"; exit 1; }
    data=$([ "$per" = 256 ] && doubled || true)
    # shellcheck disable=SC2086  # $data: two key=value words
    python3 bench.py --no-peers --iters 60 --gpu-counts "$c" --per-gpu-batch "$per" \
        --parallel-only --out "$out/scale${per}_compiled.json" batch_size="$per" $data \
        exchange=nccl average=gradients compile=True 2>&1 | tee "$out/scale${per}.log" ;;
esac
