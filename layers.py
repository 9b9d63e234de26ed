"""The layers of the original AlexNet (docs/design.md), as functions of their parameters.

Each function is the original layer's math, written for PyTorch tensors in NCHW order:
convolution + bias (+ ReLU), 3x3/2 max pooling, the pylearn2 cross-channel LRN, the original
dropout convention, the fully connected layer. The original's parameter layouts differ from
PyTorch's; ``conv_weight_from_original`` / ``conv_weight_to_original`` convert between them.

    x = lrn(conv_pool_relu(x, W, b, stride=4, pad=0, groups=1, pool=True))
"""
import numpy as np
import torch
import torch.nn.functional as F

from alexnet_lib import fused_layers

LRN_N, LRN_K, LRN_ALPHA, LRN_BETA = 5, 2.0, 1e-4, 0.75  # pylearn2 defaults; alpha not divided by n
POOL_SIZE, POOL_STRIDE = 3, 2
FEW_CHANNELS = 4   # a convolution of at most this many input channels runs over pixel blocks
DROPOUT_KEEP = 0.5


def conv_pool_relu(x, W, b, stride, pad, groups, pool):
    """max_pool(relu(conv(x, W) + b)) -- the original layer's order -- computed as
    relu(max_pool(conv(x, W)) + b): adding a per-channel bias and ReLU are monotonic, so they
    commute with a max, bit for bit (rounding is monotonic too); after pooling they touch a
    quarter of the elements, and the pool's backward no longer passes through ReLU's mask on
    the full-size tensor. Without pool it is relu(conv(x, W) + b). W is PyTorch's (out,
    in/groups, kh, kw) cross-correlation layout; for groups=2 the first half of the input
    channels feeds the first half of the outputs. Each group runs (and is pooled) on its own,
    as the original's two columns did: cuDNN's grouped channels-last path slices and pads
    channels in extra kernels (BENCHMARKS.md has the measurement)."""
    if x.shape[1] <= FEW_CHANNELS and groups == 1 and pad == 0:
        ys = [conv_by_blocks(x, W, stride)]
    else:
        # a group's channels are a strided slice: made dense (channels-last) here, the copy
        # fuses into the kernel that makes x, where cuDNN would copy it again on its own
        xs = x.chunk(groups, 1) if groups == 1 else [
            xg.contiguous(memory_format=torch.channels_last) for xg in x.chunk(groups, 1)]
        ys = [conv2d(xg, Wg, stride, pad) for xg, Wg in zip(xs, W.chunk(groups, 0))]
    if pool:
        ys = [max_pool(y) for y in ys]
    y = ys[0] if len(ys) == 1 else torch.cat(ys, 1)
    return F.relu(y + b.to(y.dtype)[:, None, None])


