#!/usr/bin/env python3
"""Benchmark of parallel loading: images/s that one loader process delivers from batch files in
the page cache into the trainer's GPU memory (256x256x3 uint8 images, 196,608 bytes each).

    python bench/bench_loader.py                    # on a GPU: 40 files of 256 images
    python bench/bench_loader.py --device cpu       # smaller, into shared CPU memory (labelled CPU)
    python bench/bench_loader.py --dir /data/bench  # write the files there (or reuse them)
    python bench/bench_loader.py --prefetch 2 3 --chunk-rows 16 32 64 --read-threads 4 8

It writes (or reuses) the batch files, reads each once to bring it into the page cache, then
measures, cycling over the files:
  * read_rows -> host      batch_files.read_rows into a (pinned, on a GPU) host buffer, as
                           SerialLoader reads (its threads split each request)
  * pread -> host (k thr)  the raw dataset bytes read with os.preadv by k threads: the ceiling of
                           reading from the page cache on this machine
  * H2D copy               pinned host -> GPU copy alone
  * SerialLoader           para_load: False (read, copy, synchronise, in the trainer)
  * ParallelLoader ...     para_load: True, for each prefetch x chunk rows x read threads; the
                           consumer only takes each item and runs one tiny GPU op on it
Prints a table and one line 'BENCH_JSON {...}'.
"""
import argparse
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


from alexnet_lib import parallel
from alexnet_lib.batch_files import (IMAGE_SHAPE, BatchFileError, batch_rows, read_rows,
                         write_batch)
from alexnet_lib.data import SerialLoader
from alexnet_lib.parallel import ParallelLoader

ROW_BYTES = int(np.prod(IMAGE_SHAPE))
TARGET = 110000   # twice what a 55,000 images/s training step consumes


def make_files(folder, n_files, rows):
    os.makedirs(folder, exist_ok=True)
    files = [os.path.join(folder, f'{i:04d}.hkl') for i in range(n_files)]
    base = None
    for i, p in enumerate(files):
        try:
            if batch_rows(p) == rows:
                continue
        except BatchFileError:
            pass
        if base is None:
            base = np.random.RandomState(0).randint(0, 256, (rows,) + IMAGE_SHAPE).astype(np.uint8)
        write_batch(p, base ^ np.uint8(i))
    return files


def raw_offset(path):
    """File offset of the contiguous, uncompressed 'data' dataset (None if it is chunked)."""
    import h5py
    with h5py.File(path, 'r') as h5:
        d = h5['data']
        if d.chunks is not None or d.compression is not None:
            return None
        return d.id.get_offset()


