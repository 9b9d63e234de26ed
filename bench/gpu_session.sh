#!/usr/bin/env bash
# The GPU runs behind BENCHMARKS.md, one stage per call (each well inside 10 minutes), so that a
# short lease of a GPU machine goes on measuring rather than typing:
#
#   bash bench/gpu_session.sh tests     OUT        # every GPU-marked test this machine can run
#   bash bench/gpu_session.sh checks    OUT        # what a change of the step must pass: the GPU
#                                                  # tests three times in a row, then precision
#   bash bench/gpu_session.sh compare   OUT OLD    # bench.py (bf16 compiled) and the loader
#                                                  # benchmark on the checkout OLD, then on this one
#   bash bench/gpu_session.sh abab      OUT OTHER  # bench.py (defaults, no peers) on this checkout
#                                                  # and OTHER in turns, twice each, then OTHER's
#                                                  # GPU tests of the step
#   bash bench/gpu_session.sh table1    OUT        # one GPU, defaults (bf16): Table 1 with the
#                                                  # peers; tf32 and strict fp32; the loader
#   bash bench/gpu_session.sh profile   OUT [P]    # the compiled step's kernels (profile_step.py,
#                                                  # precision P, bf16 unless given),
#                                                  # also without fused_layers' kernels
#                                                  # (unfused), with the fc gradients from cuBLAS
#                                                  # in float32 (fcinto), and without a graph (the
#                                                  # table names each kernel's operator)
#   bash bench/gpu_session.sh convs     OUT [P]    # the step's convolutions at precision P
#                                                  # (fp32 unless given): each alone
#                                                  # (bench_convs.py), then in the step with
#                                                  # every gradient from cuDNN's backward,
#                                                  # NCHW inputs (profile_step.py)
#   bash bench/gpu_session.sh probe     OUT        # where end to end loses time to loading
#                                                  # (probe_loading.py: variants in turns)
#   bash bench/gpu_session.sh precision OUT        # bf16 vs fp32 on the toy data, 8 seeds each
#   bash bench/gpu_session.sh modes     OUT        # 1 GPU, and 2 GPUs in every exchange x average
#   bash bench/gpu_session.sh rules     OUT [EX]   # every exchange rule against every-step
#                                                  # averaging, toy data: 2 replicas sharing GPU 0
#                                                  # through gloo, or over EX=nccl|p2p on 2 GPUs
#   bash bench/gpu_session.sh scale128  OUT        # 1..N GPUs at 128 per GPU, nccl, gradients
#   bash bench/gpu_session.sh scale256  OUT        # the same at 256 per GPU (the toy files twice)
#
# On the device tool's machine: OUT is $OUT; carry .whl with the pyzmq and hickle wheels (the
# device README says how to download them); the toy data is built there when missing. Every
# figure goes to OUT/*.json and OUT/*.log; copy the JSON files into bench_results/ and the
# figures, with the machine, date and command, into BENCHMARKS.md.
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
usage="usage: gpu_session.sh tests|checks|compare|abab|table1|profile|convs|probe|precision|modes|rules|scale128|scale256 OUT [OLD|P|EX]"
stage=${1:?$usage}
out=${2:?$usage}
case "$stage" in
    tests | checks | compare | abab | table1 | profile | convs | probe | precision | modes | rules | scale128 | scale256) ;;
    *) echo "unknown stage '$stage': $usage"; exit 2 ;;
esac
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# NVLink multicast stays off on the shared hosts (the device tool's KINDS.md)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
site=""
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    site=/tmp/site
fi
# this checkout's package and root modules, without an install (nothing can be fetched there)
export PYTHONPATH=$PWD${site:+:$site}
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } \
    | tee "$out/gpus.txt"
python3 -c 'import torch; print("torch", torch.__version__)' | tee -a "$out/gpus.txt"
if [ ! -e data/toy/train_hkl_b256_b_256/0004.hkl ]; then
    python3 preprocessing/make_toy_imagenet.py data/toy_imagenet >"$out/toy_data.log"
    bash preprocessing/generate_toy_data.sh >>"$out/toy_data.log"