def conv_by_blocks(x, W, stride):
    """conv(x, W) at stride s, for conv1's few input channels, as a stride-1 convolution over
    s x s blocks of pixels ("space to depth"): the image (B, C, H, W) becomes (B, s*s*C, H/s,
    W/s), each block's pixels in (row, column, channel) order as channels, and the k x k kernel
    a ceil(k/s)-square kernel over blocks, zero where the original kernel ends (conv1: 11x11/4
    over 3 channels -> 3x3/1 over 48). The same sums of products: cuDNN pads 3 channels to 8 and
    runs a slow kernel, and a product of the 11x11 patches writes each pixel 7.6 times; compiled,
    the rearrangement is fused with what makes its input. Returns (B, out, Ho, Wo)."""
    O, C, k, _ = W.shape
    B, _, H, Wd = x.shape
    kb = -(-k // stride)                                   # kernel size in blocks
    Ho, Wo = (H - k) // stride + 1, (Wd - k) // stride + 1
    Hb, Wb = Ho + kb - 1, Wo + kb - 1                      # blocks the outputs read
    xh = x.permute(0, 2, 3, 1)[:, :Hb * stride, :Wb * stride]            # (B, H, W, C)
    xh = F.pad(xh, (0, 0, 0, Wb * stride - xh.shape[2], 0, Hb * stride - xh.shape[1]))
    blocks = (xh.reshape(B, Hb, stride, Wb, stride, C).permute(0, 1, 3, 2, 4, 5)
              .reshape(B, Hb, Wb, stride * stride * C).permute(0, 3, 1, 2))
    Wk = F.pad(W, (0, kb * stride - k, 0, kb * stride - k))
    Wk = (Wk.reshape(O, C, kb, stride, kb, stride).permute(0, 3, 5, 1, 2, 4)
          .reshape(O, stride * stride * C, kb, kb))
    return conv2d(blocks, Wk, 1, 0)


# In strict float32 on a GPU, cuDNN's input-gradient algorithms for conv3, conv4 and conv5 are
# slow direct kernels, where the same sums of products as a forward convolution run by FFT in
# about a third of the time (bench/bench_convs.py times each pass both ways, BENCHMARKS.md has the
# figures). The kernel's gradient as a forward convolution is slower for every layer, and so is
# the input's for conv2. A kernel's (out channels, in channels, size) per group -> whether (the
# input's gradient, the kernel's gradient) come from forward convolutions.
FP32_GRADS_BY_FORWARD = {(384, 256, 3): (True, False), (192, 192, 3): (True, False),
                         (128, 192, 3): (True, False)}


def conv2d(x, W, stride, pad):
    """F.conv2d (square kernel, the same padding on every side); in strict float32 on a GPU the
    gradients FP32_GRADS_BY_FORWARD names come from forward convolutions (ConvGradsByForward)."""
    if (stride == 1 and x.is_cuda and x.dtype == torch.float32
            and not torch.is_autocast_enabled('cuda') and not torch.backends.cudnn.allow_tf32):
        by_forward = FP32_GRADS_BY_FORWARD.get(tuple(W.shape[:3]), (False, False))
        if any(by_forward):
            return ConvGradsByForward.apply(x, W, pad, *by_forward)
    return F.conv2d(x, W, stride=stride, padding=pad)


class ConvGradsByForward(torch.autograd.Function):
    """F.conv2d(x, W, padding=pad) at stride 1, whose backward computes the input's gradient
    (dgrad) and/or the kernel's (wgrad) as forward convolutions (input_grad_by_forward,
    weight_grad_by_forward: the same sums of products, so cuDNN chooses among its forward
    algorithms), the other as PyTorch does."""

    @staticmethod
    def forward(ctx, x, W, pad, dgrad=True, wgrad=True):
        ctx.save_for_backward(x, W)
        ctx.pad, ctx.by_forward = pad, (dgrad, wgrad)
        return F.conv2d(x, W, padding=pad)

    @staticmethod
    def backward(ctx, grad_y):
        x, W = ctx.saved_tensors
        pad = ctx.pad
        need = ctx.needs_input_grad[:2]
        by_forward = [n and f for n, f in zip(need, ctx.by_forward)]
        grad_x = grad_W = None
        if by_forward[0]:
            grad_x = input_grad_by_forward(grad_y, W, pad)
        if by_forward[1]:
            grad_W = weight_grad_by_forward(x, grad_y, pad)
        rest = [n and not f for n, f in zip(need, by_forward)]
        if any(rest):
            gx, gW, _ = torch.ops.aten.convolution_backward(
                grad_y, x, W, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, rest + [False])
            grad_x, grad_W = (gx if rest[0] else grad_x), (gW if rest[1] else grad_W)
        return grad_x, grad_W, None, None, None


def input_grad_by_forward(grad_y, W, pad):
    """The input's gradient of F.conv2d(x, W, padding=pad) at stride 1, as a forward
    convolution: the output's gradient with the kernel flipped, in and out swapped."""
    return F.conv2d(grad_y, W.transpose(0, 1).flip(2, 3), padding=W.shape[-1] - 1 - pad)


def weight_grad_by_forward(x, grad_y, pad):
    """The kernel's gradient of F.conv2d(x, W, padding=pad) at stride 1, as a forward
    convolution: the input, batch and channels swapped, with the output's gradient as the
    kernel."""
    return F.conv2d(x.transpose(0, 1), grad_y.transpose(0, 1), padding=pad).transpose(0, 1)


def max_pool(x):
    """3x3 max pooling, stride 2, no padding (55 -> 27 -> 13 -> 6); the gradient goes to the
    first largest element of each window. Compiled, it is MaxPoolByCodes: the backward then
    reads the byte that says where each window's max was (inductor's own pool recomputes every
    window in the backward)."""
    if torch.compiler.is_compiling():
        return MaxPoolByCodes.apply(x)
    return F.max_pool2d(x, POOL_SIZE, POOL_STRIDE)


class MaxPoolByCodes(torch.autograd.Function):
    """F.max_pool2d(x, 3, 2), the forward also keeping, per output, the window position k =
    3*dy + dx (a byte) of its max -- the first one in row-major order, as PyTorch's pool picks,
    and NaN wins as there. Written in channels-last (B, H, W, C) terms, so that compiled the
    forward is a single kernel that keeps the channels-last layout; the backward is one Triton
    kernel on a GPU (alexnet_lib/fused_layers.py), elsewhere the composition below."""

    @staticmethod
    def forward(ctx, x):
        xh = x.permute(0, 2, 3, 1)
        H, Wd = xh.shape[1:3]
        Ho, Wo = (H - POOL_SIZE) // POOL_STRIDE + 1, (Wd - POOL_SIZE) // POOL_STRIDE + 1
        y = code = None
        for k in range(POOL_SIZE * POOL_SIZE):
            dy, dx = divmod(k, POOL_SIZE)
            v = xh[:, dy:dy + POOL_STRIDE * (Ho - 1) + 1:POOL_STRIDE,
                   dx:dx + POOL_STRIDE * (Wo - 1) + 1:POOL_STRIDE]
            if y is None:
                y, code = v, torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
                continue
            take = (v > y) | torch.isnan(v)
            y = torch.where(take, v, y)
            code = torch.where(take, torch.full_like(code, k), code)
        ctx.save_for_backward(code)
        ctx.input_hw = (H, Wd)
        return y.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad_y):
        """Input row 2r gets dy=0 of window row r and dy=2 of window row r-1; row 2r+1 gets
        dy=1 of window row r (the same for columns). So each of the four (row, column) parity
        classes of the input is a sum of shifted, masked copies of grad_y, and the four
        interleave into the input's gradient."""
        code, = ctx.saved_tensors
        H, Wd = ctx.input_hw
        if fused_layers.available(grad_y.device):     # the same sums in one kernel
            return fused_layers.max_pool_backward(dense_nhwc(grad_y), code.contiguous(), H,
                                                Wd).permute(0, 3, 1, 2)
        g = grad_y.permute(0, 2, 3, 1)                        # (B, Ho, Wo, C)
        Ho, Wo = g.shape[1:3]
        zero = torch.zeros((), dtype=g.dtype, device=g.device)
        part = [[torch.where(code == 3 * dy + dx, g, zero) for dx in range(3)] for dy in range(3)]

        def by_parity(a0, a1, a2, dim):
            """Along dim (Ho -> Ho+1): even positions get a0 here and a2 from one before, odd
            positions a1."""
            pad_end = [0, 0] * (3 - dim) + [0, 1]
            pad_start = [0, 0] * (3 - dim) + [1, 0]
            return F.pad(a0, pad_end) + F.pad(a2, pad_start), F.pad(a1, pad_end)

        rows = [by_parity(part[0][dx], part[1][dx], part[2][dx], 1) for dx in range(3)]
        quads = [by_parity(rows[0][py], rows[1][py], rows[2][py], 2) for py in range(2)]
        gx = torch.stack([torch.stack(quads[py], 3) for py in range(2)], 2)  # (B,Ho+1,2,Wo+1,2,C)
        gx = gx.reshape(g.shape[0], 2 * Ho + 2, 2 * Wo + 2, g.shape[3])[:, :H, :Wd]
        # dense, as cuDNN's backward of the convolution below wants it (else it copies)
        return gx.contiguous().permute(0, 3, 1, 2)


