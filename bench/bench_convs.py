"""Device experiment: each convolution of the network alone, in its three passes (forward, input
gradient, weight gradient), as cuDNN runs them and as forward convolutions (for stride 1: the
input gradient is the output gradient convolved with the flipped, in/out-swapped kernel; the
weight gradient is the input, batch and channels swapped, convolved with the output gradient as
the kernel), with channels-last and NCHW tensors. Timed with CUDA events after cuDNN's benchmark
has chosen; the table says, layer by layer, which way is faster. Run from the repository root:

    python3 bench/bench_convs.py [--precision fp32] [--iters 20] [--json OUT.json]
    B=2 DEV=cpu python3 bench/bench_convs.py --iters 1     # a CPU check of the script

The convolutions are those the network calls (recorded from alex_net.features on meta tensors:
conv1 over pixel blocks, one call per group), at batch B (default 256). A pass a layer does not
need (conv1's input gradient) is left out.
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import alex_net
from layers import input_grad_by_forward, weight_grad_by_forward
from alexnet_lib.step import configure_device

B = int(os.environ.get('B', 256))
DTYPES = {'fp32': torch.float32, 'tf32': torch.float32, 'bf16': torch.bfloat16}


class RecordConvs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            x, W = args[:2]
            stride = kwargs.get('stride', args[3] if len(args) > 3 else 1)
            pad = kwargs.get('padding', args[4] if len(args) > 4 else 0)
            self.calls.append((tuple(x.shape[1:]), tuple(W.shape), stride, pad))
        return func(*args, **kwargs)


def network_convs():
    """[[name, calls, x shape without the batch, W shape, stride, pad, needs input grad]]: the
    convolutions alex_net.features calls, a layer's groups (the same shapes) as one row."""
    convs = alex_net.LAYERS[:alex_net.FIRST_FC]
    params = [(torch.empty(l.n_out, l.n_in // l.groups, l.kernel, l.kernel, device='meta'),
               torch.empty(l.n_out, device='meta')) for l in convs]
    rec = RecordConvs()
    with rec:
        alex_net.features(params, torch.empty(1, 3, 227, 227, device='meta'))
    assert len(rec.calls) == sum(l.groups for l in convs), rec.calls
    rows, i = [], 0
    for n, l in enumerate(convs):
        assert len(set(rec.calls[i:i + l.groups])) == 1, rec.calls[i:i + l.groups]
        rows.append([f'conv{n + 1}', l.groups, *rec.calls[i], n > 0])
        i += l.groups
    return rows


def timed(fn, iters, dev):
    fn()                     # cuDNN's benchmark chooses here
    fn()
    if dev.type != 'cuda':
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(dev)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize(dev)
    return start.elapsed_time(end) / iters


def difference(result, reference):
    """Largest difference relative to the largest element, of one pass's two ways."""
    return ((result.float() - reference.float()).abs().max()
            / reference.float().abs().max()).item()


def passes(x, W, gy, stride, pad, need_dgrad):
    """name -> a function running that pass, returning its result."""
    s, p = [stride, stride], [pad, pad]

    def backward(which):     # 0: the input's gradient, 1: the kernel's
        mask = [which == 0, which == 1, False]
        return lambda: torch.ops.aten.convolution_backward(gy, x, W, None, s, p, [1, 1], False,
                                                           [0, 0], 1, mask)[which]
    ways = {'forward': lambda: F.conv2d(x, W, stride=stride, padding=pad),
            'wgrad': backward(1)}
    if stride == 1:
        ways['wgrad as forward'] = lambda: weight_grad_by_forward(x, gy, pad)
    if need_dgrad:
        ways['dgrad'] = backward(0)
        if stride == 1:
            ways['dgrad as forward'] = lambda: input_grad_by_forward(gy, W, pad)
    return ways


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--precision', choices=sorted(DTYPES), default='fp32',
                    help='fp32 (strict: no TF32), tf32, or bf16 tensors (default fp32)')
    ap.add_argument('--iters', type=int, default=20, help='timed calls per pass (default 20)')
    ap.add_argument('--json', help='write the figures here')
    args = ap.parse_args()
    dev = torch.device(os.environ.get('DEV', 'cuda:0'))
    configure_device(dev, args.precision)
    dtype = DTYPES[args.precision]
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for name, count, xs, Ws, stride, pad, need_dgrad in network_convs():
        for fmt_name, fmt in (('NHWC', torch.channels_last), ('NCHW', torch.contiguous_format)):
            def rand(*shape):
                return torch.randn(shape, device=dev, generator=gen).to(dtype).contiguous(
                    memory_format=fmt)
            x, W = rand(B, *xs), rand(*Ws)
            side = (xs[-1] + 2 * pad - Ws[-1]) // stride + 1
            gy = rand(B, Ws[0], side, side)
            ways = passes(x, W, gy, stride, pad, need_dgrad)
            for pass_name, fn in ways.items():
                ms = timed(fn, args.iters, dev) * count
                err = difference(fn(), ways[pass_name.split()[0]]())
                rows.append({'layer': name, 'calls': count, 'x': list(xs), 'W': list(Ws),
                             'layout': fmt_name, 'pass': pass_name, 'ms': ms,
                             'relative_difference': err})
                print(f"{name} x{count} {fmt_name} {pass_name:17s} {ms:7.3f} ms"
                      + (f"  (differs from cuDNN's by {err:.1e})" if ' as ' in pass_name else ''),
                      flush=True)
            del x, W, gy
    summary = summarize(rows)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'precision': args.precision, 'batch': B, 'device': str(dev),
                       'rows': rows, 'summary': summary}, f, indent=1)


def summarize(rows):
    """Per layer and layout: cuDNN's own passes against the faster of each pair."""
    by = {}
    for r in rows:
        by.setdefault((r['layer'], r['layout']), {})[r['pass']] = r['ms']
    summary, totals = [], {}
    print(f"\n{'layer':6s} {'layout':6s} {'cuDNN passes':>12s} {'best of each':>12s}  choices")
    for (layer, layout), ms in by.items():
        own = ms['forward'] + ms['wgrad'] + ms.get('dgrad', 0.0)
        choice, best = [], ms['forward']
        for p in ('dgrad', 'wgrad'):
            if p not in ms:
                continue
            alt = ms.get(f'{p} as forward', float('inf'))
            best += min(ms[p], alt)
            choice.append(f'{p} as forward' if alt < ms[p] else p)
        summary.append({'layer': layer, 'layout': layout, 'cudnn_ms': own, 'best_ms': best,
                        'choices': choice})
        tot = totals.setdefault(layout, [0.0, 0.0])
        tot[0] += own
        tot[1] += best
        print(f"{layer:6s} {layout:6s} {own:12.3f} {best:12.3f}  {', '.join(choice)}")
    for layout, (own, best) in totals.items():
        print(f"{'all':6s} {layout:6s} {own:12.3f} {best:12.3f}")
    return summary


if __name__ == '__main__':
    main()
