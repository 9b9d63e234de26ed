"""Device experiment: the update of the training step alone (weights, momentum and gradients of
this network, float32 flat buffers), in the ways the step could run it, timed with CUDA events
and each checked against the rule in float64. Run from the repository root on a GPU:

    python3 bench/bench_update.py [--iters 200] [--json OUT.json]
    DEV=cpu python3 bench/bench_update.py --iters 3     # a CPU check of the script

Ways: 'compiled, rate a number' (a compiled step with the rate as a Python float: one
compilation and one CUDA graph per rate), 'compiled, rate a tensor' (torch.compile of
sgd.sgd_step_ with the 0-d rate tensor), 'fused' (fused_update.sgd_step_, the Triton kernel the
step uses on a GPU, then with other launches: 'fused BLOCK x WARPS'), 'eager'.
"""
import argparse
import json
import os
import time

import torch

import alex_net
from alexnet_lib import fused_update
from alexnet_lib.sgd import sgd_step_

MU, WD, LR = 0.9, 0.0005, 0.01


def reference(params, grad, momentum, n_weights):
    """One momentum step of the rule in float64 (sgd.py's docstring)."""
    p, g, v = (x.double() for x in (params, grad, momentum))
    g = g.clone()
    g[:n_weights] += WD * p[:n_weights]
    lr = torch.full_like(p, LR)
    lr[n_weights:] *= 2
    v = MU * v - lr * g
    return p + v, v


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--iters', type=int, default=200, help='timed updates per way (default 200)')
    ap.add_argument('--json', help='write the figures to this JSON file')
    args = ap.parse_args()
    dev = torch.device(os.environ.get('DEV', 'cuda:0'))
    arch = alex_net.ORIGINAL
    n, n_w = arch.n_params, arch.n_weights
    gen = torch.Generator(device='cpu').manual_seed(0)
    start = [torch.randn(n, generator=gen) * s for s in (0.01, 0.001, 0.001)]
    want_p, want_v = reference(*start, n_w)
    lr_tensor = torch.tensor(LR, dtype=torch.float32, device=dev)
    ways = {'eager': lambda p, g, v: sgd_step_(p, g, v, lr_tensor, n_w, MU, WD),
            'compiled, rate a tensor': (lambda f: lambda p, g, v: f(p, g, v, lr_tensor, n_w, MU,
                                                                    WD))(torch.compile(sgd_step_)),
            'compiled, rate a number': (lambda f: lambda p, g, v: f(p, g, v, LR, n_w, MU, WD))(
                torch.compile(sgd_step_))}
    if fused_update.available(dev):
        ways['fused'] = lambda p, g, v: fused_update.sgd_step_(p, g, v, lr_tensor, n_w, MU, WD)
        for block in (1024, 2048, 4096, 8192):     # the launch: elements per program, warps
            for warps in (4, 8, 16):
                ways[f'fused {block} x {warps}'] = (lambda b, w: lambda p, g, v: (
                    fused_update.sgd_step_(p, g, v, lr_tensor, n_w, MU, WD, block=b,
                                           num_warps=w)))(block, warps)
    results = {'device': torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu',
               'torch': torch.__version__, 'n_params': n, 'iters': args.iters, 'ways': {}}
    scale = (want_p - start[0].double()).abs().max().item()
    for name, way in ways.items():
        p, g, v = (x.to(dev, copy=True) for x in start)
        way(p, g, v)                       # one step from the start: the check
        err_p = (p.double().cpu() - want_p).abs().max().item() / scale
        err_v = (v.double().cpu() - want_v).abs().max().item() / scale
        zeroed = bool((g == 0).all())
        for _ in range(5):
            g.normal_()
            way(p, g, v)
        if dev.type == 'cuda':
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(dev)
            begin.record()
            for _ in range(args.iters):
                way(p, g, v)
            end.record()
            torch.cuda.synchronize(dev)
            ms = begin.elapsed_time(end) / args.iters
        else:
            t0 = time.perf_counter()
            for _ in range(args.iters):
                way(p, g, v)
            ms = (time.perf_counter() - t0) * 1e3 / args.iters
        gbps = 6 * 4 * n / (ms * 1e-3) / 1e9       # three buffers read, three written
        results['ways'][name] = {'ms': ms, 'GB_per_s': gbps, 'max_error_weights': err_p,
                                 'max_error_momentum': err_v, 'gradients_zeroed': zeroed}
        print(f"{name:26s} {ms:7.3f} ms  {gbps:6.0f} GB/s  error (of the largest change) "
              f"weights {err_p:.1e} momentum {err_v:.1e}  gradients zeroed {zeroed}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
