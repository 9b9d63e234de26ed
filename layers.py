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
DROPOUT_KEEP = 0.5


def conv_relu(x, W, b, stride, pad, groups):
    """relu(conv(x, W) + b). W is PyTorch's (out, in/groups, kh, kw) cross-correlation layout;
    for groups=2 the first half of the input channels feeds the first half of the outputs.
    Each group runs as its own convolution (as the original's two columns did): cuDNN's grouped
    channels-last path slices and pads channels in extra kernels (a compiled bf16 step on an
    H100: 22.8k -> 25.3k images/s)."""
    if groups == 1:
        return F.relu(F.conv2d(x, W, b, stride=stride, padding=pad))
    return torch.cat([F.relu(F.conv2d(xg, Wg, bg, stride=stride, padding=pad)) for xg, Wg, bg
                      in zip(x.chunk(groups, 1), W.chunk(groups, 0), b.chunk(groups, 0))], 1)


def max_pool(x):
    """3x3 max pooling, stride 2, no padding (55 -> 27 -> 13 -> 6)."""
    return F.max_pool2d(x, POOL_SIZE, POOL_STRIDE)


def lrn(x):
    """y = x / (k + alpha * sum_{5 adjacent channels} x^2) ^ beta, the window zero-padded at the
    ends. torch's local_response_norm divides alpha by n, so it gets alpha * n."""
    return F.local_response_norm(x, LRN_N, alpha=LRN_ALPHA * LRN_N, beta=LRN_BETA, k=LRN_K)


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
