"""Device experiment: where the compiled training step (bf16 unless precision=... says
otherwise) spends its time, and variants of it. The variants patch the functions that the
step compiles; those that became the code were taken out of this script (BENCHMARKS.md has
their figures). Each variant times step.TrainStep, the training loop's own step, on one batch
already on the device (the configured data give the mean; the labels are random). Run from
the repository root on a GPU:

    python3 bench/profile_step.py 'base!' patches torchpool   # "!" adds a kernel table
    B=2 DEV=cpu python3 bench/profile_step.py eager spec_toy.yaml   # a CPU check of the script

Words with "=" or ending in .yaml are configuration (key=value, yaml files), merged over
config.yaml + spec_1gpu.yaml as in train.py; the data they name give the mean
(spec_toy.yaml: the quickstart's toy data, once quickstart.sh has made it).

A variant is parts joined by "+" (base+ro): base (the compiled step as it is), eager (not
compiled), nograph (compiled, without the CUDA graph: its kernel table also names the operator that
launched each kernel), unfused (the max pool's backward pass and the augmentation's crop as PyTorch
compositions, not alexnet_lib/fused_layers.py's kernels), fcinto (the fully connected layers eager,
their backward writing the weights' gradients into net.grad in float32 from the matrix product
itself: fc_grad_into below), nchw (every convolution's input contiguous (B, C, H, W), not
channels-last; inductor makes it channels-last again unless nolayout is given too), lrnslice (LRN
as a sum of five channel-shifted slices, in float32), patches (conv1 as one matrix product of its
patches), torchpool (inductor's own max pool), ro (mode=reduce-overhead), mat
(mode=max-autotune-no-cudagraphs), blim0 (cuDNN's benchmark times every algorithm, not the ten
its heuristics rank first: torch.backends.cudnn.benchmark_limit = 0; the choices of a process
stay cached, so time it in a process of its own), grouped (a 2-group convolution as one cuDNN
call with groups=2, not one call per group), direct1 (conv1 as cuDNN's 11x11/4 convolution of
the 3-channel image, not over blocks of pixels), nolayout (inductor keeps the layouts eager
PyTorch gives, torch._inductor.config.layout_optimization = False; without it inductor makes
every convolution's arguments channels-last, nchw's copies included), cudnngrads (every
convolution's gradients from cuDNN's backward algorithms: layers.FP32_GRADS_BY_FORWARD emptied,
so strict fp32 no longer takes any from forward convolutions). Environment: B the batch
(default 256), DEV the device (default cuda:0).
"""
import argparse
import os
import sys
import time
import types

VARIANT_PARTS = ('base', 'eager', 'nograph', 'unfused', 'fcinto', 'nchw', 'lrnslice', 'patches',
                 'torchpool', 'ro', 'mat', 'blim0', 'grouped', 'direct1',
                 'nolayout', 'cudnngrads')

B = int(os.environ.get('B', 256))
dev = None     # the torch.device, set by main
orig = {}      # the functions the variants patch, as the code has them


def lrn_fp32_slices(x):
    """The same LRN formula, the window sum over five channel-shifted slices, in float32."""
    import torch.nn.functional as F
    import layers
    xf = x.float()
    sq = xf * xf
    C = x.shape[1]
    p = F.pad(sq, (0, 0, 0, 0, 2, 2))
    s = p[:, 0:C] + p[:, 1:C + 1] + p[:, 2:C + 2] + p[:, 3:C + 3] + p[:, 4:C + 4]
    return (xf / (layers.LRN_K + layers.LRN_ALPHA * s) ** layers.LRN_BETA).to(x.dtype)


def conv_by_patches(x, W, stride):
    """conv1 as one matrix product of its 11x11 patches in (row, column, channel) order (the
    code of the second session, before conv_by_blocks)."""
    O, C, kh, kw = W.shape
    B = x.shape[0]
    p = x.unfold(2, kh, stride).unfold(3, kw, stride)
    Ho, Wo = p.shape[2], p.shape[3]
    patches = p.permute(0, 2, 3, 4, 5, 1).reshape(B * Ho * Wo, kh * kw * C)
    y = patches @ W.permute(0, 2, 3, 1).reshape(O, kh * kw * C).t()
    return y.view(B, Ho, Wo, O).permute(0, 3, 1, 2)


