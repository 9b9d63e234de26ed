"""The layers of the original AlexNet (SPEC §2), as functions of their parameters.

Each function is the original layer's math, written for PyTorch tensors in NCHW order:
convolution + bias (+ ReLU), 3x3/2 max pooling, the pylearn2 cross-channel LRN, the original
dropout convention, the fully connected layer. The original's parameter layouts differ from
PyTorch's; ``conv_weight_from_original`` / ``conv_weight_to_original`` convert between them.

    x = conv_relu(x, W, b, stride=4, pad=0, groups=1)
    x = lrn(max_pool(x))
"""
import numpy as np
import torch
import torch.nn.functional as F

LRN_N, LRN_K, LRN_ALPHA, LRN_BETA = 5, 2.0, 1e-4, 0.75  # pylearn2 defaults; alpha not divided by n
POOL_SIZE, POOL_STRIDE = 3, 2
FEW_CHANNELS = 4   # a convolution of at most this many input channels runs as a matrix product
DROPOUT_KEEP = 0.5


def conv_relu(x, W, b, stride, pad, groups):
    """relu(conv(x, W) + b). W is PyTorch's (out, in/groups, kh, kw) cross-correlation layout;
    for groups=2 the first half of the input channels feeds the first half of the outputs.
    Each group runs as its own convolution (as the original's two columns did): cuDNN's grouped
    channels-last path slices and pads channels in extra kernels (a compiled bf16 step on an
    H100: 22.8k -> 25.3k images/s)."""
    if x.shape[1] <= FEW_CHANNELS and groups == 1 and pad == 0:
        return conv_relu_by_patches(x, W, b, stride)
    if groups == 1:
        return F.relu(F.conv2d(x, W, b, stride=stride, padding=pad))
    return torch.cat([F.relu(F.conv2d(xg, Wg, bg, stride=stride, padding=pad)) for xg, Wg, bg
                      in zip(x.chunk(groups, 1), W.chunk(groups, 0), b.chunk(groups, 0))], 1)


def conv_relu_by_patches(x, W, b, stride):
    """The same convolution as one matrix product of the image's patches, for conv1's 3 input
    channels: cuDNN pads them to 8 and runs a slow kernel (1.6 ms of a 9 ms step on an H100;
    as a product 0.3 ms, and compiled the patches are gathered straight from the uint8 batch).
    A patch's elements are in (row, column, channel) order, runs that lie side by side in a
    channels-last image. Returns (B, out, Ho, Wo) with channels-last memory."""
    O, C, kh, kw = W.shape
    B = x.shape[0]
    p = x.unfold(2, kh, stride).unfold(3, kw, stride)        # (B, C, Ho, Wo, kh, kw): a view
    Ho, Wo = p.shape[2], p.shape[3]
    patches = p.permute(0, 2, 3, 4, 5, 1).reshape(B * Ho * Wo, kh * kw * C)
    y = torch.addmm(b, patches, W.permute(0, 2, 3, 1).reshape(O, kh * kw * C).t())
    return F.relu(y).view(B, Ho, Wo, O).permute(0, 3, 1, 2)


def max_pool(x):
    """3x3 max pooling, stride 2, no padding (55 -> 27 -> 13 -> 6)."""
    return F.max_pool2d(x, POOL_SIZE, POOL_STRIDE)


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
