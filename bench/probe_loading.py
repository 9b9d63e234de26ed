#!/usr/bin/env python3
"""Device experiment: where the end-to-end run loses time to loading, on one GPU. Each variant
times the training loop (Replica.train_epoch, bench.py's defaults unless key=value says
otherwise: bf16, compiled, CUDA graph, prefetch 2) over the configured batch files (the
quickstart's toy data of spec_toy.yaml), in turns, so that a slow first run or a drift shows:

    python3 bench/probe_loading.py                              # every variant, 2 rounds
    python3 bench/probe_loading.py resident parallel --rounds 3 --iters 300 prefetch=3

Variants:
  resident  the batch already on the GPU: the step alone (bench.py's "step alone")
  parallel  parallel loading as it is: the loader process fills shared host memory, the
            trainer copies each batch to the GPU on a stream of its own
  serial    para_load False: the trainer reads and copies each batch itself

Per variant: images/s and the host's time per step inside take() (waiting for the loader).
"""
import argparse
import statistics
import sys
import time

import torch

from alexnet_lib import parallel
from alexnet_lib.batch_files import read_rows
from alexnet_lib.config import DATA_KEYS, load_config
from alexnet_lib.data import ResidentLoader, SerialLoader
from alexnet_lib.loop import Replica

VARIANTS = ('resident', 'parallel', 'serial')

class TimedFeed:
    """A feed whose take() adds its host time to `waited`."""

    def __init__(self, feed, waited):
        self.feed, self.waited, self.requests = feed, waited, feed.requests

    def take(self):
        t = time.perf_counter()
        images = self.feed.take()
        self.waited[0] += time.perf_counter() - t
        return images

    def release(self):
        self.feed.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.feed.__exit__(*exc)


def make_loader(variant, rep, cfg):
    device, rows = rep.device, rep.data.batch
    if variant == 'resident':
        path, lo, hi, _ = rep.data.train_requests(1)[0]
        return ResidentLoader(device, torch.from_numpy(read_rows(path, lo, hi)).to(device))
    if variant == 'serial':
        return SerialLoader(device)
    return parallel.ParallelLoader(device, rows, cfg['prefetch'])


def time_variant(variant, rep, cfg, requests, warmup):
    sync = torch.cuda.synchronize if rep.device.type == 'cuda' else (lambda: None)
    waited = [0.0]
    with make_loader(variant, rep, cfg) as loader:
        feed = loader.feed
        loader.feed = lambda reqs: TimedFeed(feed(reqs), waited)
        rep.train_epoch(1, cfg['learning_rate'], loader, progress=False,
                        requests=requests[:warmup])
        sync()
        waited[0] = 0.0
        t0 = time.perf_counter()
        rep.train_epoch(1, cfg['learning_rate'], loader, progress=False,
                        requests=requests[warmup:])
        elapsed = time.perf_counter() - t0       # train_epoch ends by reading its sums
    n = len(requests) - warmup
    return n * rep.data.batch / elapsed, 1e3 * waited[0] / n


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('variants', nargs='*', help=f"of {', '.join(VARIANTS)} (default: all)")
    ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--iters', type=int, default=200)
    ap.add_argument('--warmup', type=int, default=20)
    a, overrides = ap.parse_known_args(argv)
    variants = a.variants or list(VARIANTS)
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    toy = load_config('spec_1gpu.yaml', ['spec_toy.yaml'])
    cfg = load_config('spec_1gpu.yaml', [f'{k}={toy[k]}' for k in DATA_KEYS] + [
        'print_freq=1000000000', 'snapshot_freq=1000000'] + overrides)
    rep = Replica(cfg)
    base = rep.data.train_requests(1)
    requests = [base[i % len(base)] for i in range(a.warmup + a.iters)]
    results = {v: [] for v in variants}
    for r in range(a.rounds):
        for v in variants:
            ips, wait_ms = time_variant(v, rep, cfg, requests, a.warmup)
            results[v].append(ips)
            print(f"round {r + 1} {v:9s} {ips:9.0f} img/s   take() {wait_ms:6.3f} ms/step",
                  flush=True)
    machine = torch.cuda.get_device_name(0) if rep.device.type == 'cuda' else 'CPU'
    print(f"{machine}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}, {a.iters} steps of {rep.data.batch}, {overrides}")
    for v, xs in results.items():
        print(f"{v:9s} median {statistics.median(xs):9.0f} img/s  runs "
              + ' '.join(f'{x:.0f}' for x in xs))


if __name__ == '__main__':
    main(sys.argv[1:])