def conv_pool_relu_grouped(x, W, b, stride, pad, groups, pool):
    """layers.conv_pool_relu with a 2-group convolution as one call (groups=2)."""
    import torch.nn.functional as F
    import layers
    if groups == 1:
        return orig['conv_pool_relu'](x, W, b, stride, pad, groups, pool)
    y = F.conv2d(x, W, stride=stride, padding=pad, groups=groups)
    if pool:
        y = layers.max_pool(y)
    return F.relu(y + b.to(y.dtype)[:, None, None])


def fc_grad_into():
    """The 'fcinto' variant's classifier_loss and WeightGradInto: the fully connected layers as
    an autograd Function, run eagerly, whose backward has the matrix product write W's and b's
    gradients into W.grad and b.grad (views of net.grad) in float32 itself (cuBLAS: bf16
    products summed and written in float32), where the step casts the bf16 gradient autograd
    made and copies it (WeightGradInto)."""
    import torch
    import torch.nn.functional as F
    import alex_net

    class FcGradInto(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, W, b, dtype):
            dtype = dtype or W.dtype
            xc, Wc = x.to(dtype), W.to(dtype)
            ctx.save_for_backward(xc, Wc)
            ctx.grads = W.grad, b.grad
            return torch.addmm(b.to(dtype), xc, Wc)

        @staticmethod
        def backward(ctx, gy):
            xc, Wc = ctx.saved_tensors
            gW, gb = ctx.grads
            if gy.dtype == gW.dtype:
                torch.mm(xc.t(), gy, out=gW)
            elif gy.is_cuda:
                torch.mm(xc.t(), gy, out_dtype=gW.dtype, out=gW)
            else:                # (out_dtype is CUDA's): the same products, in float32
                torch.mm(xc.t().to(gW.dtype), gy.to(gW.dtype), out=gW)
            torch.sum(gy, 0, dtype=gb.dtype, out=gb)
            return gy.mm(Wc.t()), None, None, None

    @torch.compiler.disable
    def classifier_loss(fc_params, feats, labels, masks, amp_dtype):
        x = feats
        for i, (W, b) in enumerate(fc_params, alex_net.FIRST_FC):
            x = FcGradInto.apply(x, W, b, amp_dtype)
            if alex_net.LAYERS[i].relu:
                x = torch.relu(x)
            if alex_net.LAYERS[i].dropout:
                x = alex_net.dropout(x, masks[alex_net.DROPOUT_LAYERS.index(i)])
        loss = F.cross_entropy(x.float(), labels)
        return loss, (x.argmax(1) != labels).sum()

    class AsItIs:
        apply = staticmethod(lambda W, dtype: W)

    return classifier_loss, AsItIs


CONFIG_WORDS = []    # key=value and yaml files of the command line