fi
doubled() {   # the toy training files twice over (links) with their labels: 2,560 images, in
    # folders of their own without a preprocessing record (the run checks their sizes alone)
    local d=data/toy_x2
    if [ ! -e "$d/train/0009.hkl" ]; then
        mkdir -p "$d/train" "$d/labels" "$d/val" "$d/misc"
        for i in 0 1 2 3 4; do
            ln -sf "../../toy/train_hkl_b256_b_256/000$i.hkl" "$d/train/000$i.hkl"
            ln -sf "../../toy/train_hkl_b256_b_256/000$i.hkl" "$d/train/000$((i + 5)).hkl"
        done
        for f in data/toy/val_hkl_b256_b_256/*.hkl; do
            ln -sf "../../toy/val_hkl_b256_b_256/$(basename "$f")" "$d/val/"
        done
        ln -sf ../../toy/misc/img_mean.npy "$d/misc/img_mean.npy"
        ln -sf ../../toy/labels/val_labels.npy "$d/labels/val_labels.npy"
        python3 -c "import numpy as np; l = np.load('data/toy/labels/train_labels.npy')[:1280]
np.save('$d/labels/train_labels.npy', np.concatenate([l, l]))"
    fi
    echo "train_folder=$d/train val_folder=$d/val label_folder=$d/labels \
mean_file=$d/misc/img_mean.npy"
}
bf16_against_fp32() {   # 8 seeds each; the runs' snapshots stay out of OUT (what comes back is
    # a few small files)
    python3 bench/bench_precision.py --seeds 1,2,3,4,5,6,7,8 --parallel 8 --out /tmp/precision \
        2>&1 | tee "$out/precision.log"
    cp /tmp/precision/precision.json "$out/precision_toy.json"
}
counts() {   # 2,4,8 up to the GPUs here
    local c list=""
    for c in 2 4 8; do [ "$c" -le "$gpus" ] && list="$list${list:+,}$c"; done
    echo "$list"
}
case "$stage" in
tests)
    python3 -m pytest -m gpu -p no:cacheprovider -rP --durations=15 2>&1 | tee "$out/gpu_tests.log" ;;
checks)
    for i in 1 2 3; do
        echo "== pytest -m gpu, run $i of 3"
        python3 -m pytest -m gpu -p no:cacheprovider -q 2>&1 | tail -25 || true
    done 2>&1 | tee "$out/gpu_tests_x3.log"
    bf16_against_fp32 ;;
compare)
    old=$(cd "${3:?compare needs the path of the other checkout: $usage}" && pwd)
    [ -e "$old/data" ] || ln -sfn "$PWD/data" "$old/data"
    # the same runs in the same order: the other checkout first (its own layout, no PYTHONPATH
    # of ours), then this one
    loader_old=$old/bench/bench_loader.py
    [ -e "$loader_old" ] || loader_old=$old/bench_loader.py
    (cd "$old" && PYTHONPATH=$PWD${site:+:$site} python3 "$loader_old" --prefetch 2 3 \
        --repeat 2 --json "$out/compare_old_loader.json") 2>&1 | tee "$out/compare_old_loader.log"
    python3 bench/bench_loader.py --prefetch 2 3 --repeat 2 --json "$out/compare_new_loader.json" \
        2>&1 | tee "$out/compare_new_loader.log"
    (cd "$old" && PYTHONPATH=$PWD${site:+:$site} python3 bench.py --no-peers --parallel-only \
        --out "$out/compare_old_bench.json" compile=True) 2>&1 | tee "$out/compare_old_bench.log"
    # this checkout with its defaults (the step replayed as a CUDA graph), then without the graph
    python3 bench.py --no-peers --parallel-only --out "$out/compare_new_bench.json" compile=True \
        2>&1 | tee "$out/compare_new_bench.log"
    python3 bench.py --no-peers --parallel-only --out "$out/compare_new_nograph_bench.json" \
        compile=True cuda_graph=False 2>&1 | tee "$out/compare_new_nograph_bench.log" ;;
abab)
    other=$(cd "${3:?abab needs the path of the other checkout: $usage}" && pwd)
    [ -e "$other/data" ] || ln -sfn "$PWD/data" "$other/data"
    for round in 1 2; do
        for tree in "$PWD" "$other"; do
            name=$([ "$tree" = "$PWD" ] && echo this || echo other)
            echo "== $name, round $round"
            (cd "$tree" && PYTHONPATH=$tree${site:+:$site} python3 bench.py --no-peers \
                --parallel-only --out "$out/abab_${name}_$round.json")
        done
    done 2>&1 | grep -v 'it/s\]' | tee "$out/abab.log"
    (cd "$other" && PYTHONPATH=$other${site:+:$site} python3 -m pytest -m gpu -p no:cacheprovider \
        -q tests/test_train.py tests/test_alexnet.py) 2>&1 | tail -30 | tee "$out/abab_tests.log" ;;
table1)
    python3 bench.py --out "$out/table1_bf16.json" 2>&1 | tee "$out/table1_bf16.log"
    python3 bench.py --no-peers --iters 60 --out "$out/table1_tf32.json" precision=tf32 \
        2>&1 | tee "$out/table1_tf32.log"
    python3 bench.py --no-peers --iters 40 --parallel-only --out "$out/table1_fp32.json" \
        precision=fp32 2>&1 | tee "$out/table1_fp32.log"
    python3 bench/bench_loader.py --json "$out/loader.json" 2>&1 | tee "$out/loader.log" ;;
profile)
    python3 bench/profile_step.py 'base!' unfused fcinto base 'nograph!' spec_toy.yaml \
        "precision=${3:-bf16}" 2>&1 | tee "$out/profile.log" ;;
convs)
    # first each convolution alone, its passes both ways and in both layouts (bench_convs.py);
    # then the step, each variant in a process of its own (cuDNN's choices stay cached in a
    # process): as it is; cudnngrads: every gradient from cuDNN's backward algorithms;
    # lrnslice: LRN's window sums from channel slices, not a product with a band matrix
    # (FFMA in strict fp32); nolayout+nchw: inductor keeps eager's layouts, the convolutions' inputs NCHW; nograph!:
    # the kernel table names each kernel's operator and shapes, layer by layer
    timeout 120 python3 bench/bench_convs.py --precision "${3:-fp32}" \
        --json "$out/convs_alone_${3:-fp32}.json" 2>&1 | tee "$out/convs_alone.log" || true
    for v in base cudnngrads lrnslice nolayout+nchw nolayout+nchw+cudnngrads 'nograph!'; do
        timeout 150 python3 bench/profile_step.py "$v" spec_toy.yaml "precision=${3:-fp32}" \
            || echo "$v: exit $?"
    done 2>&1 | grep -v 'it/s\]' | tee "$out/convs.log" ;;
probe)
    python3 bench/probe_loading.py --rounds 2 --iters 300 2>&1 | tee "$out/probe.log" ;;
precision)
    bf16_against_fp32 ;;
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
rules)
    # 2 replicas, spec_toy.yaml (32 images per replica and step, 20 steps per epoch, 5 epochs),
    # through EXCHANGE (the third word): gloo (default) with both sharing GPU 0; nccl or p2p on
    # GPUs 0 and 1 (p2p has no gossip: no point-to-point sends). The snapshots stay out of OUT
    ex=${3:-gloo}
    case "$ex" in
        gloo) devs="[0,0]" ;;
        nccl | p2p)
            [ "$gpus" -ge 2 ] || { echo "rules over $ex need two GPUs; this machine has $gpus"
                exit 1; }
            devs="[0,1]" ;;
        *) echo "rules: exchange '$ex' is not gloo, nccl or p2p"; exit 2 ;;
    esac
    rm -rf /tmp/rules && mkdir -p /tmp/rules
    for run in "weights" "elastic exchange_freq=4 elastic_alpha=0.5" "gossip gossip_p=0.25" \
        "outer exchange_freq=4"; do
        set -- $run
        avg=$1; shift
        [ "$ex" = p2p ] && [ "$avg" = gossip ] && continue
        # shellcheck disable=SC2068  # the run's own key=value words
        python3 train_2gpu.py spec_toy.yaml "gpus=$devs" "exchange=$ex" "average=$avg" $@ \
            "weights_dir=/tmp/rules/$avg" overwrite=True
        echo "$run" >"/tmp/rules/$avg/settings.txt"
    done 2>&1 | tee "$out/rules_$ex.log"
    python3 - "$out/rules_toy_$ex.json" <<'PY'
import csv, json, os, sys
runs = {}
for avg in ('weights', 'elastic', 'gossip', 'outer'):
    if not os.path.exists(f'/tmp/rules/{avg}/metrics.csv'):
        continue
    rows = list(csv.DictReader(open(f'/tmp/rules/{avg}/metrics.csv')))
    runs[avg] = {'settings': open(f'/tmp/rules/{avg}/settings.txt').read().strip(),
                 'val_top1_error': [float(r['val_top1_error']) for r in rows],
                 'images_per_s': [float(r['images_per_s']) for r in rows]}
    print(f"{runs[avg]['settings']:40s} top-1 error by epoch "
          + ' '.join(f'{e:.3f}' for e in runs[avg]['val_top1_error']))
json.dump(runs, open(sys.argv[1], 'w'), indent=1)
PY
    ;;
scale128 | scale256)
    per=${stage#scale}
    c=$(counts)
    [ -n "$c" ] || { echo "scaling needs two or more GPUs; this machine has $gpus"; exit 1; }
    data=$([ "$per" = 256 ] && doubled || true)
    for dtype in fp32 bf16; do
        # shellcheck disable=SC2086  # $data: key=value words
        python3 bench.py --no-peers --iters 60 --gpu-counts "$c" --per-gpu-batch "$per" \
            --parallel-only --out "$out/scale${per}_${dtype}.json" batch_size="$per" $data \
            exchange=nccl average=gradients exchange_dtype=$dtype
    done 2>&1 | tee "$out/scale${per}.log" ;;
esac
