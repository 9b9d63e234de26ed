#!/usr/bin/env python3
"""Device experiment: where the end-to-end run loses time to loading, on one GPU. Each variant
times the training loop (Replica.train_epoch, bench.py's defaults unless key=value says
otherwise: bf16, compiled, CUDA graph, prefetch 2) over the configured batch files (the
quickstart's toy data of spec_toy.yaml), in turns, so that a slow first run or a drift shows:

    python3 bench/probe_loading.py                              # every variant, 2 rounds
    python3 bench/probe_loading.py resident ipc host --rounds 3 --iters 300 prefetch=3

Variants:
  resident  the batch already on the GPU: the step alone (bench.py's "step alone")
  ipc       parallel loading as it is: the loader process copies into the trainer's GPU
            buffers (CUDA IPC) behind the trainer's 'free' event and records a 'ready' event
            that the trainer's stream waits for (interprocess events both)
  nowait    ipc, but the trainer's stream does not wait for the 'ready' event (timing only:
            a step may read a buffer being filled)
  nofree    ipc, but the loader's copies do not wait for the 'free' event (timing only)
  host      the loader fills shared host memory (its CPU path, no CUDA in the loader); the
            trainer pins that memory (cudaHostRegister) and copies each batch into one of two
            GPU buffers on a stream of its own, behind in-process events
  serial    para_load False: the trainer reads and copies each batch itself

Per variant: images/s and the host's time per step inside take() (waiting for the loader).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from alexnet_lib import parallel
from alexnet_lib.batch_files import IMAGE_SHAPE, read_rows
from alexnet_lib.config import DATA_KEYS, load_config
from alexnet_lib.data import SerialLoader
from alexnet_lib.loop import Replica

VARIANTS = ('resident', 'ipc', 'nowait', 'nofree', 'host', 'serial')

# the loader started through this wrapper (run as the script itself would be, from its folder):
# its stream waits for no event
NO_WAIT_LOADER = """import os, runpy, sys, torch
torch.cuda.Stream.wait_event = lambda self, event: None
sys.argv[0] = {script!r}
sys.path[0] = os.path.dirname(sys.argv[0])
runpy.run_path({script!r}, run_name='__main__')
"""


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


class HostStagedLoader:
    """The loader's CPU path (shared host memory) with the GPU copies in the trainer."""

    def __init__(self, device, max_rows, prefetch):
        self.inner = parallel.ParallelLoader('cpu', max_rows, prefetch)
        self.cudart = torch.cuda.cudart()
        for t in self.inner._buffers.tensors:
            rc = self.cudart.cudaHostRegister(t.data_ptr(), t.numel(), 0)
            assert int(rc) == 0, f"cudaHostRegister: {rc}"
        self.gpu = [torch.empty((max_rows,) + IMAGE_SHAPE, dtype=torch.uint8, device=device)
                    for _ in range(2)]
        self.stream = torch.cuda.Stream(device)
        self.copied = [torch.cuda.Event() for _ in range(2)]
        self.free = [torch.cuda.Event() for _ in range(2)]
        self.k = 0

    def feed(self, requests):
        return HostStagedFeed(self, self.inner.feed(requests))

    def close(self):
        torch.cuda.synchronize()
        for t in self.inner._buffers.tensors:
            self.cudart.cudaHostUnregister(t.data_ptr())
        self.inner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HostStagedFeed:
    def __init__(self, loader, feed):
        self.loader, self.feed, self.requests, self.i = loader, feed, feed.requests, None

    def take(self):
        L = self.loader
        host = self.feed.take()
        i = self.i = L.k % 2
        gpu = L.gpu[i][:host.shape[0]]
        L.stream.wait_event(L.free[i])          # the step that last read gpu[i] is done
        with torch.cuda.stream(L.stream):
            gpu.copy_(host, non_blocking=True)
            L.copied[i].record(L.stream)
        torch.cuda.current_stream().wait_event(L.copied[i])
        return gpu

    def release(self):
        L = self.loader
        L.free[self.i].record(torch.cuda.current_stream())
        L.copied[self.i].synchronize()          # then the loader may overwrite the host buffer
        self.feed.release()
        L.k += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.feed.__exit__(*exc)


class Resident(SerialLoader):
    """Every request is the one batch already on the device."""

    def __init__(self, device, images):
        super().__init__(device)
        self.images = images

    def read(self, path, lo, hi):
        return self.images


def make_loader(variant, rep, cfg, wrapper):
    device, rows = rep.device, rep.data.batch
    if variant == 'resident':
        path, lo, hi, _ = rep.data.train_requests(1)[0]
        return Resident(device, torch.from_numpy(read_rows(path, lo, hi)).to(device))
    if variant == 'serial':
        return SerialLoader(device)
    if variant == 'host':
        return HostStagedLoader(device, rows, cfg['prefetch'])
    saved = parallel.LOADER_SCRIPT
    if variant == 'nofree':
        parallel.LOADER_SCRIPT = wrapper
    try:
        return parallel.ParallelLoader(device, rows, cfg['prefetch'])
    finally:
        parallel.LOADER_SCRIPT = saved


def time_variant(variant, rep, cfg, requests, warmup, wrapper):
    saved_take = parallel.SharedBuffers.take
    if variant == 'nowait':
        parallel.SharedBuffers.take = lambda self, buf, n: self.tensors[buf][:n]
    sync = torch.cuda.synchronize if rep.device.type == 'cuda' else (lambda: None)
    waited = [0.0]
    try:
        with make_loader(variant, rep, cfg, wrapper) as loader:
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
    finally:
        parallel.SharedBuffers.take = saved_take
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
    with tempfile.NamedTemporaryFile('w', suffix='.py', delete=False) as f:
        f.write(NO_WAIT_LOADER.format(script=os.path.abspath(parallel.LOADER_SCRIPT)))
    results = {v: [] for v in variants}
    try:
        for r in range(a.rounds):
            for v in variants:
                ips, wait_ms = time_variant(v, rep, cfg, requests, a.warmup, f.name)
                results[v].append(ips)
                print(f"round {r + 1} {v:9s} {ips:9.0f} img/s   take() {wait_ms:6.3f} ms/step",
                      flush=True)
    finally:
        os.unlink(f.name)
    machine = torch.cuda.get_device_name(0) if rep.device.type == 'cuda' else 'CPU'
    print(f"{machine}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}, {a.iters} steps of {rep.data.batch}, {overrides}")
    for v, xs in results.items():
        print(f"{v:9s} median {statistics.median(xs):9.0f} img/s  runs "
              + ' '.join(f'{x:.0f}' for x in xs))


if __name__ == '__main__':
    main(sys.argv[1:])