def setup(variant):
    """Apply the variant's patches; returns a TrainStep built on them."""
    import torch
    import torch.nn.functional as F
    import alex_net
    import layers
    from alexnet_lib.config import load_config
    from alexnet_lib import fused_layers
    from alexnet_lib import step as step_module
    if not orig:
        orig.update(lrn=alex_net.lrn, conv_by_blocks=layers.conv_by_blocks,
                    grads_by_forward=layers.FP32_GRADS_BY_FORWARD,
                    conv_pool_relu=layers.conv_pool_relu,
                    max_pool=layers.max_pool, fused=fused_layers.available,
                    classifier_loss=step_module.classifier_loss,
                    weight_grad_into=step_module.WeightGradInto)
    torch._dynamo.reset()
    alex_net.lrn = orig['lrn']
    layers.conv_by_blocks, layers.max_pool = orig['conv_by_blocks'], orig['max_pool']
    layers.conv_pool_relu = alex_net.conv_pool_relu = orig['conv_pool_relu']
    layers.F = F
    layers.FP32_GRADS_BY_FORWARD = orig['grads_by_forward']
    fused_layers.available = orig['fused']
    step_module.classifier_loss = orig['classifier_loss']
    step_module.WeightGradInto = orig['weight_grad_into']
    mode = None
    for v in variant.split('+'):
        if v == 'lrnslice':
            alex_net.lrn = lrn_fp32_slices
        elif v == 'unfused':     # the pool's backward and the crop as PyTorch compositions
            fused_layers.available = lambda device: False
        elif v == 'patches':
            layers.conv_by_blocks = conv_by_patches
        elif v == 'direct1':
            layers.conv_by_blocks = lambda x, W, stride: F.conv2d(x, W, stride=stride)
        elif v == 'torchpool':   # inductor's own max pool (recomputes windows in the backward)
            layers.max_pool = lambda x: F.max_pool2d(x, 3, 2)
        elif v == 'grouped':
            layers.conv_pool_relu = alex_net.conv_pool_relu = conv_pool_relu_grouped
        elif v == 'fcinto':
            step_module.classifier_loss, step_module.WeightGradInto = fc_grad_into()
        elif v == 'ro':
            mode = 'reduce-overhead'
        elif v == 'mat':
            mode = 'max-autotune-no-cudagraphs'
        elif v == 'cudnngrads':
            layers.FP32_GRADS_BY_FORWARD = {}
        elif v not in ('base', 'eager', 'nograph', 'blim0', 'nolayout', 'nchw'):
            raise SystemExit(f"unknown variant {v}")
    parts = variant.split('+')
    if 'nchw' in parts:   # every convolution's input contiguous (B, C, H, W)
        layers.F = types.SimpleNamespace(**{**vars(F), 'conv2d': lambda x, W, **kw: F.conv2d(
            x.contiguous(), W, **kw)})
    # the real step (step.TrainStep, as the training loop builds it) on the configured mean
    cfg = load_config('spec_1gpu.yaml', CONFIG_WORDS + [f'gpu={dev}', f'batch_size={B}'])
    from alex_net import AlexNet
    from alexnet_lib.config import require_data
    from alexnet_lib.data import mean_image_hwc
    from alexnet_lib.step import TrainStep, UpdateRule, configure_device, precision_of
    require_data(cfg, ('mean_file',))
    precision = precision_of(cfg['precision'], dev)
    configure_device(dev, precision)
    import torch._inductor.config as inductor_config
    inductor_config.layout_optimization = 'nolayout' not in parts
    if 'blim0' in parts:
        torch.backends.cudnn.benchmark_limit = 0
    compiled = 'eager' not in variant
    net = AlexNet(dev, n_classes=cfg['n_classes'])
    graphed = compiled and mode is None and 'nograph' not in variant
    return TrainStep(net, mean_image_hwc(cfg['mean_file'], dev),
                     UpdateRule(cfg['momentum'], cfg['weight_decay']), precision=precision,
                     compiled=compiled, graphed=graphed, compile_mode=mode)


