r"""Benchmark: the report's Table 1 on the machine at hand, plus the peers.

    python bench.py                                  # GPUs: 1 and 2 GPUs x parallel/serial loading
    python bench.py precision=fp32 compile=False     # any config key=value, as train.py
    python bench.py --cpu                            # a small CPU run (labelled CPU), e.g. for CI
    python bench.py --out bench_out/bench.json --iters 100
    python bench.py --gpu-counts 2,4 --per-gpu-batch 128 batch_size=128 exchange=nccl \
        average=gradients --parallel-only           # scaling: 1, 2 and 4 GPUs at 128 per GPU

For {1 GPU, 2 GPUs (when present)} x {parallel loading, serial loading} it trains from the
configured batch files (train_folder, by default the quickstart's toy data of spec_toy.yaml;
the files are visited cyclically) with the real training
loop, and prints seconds per 20 iterations of the global batch, images/s, the peak GPU memory
of a trainer and the share of time spent waiting for data. In the same run: the model step alone
on data already on the GPU, and the peers: this network written plainly in PyTorch (nn.Conv2d &
co) and torchvision's AlexNet (when torchvision is installed), each in the loop a user who wants
speed writes (compiled with CUDA graphs, torch.optim.SGD's fused kernel, the run's precision) on
data already on the GPU. A short table comes last; every figure goes to the JSON file.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

from alexnet_lib.config import DATA_KEYS, ROOT, help_text, load_config
from alexnet_lib.errors import run_main
from alexnet_lib.step import amp_dtype_of, autocast, precision_of

REPORT = {'1 GPU, parallel loading': 39.72, '1 GPU, serial loading': 49.11,
          '2 GPUs, parallel loading': 23.39, '2 GPUs, serial loading': 28.92}


def cyclic_requests(rep, n):
    base = rep.data.train_requests(1)
    return [base[i % len(base)] for i in range(n)]


def time_training(cfg, rank, world, device, exchanger, iters, warmup):
    """Train warmup + iters steps with the real loop; figures of the timed part."""
    from alexnet_lib.loop import Replica
    rep = Replica(cfg, rank, world, device, exchanger)
    reqs = cyclic_requests(rep, warmup + iters)
    cuda = rep.device.type == 'cuda'
    with rep.make_loader() as loader:
        rep.train_epoch(1, cfg['learning_rate'], loader, progress=False, requests=reqs[:warmup])
        if cuda:
            torch.cuda.synchronize(rep.device)
            torch.cuda.reset_peak_memory_stats(rep.device)
        t0 = time.time()
        rep.train_epoch(1, cfg['learning_rate'], loader, progress=False, requests=reqs[warmup:])
        elapsed = time.time() - t0   # train_epoch ends by reading its sums: the GPU is done
    return {'s_per_20_iter': 20 * elapsed / iters,
            'images_per_s': iters * rep.data.global_batch / elapsed,
            'global_batch': rep.data.global_batch,
            'peak_gpu_mem_gb': torch.cuda.max_memory_allocated(rep.device) / 1e9 if cuda else None}


def _bench_worker(rank, world, cfg, devices, iters, warmup, out_dir):
    from alexnet_lib.exchange import make_exchanger
    if devices[rank] == 'cpu':
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    with make_exchanger(cfg['exchange'], rank, world, devices[rank], port=cfg['sock_gpu']) as ex:
        r = time_training(cfg, rank, world, devices[rank], ex, iters, warmup)
        r['exchange'] = ex.kind
    with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump(r, f)


def time_multi(cfg, devices, iters, warmup):
    from alexnet_lib import launch
    with tempfile.TemporaryDirectory() as d:
        launch.spawn(_bench_worker, len(devices), (cfg, devices, iters, warmup, d))
        with open(os.path.join(d, 'rank0.json')) as f:
            return json.load(f)


def time_model_step(cfg, device, iters, warmup):
    """Our training step (augmentation, forward, backward, update) on one batch already on the
    device: the model's own speed, no loading."""
    from alexnet_lib.loop import Replica
    rep = Replica(cfg, 0, 1, device)
    path, lo, hi, _ = rep.data.train_requests(1)[0]
    from alexnet_lib.batch_files import read_rows
    from alexnet_lib.data import ResidentLoader
    loader = ResidentLoader(rep.device, torch.from_numpy(read_rows(path, lo, hi)).to(rep.device))
    reqs = cyclic_requests(rep, warmup + iters)
    rep.train_epoch(1, cfg['learning_rate'], loader, progress=False, requests=reqs[:warmup])
    t0 = time.time()
    rep.train_epoch(1, cfg['learning_rate'], loader, progress=False, requests=reqs[warmup:])
    elapsed = time.time() - t0
    return {'s_per_20_iter': 20 * elapsed / iters,
            'images_per_s': iters * rep.data.batch / elapsed}


