"""Device experiment (issue 8): where the compiled bf16 training step spends its time, and
variants of it. The variants patch the functions that train_loop compiles; after the second
session several of them are the code itself (see BENCHMARKS.md, notes), so they now measure
the same thing twice. Run from the repository root on a GPU:

    python3 bench_results/profile_step.py base! lrnmm patchesB      # "!" adds a kernel table
"""
import os
import sys
import time

import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch.nn.functional as F

import alex_net
import layers
import train_loop
from alex_net import AlexNet, N_WEIGHTS
from data import dropout_masks
from sgd import sgd_step_

import os
B = int(os.environ.get('B', 256))
dev = torch.device(os.environ.get('DEV', 'cuda:0'))
torch.backends.cudnn.benchmark = True
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True


def lrn_fp32_slices(x):
    """The same LRN formula, the window sum over five channel-shifted slices, in float32."""
    xf = x.float()
    sq = xf * xf
    C = x.shape[1]
    p = F.pad(sq, (0, 0, 0, 0, 2, 2))
    s = p[:, 0:C] + p[:, 1:C + 1] + p[:, 2:C + 2] + p[:, 3:C + 3] + p[:, 4:C + 4]
    return (xf / (layers.LRN_K + layers.LRN_ALPHA * s) ** layers.LRN_BETA).to(x.dtype)


def conv_relu_pad4(x, W, b, stride, pad, groups):
    if x.shape[1] == 3:
        x = F.pad(x, (0, 0, 0, 0, 0, 1)).contiguous(memory_format=torch.channels_last)
        W = F.pad(W, (0, 0, 0, 0, 0, 1))
    return orig['conv_relu'](x, W, b, stride, pad, groups)


orig = dict(conv_relu=alex_net.conv_relu, lrn=alex_net.lrn)


def setup(variant):
    torch._dynamo.reset()
    alex_net.conv_relu = orig['conv_relu']
    alex_net.lrn = orig['lrn']
    mode = None
    for v in variant.split('+'):
        if v == 'lrnslice':
            alex_net.lrn = lrn_fp32_slices
        elif v == 'pad4':
            alex_net.conv_relu = conv_relu_pad4
        elif v == 'ro':
            mode = 'reduce-overhead'
        elif v == 'mat':
            mode = 'max-autotune-no-cudagraphs'
        elif v in ('base', 'eager'):
            pass
        else:
            raise SystemExit(f"unknown variant {v}")
    f, c, u = train_loop.augmented_features, train_loop.classifier_loss, sgd_step_
    if 'eager' in variant:
        return f, c, u
    return torch.compile(f, mode=mode), torch.compile(c, mode=mode), torch.compile(u)


def run(variant, iters=40, warmup=12, profile=False, update=True):
    t_c = time.time()
    feat_fn, cls_fn, update_fn = setup(variant)
    net = AlexNet(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    images = torch.randint(0, 256, (B, 256, 256, 3), dtype=torch.uint8, device=dev, generator=g)
    mean = torch.rand(256, 256, 3, device=dev) * 255
    labels = torch.randint(0, 1000, (B,), device=dev)

    def one(step):
        offs = torch.randint(0, 30, (B, 2), device=dev)
        mirr = torch.rand(B, device=dev) < 0.5
        masks = dropout_masks(step, B, 0, B, dev)
        amp = torch.bfloat16 if dev.type == 'cuda' else None
        feats = feat_fn(net.layer_params[:5], images, mean, offs, mirr, amp)
        cut = feats.detach().requires_grad_()
        loss, err = cls_fn(net.layer_params[5:], cut, labels, masks, amp)
        loss.backward()
        feats.backward(cut.grad)
        if update:
            update_fn(net.params, net.grad, net.momentum, 1e-3, N_WEIGHTS, 0.9, 5e-4)
        else:
            net.grad.zero_()
        return loss

    for s in range(warmup):
        one(s)
    torch.cuda.synchronize() if dev.type == 'cuda' else None
    t_compile = time.time() - t_c
    t0 = time.time()
    for s in range(iters):
        loss = one(s)
    float(loss)
    el = time.time() - t0
    ips = iters * B / el
    print(f"{variant:32s} update={update!s:5s} {ips:9.0f} img/s  {1000 * el / iters:7.2f} ms/step"
          f"  (setup+warmup {t_compile:.0f} s, loss {float(loss):.3f})", flush=True)
    if profile:
        from torch.profiler import profile as prof, ProfilerActivity
        with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
            for s in range(5):
                one(s)
            torch.cuda.synchronize()
        kernels = [e for e in p.key_averages() if e.self_device_time_total > 0
                   and e.self_cpu_time_total == 0]
        kernels.sort(key=lambda e: -e.self_device_time_total)
        tot = sum(e.self_device_time_total for e in kernels) / 5 / 1000
        print(f"{variant}: GPU kernel time per step {tot:.2f} ms vs wall {1000 * el / iters:.2f} ms")
        for e in kernels[:40]:
            print(f"  {e.self_device_time_total / 5000:7.3f} ms x{e.count // 5:3d}  {e.key[:160]}")
    return ips


if __name__ == '__main__':
    variants = sys.argv[1:] or ['base']
    res = {}
    for v in variants:
        prof_it = v.endswith('!')
        v = v.rstrip('!')
        try:
            res[v] = run(v, profile=prof_it)
        except Exception as e:  # keep going: one failing variant must not cost the call
            print(f"{v}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
    print("\nsummary")
    for v, ips in res.items():
        print(f"  {v:32s} {ips:9.0f} img/s")