def run(variant, iters=40, warmup=12, profile=False):
    import torch
    from alexnet_lib.data import Batch, dropout_masks
    t_c = time.time()
    train_step = setup(variant)
    train_step.set_lr(1e-3)
    g = torch.Generator(device=dev).manual_seed(0)
    images = torch.randint(0, 256, (B, 256, 256, 3), dtype=torch.uint8, device=dev, generator=g)
    labels = torch.randint(0, train_step.net.arch.n_classes, (B,), device=dev)

    def one(step):
        offs = torch.randint(0, 30, (B, 2), device=dev)
        mirr = torch.rand(B, device=dev) < 0.5
        masks = dropout_masks(step, B, 0, B, dev)
        return train_step(Batch(images, labels, offs, mirr, masks), step)[0]

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
    print(f"{variant:32s} {ips:9.0f} img/s  {1000 * el / iters:7.2f} ms/step"
          f"  (setup+warmup {t_compile:.0f} s, loss {float(loss):.3f})", flush=True)
    if profile:
        from torch.profiler import profile as prof, ProfilerActivity
        with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU],
                  record_shapes=True, with_stack=True) as p:
            for s in range(5):
                one(s)
            torch.cuda.synchronize()
        kernels = [e for e in p.key_averages() if e.self_device_time_total > 0
                   and e.self_cpu_time_total == 0]
        kernels.sort(key=lambda e: -e.self_device_time_total)
        tot = sum(e.self_device_time_total for e in kernels) / 5 / 1000
        print(f"{variant}: GPU kernel time per step {tot:.2f} ms "
              f"vs wall {1000 * el / iters:.2f} ms")
        for e in kernels[:40]:
            print(f"  {e.self_device_time_total / 5000:7.3f} ms x{e.count // 5:3d}  {e.key[:160]}")
        # which operators launched the copies and additions outside the compiled graphs
        ops = [e for e in p.key_averages(group_by_input_shape=True)
               if e.key in ('aten::copy_', 'aten::add_', 'aten::to', 'aten::_to_copy',
                            'aten::clone', 'aten::contiguous') and e.device_time_total > 0]
        ops.sort(key=lambda e: -e.device_time_total)
        for e in ops[:12]:
            print(f"  op {e.device_time_total / 5000:7.3f} ms x{e.count // 5:3d}  {e.key} "
                  f"{str(e.input_shapes)[:120]}")
        kernel_sources(p, 5)
    return ips


def kernel_sources(p, steps, top=40):
    """Which operator launched each GPU kernel (with its callers and the line of ours above
    it), device ms per step: a graphed step's kernels have none, so run it with nograph."""
    rows = {}
    for e in p.events():
        if not getattr(e, 'kernels', None):
            continue
        chain, q = [], e
        while q is not None and len(chain) < 4:
            chain.append(q.name)
            q = q.cpu_parent
        ours = [f for f in (e.stack or []) if 'alexnet_lib' in f or 'alex_net.py' in f
                or 'layers.py' in f]
        where = ours[0].rsplit('/', 1)[-1] if ours else ''
        for k in e.kernels:
            key = (k.name[:48], ' < '.join(chain)[:100], str(e.input_shapes)[:80], where)
            t, n = rows.get(key, (0.0, 0))
            rows[key] = (t + k.duration, n + 1)
    if not rows:
        return
    print("kernels by the operator that launched them (ms per step, count per step)")
    for key, (t, n) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {t / steps / 1000:7.3f} x{n / steps:4.1f}  {key[0]:48s} | {key[1]} | {key[2]}"
              f" | {key[3]}")


def check_variant(text):
    parts = text.rstrip('!').split('+')
    bad = [p for p in parts if p not in VARIANT_PARTS]
    if bad:
        return (f"unknown variant part {bad[0]!r} in {text!r}: use "
                f"{', '.join(VARIANT_PARTS)}, joined by '+'")
    return None


def main(argv=None):
    global dev
    ap = argparse.ArgumentParser(prog='bench/profile_step.py', description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('words', nargs='*', metavar='VARIANT[!] | key=value | FILE.yaml',
                    help="variants to time, in turn (default: base; a trailing '!' adds the "
                         "table of GPU kernels), and configuration")
    args = ap.parse_args(argv)
    variants = []
    for w in args.words:
        if '=' in w or w.endswith(('.yaml', '.yml')):
            CONFIG_WORDS.append(w)
        elif check_variant(w):
            ap.error(check_variant(w))
        else:
            variants.append(w)
    import torch
    dev = torch.device(os.environ.get('DEV', 'cuda:0'))
    res = {}
    for v in variants or ['base']:
        prof_it = v.endswith('!')
        v = v.rstrip('!')
        try:
            res[v] = run(v, profile=prof_it)
        except Exception as e:  # keep going: one failing variant must not cost the call
            print(f"{v}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
    print("\nsummary")
    for v, ips in res.items():
        print(f"  {v:32s} {ips:9.0f} img/s")


if __name__ == '__main__':
    sys.exit(main())