def plain_alexnet():
    """This network written plainly with torch.nn: the peer of a plain PyTorch user."""
    import torch.nn as nn
    lrn = lambda: nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    return nn.Sequential(
        nn.Conv2d(3, 96, 11, 4), nn.ReLU(), nn.MaxPool2d(3, 2), lrn(),
        nn.Conv2d(96, 256, 5, 1, 2, groups=2), nn.ReLU(), nn.MaxPool2d(3, 2), lrn(),
        nn.Conv2d(256, 384, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(384, 384, 3, 1, 1, groups=2), nn.ReLU(),
        nn.Conv2d(384, 256, 3, 1, 1, groups=2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Flatten(),
        nn.Linear(9216, 4096), nn.ReLU(), nn.Dropout(),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(), nn.Linear(4096, 1000))


def time_peer(model, device, batch, amp_dtype, iters, warmup, size=227):
    """A plain PyTorch training loop as a user who wants speed writes it, on one batch already on
    the device: on a GPU the model in channels_last, compiled with CUDA graphs
    (mode='reduce-overhead') and torch.optim.SGD's fused kernel; on the CPU eager. SGD with
    momentum and weight decay, autocast at the run's precision."""
    model = model.to(device)
    cuda = device.type == 'cuda'
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4,
                          fused=cuda)
    forward = torch.compile(model, mode='reduce-overhead') if cuda else model

    def step():
        if cuda:      # a new step of the graphed forward: the last one's outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device.type, amp_dtype):
            loss = torch.nn.functional.cross_entropy(forward(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach().clone()
    for _ in range(warmup):
        step()
    float(step())
    t0 = time.time()
    for _ in range(iters):
        loss = step()
    float(loss)
    elapsed = time.time() - t0
    return {'s_per_20_iter': 20 * elapsed / iters, 'images_per_s': iters * batch / elapsed,
            'how': ('compiled with CUDA graphs, fused SGD' if cuda else 'eager') + ', '
                   + {None: 'float32', torch.bfloat16: 'bf16 autocast'}[amp_dtype]}


def bench(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter,
                                 epilog=help_text('spec_1gpu.yaml', 'Any setting as key=value:'))
    ap.add_argument('--cpu', action='store_true', help='a small run on the CPU (2 processes)')
    ap.add_argument('--iters', type=int, help='timed iterations (default 100 GPU, 3 CPU)')
    ap.add_argument('--warmup', type=int, help='untimed iterations first (default 15 GPU, 1 CPU)')
    ap.add_argument('--max-gpus', type=int, default=2, help='GPUs of the multi-GPU rows')
    ap.add_argument('--gpu-counts', help='several multi-GPU rows, e.g. 2,4,8 (default: --max-gpus)')
    ap.add_argument('--parallel-only', action='store_true', help='no serial-loading rows')
    ap.add_argument('--per-gpu-batch', type=int,
                    help='batch per GPU of the multi-GPU rows (default: batch_size / GPUs)')
    ap.add_argument('--no-peers', action='store_true')
    ap.add_argument('--multi-only', action='store_true', help='only the multi-GPU rows')
    ap.add_argument('--out', default='bench_out/bench.json')
    a, overrides = ap.parse_known_args(argv)
    gpus = 0 if a.cpu else torch.cuda.device_count()
    if not gpus and not a.cpu:
        print("no CUDA GPU visible: running the small CPU benchmark (--cpu)", file=sys.stderr)
        a.cpu = True
    iters = a.iters or (3 if a.cpu else 100)
    warmup = a.warmup if a.warmup is not None else (1 if a.cpu else 15)
    base = ['print_freq=1000000000', 'snapshot_freq=1000000']
    # what the user set (key=value, a yaml file named or in the current folder) stays theirs
    defaults = {os.path.join(ROOT, f) for f in ('config.yaml', 'spec_1gpu.yaml')}
    given = {k for k, src in load_config('spec_1gpu.yaml', overrides).set_by.items()
             if src not in defaults}
    if a.cpu and 'batch_size' not in given:
        base += ['batch_size=8']
    if not given & set(DATA_KEYS):
        # speed needs batch files, not a particular data set: the quickstart's toy data
        toy = load_config('spec_1gpu.yaml', ['spec_toy.yaml'])
        base += [f'{k}={toy[k]}' for k in DATA_KEYS]
        print(f"bench: batch files of spec_toy.yaml ({toy['train_folder']}); give "
              f"train_folder=... val_folder=... label_folder=... mean_file=... for others",
              file=sys.stderr)
    cfg1 = load_config('spec_1gpu.yaml', base + (['gpu=cpu'] if a.cpu else []) + overrides)
    counts = ([int(c) for c in a.gpu_counts.split(',')] if a.gpu_counts else [a.max_gpus])
    counts = [2] if a.cpu else [min(c, gpus) for c in counts if c >= 2 and gpus >= 2]
    multi = []   # (devices, config) of each multi-GPU row
    for n_multi in dict.fromkeys(counts):
        devices = ['cpu'] * 2 if a.cpu else [f'cuda:{i}' for i in range(n_multi)]
        # Table 1: the GPUs share the global batch (2 x 128 = 256); --per-gpu-batch to scale
        per_gpu = a.per_gpu_batch or cfg1['batch_size'] // n_multi
        m = [o for o in overrides if not o.startswith('gpu=')]
        extra = ['exchange=host'] if a.cpu else []
        multi.append((devices, load_config(
            'spec_2gpu.yaml', base + [f'batch_size={per_gpu}'] + extra + m
            + [f'gpus=[{",".join(devices)}]'])))
    label = f"CPU (small: batch {cfg1['batch_size']}, {iters} iterations)" if a.cpu else \
        torch.cuda.get_device_name(0)
    results = {'machine': label, 'date': time.strftime('%Y-%m-%d'), 'argv': argv,
               'batch_size': cfg1['batch_size'], 'precision': cfg1['precision'],
               'compile': cfg1['compile'],
               'exchange': multi[0][1]['exchange'] if multi else None,
               'average': multi[0][1]['average'] if multi else None, 'rows': {}}
    rows = results['rows']
    dev1 = cfg1['gpu']
    resident = None if a.multi_only else time_model_step(cfg1, dev1, iters, warmup)
    loadings = (True,) if a.parallel_only else (True, False)
    for para in () if a.multi_only else loadings:
        cfg = dict(cfg1, para_load=para)
        name = (f"1 {'GPU' if not a.cpu else 'CPU process'}, "
                f"{'parallel' if para else 'serial'} loading")
        rows[name] = r = time_training(cfg, 0, 1, dev1, None, iters, warmup)
        # the share of a step the device waits for data: the step's time over the model's own
        if resident:
            r['data_wait_share'] = max(0.0, 1 - resident['s_per_20_iter'] / r['s_per_20_iter'])
        print(name, r, flush=True)
    for devices, cfgm in multi:
        for para in loadings:
            name = (f"{len(devices)} {'GPUs' if not a.cpu else 'CPU processes'}, "
                    f"{'parallel' if para else 'serial'} loading")
            rows[name] = r = time_multi(dict(cfgm, para_load=para), devices, iters, warmup)
            one = rows.get(name.replace(f"{len(devices)} GPUs", "1 GPU"))
            if one and cfgm['batch_size'] == cfg1['batch_size']:   # same per-GPU batch
                r['speedup_vs_1_gpu'] = r['images_per_s'] / one['images_per_s']
            print(name, rows[name], flush=True)
    if resident:
        rows['model step alone (data on the device)'] = resident
    if not a.no_peers:
        device = torch.device(dev1)
        amp = amp_dtype_of(precision_of(cfg1['precision'], device))   # the run's precision
        b = cfg1['batch_size']
        rows['peer: this network in plain PyTorch'] = time_peer(plain_alexnet(), device, b, amp,
                                                                 iters, warmup)
        try:
            import torchvision
            rows['peer: torchvision AlexNet (224x224)'] = time_peer(
                torchvision.models.alexnet(), device, b, amp, iters, warmup, size=224)
        except ImportError:
            rows['peer: torchvision AlexNet (224x224)'] = None
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, 'w') as f:
        json.dump(results, f, indent=1)
    print(f"\n{label}; batch {cfg1['batch_size']}/GPU, precision {cfg1['precision']}, "
          f"compile {cfg1['compile']}"
          + (f", exchange {results['exchange']}, average {results['average']}" if multi else ''))
    print(f"{'':44s} {'s/20 iter':>9s} {'img/s':>9s} {'peak GB':>8s} {'wait':>6s} {'report':>7s} "
          f"{'vs 1':>5s}")
    for name, r in rows.items():
        if r is None:
            print(f"{name:44s} {'(not installed)':>9s}")
            continue
        mem = r.get('peak_gpu_mem_gb')
        wait = r.get('data_wait_share')
        rep = REPORT.get(name)
        print(f"{name:44s} {r['s_per_20_iter']:9.3f} {r['images_per_s']:9.0f} "
              f"{mem if mem is not None else float('nan'):8.2f} "
              f"{wait if wait is not None else float('nan'):6.1%} "
              f"{rep if rep else float('nan'):7.2f} "
              f"{r.get('speedup_vs_1_gpu', float('nan')):5.2f}")
    for name, r in rows.items():
        if name.startswith('peer') and r:
            print(f"{name}: {r['how']}")
    best = max((r['images_per_s'] for n, r in rows.items() if r and 'loading' in n), default=0)
    if best:
        results['hours_for_90_imagenet_epochs'] = 90 * 1_281_167 / best / 3600
        print(f"90 ImageNet epochs (1,281,167 images each) at {best:,.0f} images/s: "
              f"{results['hours_for_90_imagenet_epochs']:.2f} hours")
    with open(a.out, 'w') as f:
        json.dump(results, f, indent=1)
    print(f"wrote {a.out}")
    return results


def main(argv):
    """bench(argv), a bad config or missing batch files ending in one line."""
    return run_main(lambda: bench(argv))


if __name__ == '__main__':
    main(sys.argv[1:])