def lrn(x):
    """y = x / (k + alpha * sum_{5 adjacent channels} x^2) ^ beta, the window zero-padded at the
    ends. The window sums are one product with a band matrix of ones: compiled, the pooled
    input is then computed once rather than once per channel of the window (and faster than
    torch's local_response_norm, which pads and average-pools)."""
    C = x.shape[1]
    i = torch.arange(C, device=x.device)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))     # bf16 in, float32 inside
    band = ((i[:, None] - i[None, :]).abs() <= LRN_N // 2).to(xf.dtype)
    window_sums = torch.matmul((xf * xf).permute(0, 2, 3, 1), band).permute(0, 3, 1, 2)
    return (xf / (LRN_K + LRN_ALPHA * window_sums) ** LRN_BETA).to(x.dtype)


def dense_nhwc(x):
    """(B, C, H, W) as the dense (B, H, W, C) tensor that fused_layers' kernel reads (no copy
    when x is channels-last already, as in the network)."""
    return x.permute(0, 2, 3, 1).contiguous()


def dropout(x, mask=None):
    """The original convention: training multiplies by a 0/1 keep-mask (p=0.5) without rescaling;
    test time (mask None) scales by the keep probability."""
    return x * DROPOUT_KEEP if mask is None else x * mask


def fc(x, W, b):
    """y = x W + b with W in the original (n_in, n_out) layout."""
    return torch.addmm(b, x, W)


def conv_weight_from_original(W):
    """Original (in, kh, kw, out), true-convolution orientation (cuDNN conv mode, kernels
    flipped) -> PyTorch (out, in, kh, kw) cross-correlation."""
    return np.ascontiguousarray(np.transpose(W, (3, 0, 1, 2))[:, :, ::-1, ::-1])


def conv_weight_to_original(W):
    """Inverse of conv_weight_from_original."""
    return np.ascontiguousarray(np.transpose(np.asarray(W)[:, :, ::-1, ::-1], (1, 2, 3, 0)))