def timed(fn, n_items, rows, repeat):
    """Best images/s of ``fn()`` over ``repeat`` runs; fn delivers n_items of ``rows`` images."""
    best = 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = max(best, n_items * rows / (time.perf_counter() - t))
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default='auto', help="auto (cuda if available), cuda, cpu")
    ap.add_argument('--dir', default=None, help="folder for the batch files (reused if present)")
    ap.add_argument('--files', type=int, default=None, help="batch files (GPU 40, CPU 8)")
    ap.add_argument('--rows', type=int, default=None, help="images per file (GPU 256, CPU 64)")
    ap.add_argument('--batches', type=int, default=None,
                    help="batches delivered per measurement (default: 3 passes over the files)")
    ap.add_argument('--prefetch', type=int, nargs='+', default=[2, 3, 4])
    ap.add_argument('--chunk-rows', type=int, nargs='+', default=[parallel.CHUNK_ROWS],
                    help="loader read/copy chunk sizes to try (parallel.CHUNK_ROWS)")
    ap.add_argument('--read-threads', type=int, nargs='+', default=[parallel.READ_THREADS],
                    help="loader read threads to try (parallel.READ_THREADS)")
    ap.add_argument('--threads', type=int, nargs='+', default=[1, 2, 4],
                    help="thread counts for the pread measurement")
    ap.add_argument('--repeat', type=int, default=3)
    ap.add_argument('--json', default=None, help="also write the JSON result to this file")
    args = ap.parse_args()

    dev = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available()
                       else ('cpu' if args.device == 'auto' else args.device))
    cuda = dev.type == 'cuda'
    n_files = args.files or (40 if cuda else 8)
    rows = args.rows or (256 if cuda else 64)
    n = args.batches or 3 * n_files
    folder = args.dir or os.path.join(tempfile.gettempdir(), f'proc_load_bench_{n_files}x{rows}')
    label = torch.cuda.get_device_name(dev) if cuda else f'CPU ({os.cpu_count()} cores)'
    print(f"bench_loader: {label}; {n_files} files x {rows} images in {folder}; {n} batches "
          f"({n * rows * ROW_BYTES / 1e9:.1f} GB) per measurement, best of {args.repeat}",
          flush=True)

    t = time.perf_counter()
    files = make_files(folder, n_files, rows)
    print(f"  files ready in {time.perf_counter() - t:.1f} s", flush=True)
    reqs = [(files[i % n_files], 0, rows) for i in range(n)]
    host = (torch.empty((rows,) + IMAGE_SHAPE, dtype=torch.uint8, pin_memory=cuda)
            if cuda else torch.empty((rows,) + IMAGE_SHAPE, dtype=torch.uint8))
    host_np = host.numpy()
    for p in files:                       # page cache
        read_rows(p, 0, rows, out=host_np)

    results = []

    def add(name, ips, **extra):
        results.append(dict(name=name, images_per_s=round(ips), GB_per_s=round(
            ips * ROW_BYTES / 1e9, 2), **extra))
        print(f"  {name:<28} {ips:>10,.0f} img/s  {ips * ROW_BYTES / 1e9:6.2f} GB/s", flush=True)

    def f_read():
        for p, lo, hi in reqs:
            read_rows(p, lo, hi, out=host_np)
    add('read_rows -> host', timed(f_read, n, rows, args.repeat))

    offsets = {p: raw_offset(p) for p in files}
    if all(v is not None for v in offsets.values()):
        check = np.empty_like(host_np)
        fd = os.open(files[0], os.O_RDONLY)
        os.preadv(fd, [memoryview(check).cast('B')], offsets[files[0]])
        os.close(fd)
        read_rows(files[0], 0, rows, out=host_np)
        assert np.array_equal(check, host_np), "raw offset read disagrees with read_rows"
        for k in args.threads:
            pool = ThreadPoolExecutor(k)
            step = -(-rows // k)

            def part(fd, off, a, b):
                mv = memoryview(host_np[a:b]).cast('B')
                got = os.preadv(fd, [mv], off + a * ROW_BYTES)
                assert got == len(mv)

            def f_pread():
                for p, lo, hi in reqs:
                    fd = os.open(p, os.O_RDONLY)
                    try:
                        list(pool.map(lambda j: part(fd, offsets[p], j * step,
                                                     min(rows, (j + 1) * step)), range(k)))
                    finally:
                        os.close(fd)
            add(f'pread -> host ({k} thr)', timed(f_pread, n, rows, args.repeat))
            pool.shutdown()

    if cuda:
        gbuf = torch.empty((rows,) + IMAGE_SHAPE, dtype=torch.uint8, device=dev)

        def f_h2d():
            for _ in range(n):
                gbuf.copy_(host, non_blocking=True)
            torch.cuda.synchronize(dev)
        add('H2D copy (pinned)', timed(f_h2d, n, rows, args.repeat))

    acc = torch.zeros((), dtype=torch.int64, device=dev)

    def consume(it):
        for x in it:
            acc.add_(x[-1, -1, -1, -1])   # one tiny op reading the delivered buffer
        if cuda:
            torch.cuda.synchronize(dev)

    serial = SerialLoader(dev)
    add('SerialLoader (para_load off)', timed(lambda: consume(serial.iterate(reqs)), n, rows,
                                              args.repeat))
    serial.close()

    best_parallel = 0.0
    for chunk in args.chunk_rows:
        for threads in args.read_threads:
            for pf in args.prefetch:
                with ParallelLoader(dev, max_rows=rows, prefetch=pf, chunk_rows=chunk,
                                    read_threads=threads) as loader:
                    consume(loader.iterate(reqs[:2 * pf]))     # warm-up: loader fully started
                    ips = timed(lambda: consume(loader.iterate(reqs)), n, rows, args.repeat)
                best_parallel = max(best_parallel, ips)
                add(f'ParallelLoader p={pf} c={chunk} t={threads}', ips, prefetch=pf,
                    chunk_rows=chunk, read_threads=threads)

    summary = dict(device=label, device_type=dev.type, files=n_files, rows=rows, batches=n,
                   host=platform.node(), cpus=os.cpu_count(), torch=torch.__version__,
                   target_images_per_s=TARGET if cuda else None,
                   best_parallel_images_per_s=round(best_parallel),
                   meets_target=(best_parallel >= TARGET) if cuda else None,
                   results=results)
    print(f"best ParallelLoader: {best_parallel:,.0f} img/s"
          + (f" (target {TARGET:,}: {'met' if best_parallel >= TARGET else 'NOT met'})"
             if cuda else " (CPU run: no target)"))
    print('BENCH_JSON ' + json.dumps(summary), flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(summary, f, indent=1)


if __name__ == '__main__':
    main()
