"""Backward passes of the network's layers on a CUDA device as single Triton kernels, each an
operator of its own (torch.library.triton_op) so that it runs inside compiled code and CUDA
graphs; tensors are channels-last, (B, H, W, C) contiguous. Compiled from PyTorch operations
the same backward passes are several kernels that write intermediate sums to memory; each of
these reads its inputs and writes the input's gradient once.

max_pool_backward  the 3x3/2 max pool (layers.MaxPoolByCodes): each input element's gradient is
                   the sum of the output gradients of the (at most 2 x 2) windows that hold it
                   and picked it as their max, read from the byte code of each window's max.
lrn_backward       the cross-channel LRN (layers.lrn), from its input and its output's
                   gradient: the window sums are computed again (nine neighbouring channels,
                   read from cache) rather than kept from the forward pass.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:      # a CPU build of torch: the layers' own backward passes serve
    triton = None

BLOCK = 1024       # input elements per program


def available(device):
    """Whether the fused backward passes run on this device."""
    return triton is not None and torch.device(device).type == 'cuda'


if triton is not None:
    @triton.jit
    def _max_pool_backward_kernel(g_ptr, code_ptr, out_ptr, n, H, W, Ho, Wo, C,
                                  BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        c = offs % C
        t = offs // C
        w = t % W
        t = t // W
        h = t % H
        b = t // H
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        # window row r holds input rows 2r..2r+2: row h is row dy = h - 2r of windows
        # r = h // 2 (dy 0 or 1) and r = h // 2 - 1 (dy 2, when h is even); columns alike
        for i in tl.static_range(2):
            r = h // 2 - i
            dy = h - 2 * r
            row_ok = (r >= 0) & (r < Ho) & (dy <= 2)
            for j in tl.static_range(2):
                s = w // 2 - j
                dx = w - 2 * s
                ok = inside & row_ok & (s >= 0) & (s < Wo) & (dx <= 2)
                at = ((b * Ho + r) * Wo + s) * C + c
                code = tl.load(code_ptr + at, mask=ok, other=255).to(tl.int32)
                g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
                acc += tl.where(code == 3 * dy + dx, g, 0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)

    @torch.library.triton_op('alexnet_lib::max_pool_backward', mutates_args=())
    def max_pool_backward(grad_y: torch.Tensor, code: torch.Tensor, H: int,
                          W: int) -> torch.Tensor:
        """The input's gradient (B, H, W, C) from the output's gradient grad_y and the window
        codes (k = 3*dy + dx of each window's max, uint8), both (B, Ho, Wo, C) contiguous."""
        B, Ho, Wo, C = grad_y.shape
        out = torch.empty((B, H, W, C), dtype=grad_y.dtype, device=grad_y.device)
        n = out.numel()
        torch.library.wrap_triton(_max_pool_backward_kernel)[(triton.cdiv(n, BLOCK),)](
            grad_y, code, out, n, H, W, Ho, Wo, C, BLOCK=BLOCK)
        return out

    @triton.jit
    def _lrn_backward_kernel(x_ptr, gy_ptr, gx_ptr, n, C, k, alpha, beta,
                             HALF: tl.constexpr, BLOCK: tl.constexpr):
        # y_i = x_i s_i^-beta, s_i = k + alpha sum_{|j-i|<=HALF} x_j^2, so
        # gx_m = gy_m s_m^-beta - 2 alpha beta x_m sum_{|i-m|<=HALF} gy_i x_i s_i^(-beta-1)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        c = offs % C
        x_m = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        gy_m = tl.load(gy_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        s_m = tl.zeros((BLOCK,), dtype=tl.float32)
        for di in tl.static_range(2 * HALF + 1):
            i = c + (di - HALF)                       # a channel whose window holds m
            ok_i = inside & (i >= 0) & (i < C)
            s_i = tl.zeros((BLOCK,), dtype=tl.float32)
            for dj in tl.static_range(2 * HALF + 1):
                j = i + (dj - HALF)
                x_j = tl.load(x_ptr + offs + (di - HALF) + (dj - HALF),
                              mask=ok_i & (j >= 0) & (j < C), other=0.0).to(tl.float32)
                s_i += x_j * x_j
            s_i = k + alpha * s_i
            x_i = tl.load(x_ptr + offs + (di - HALF), mask=ok_i, other=0.0).to(tl.float32)
            gy_i = tl.load(gy_ptr + offs + (di - HALF), mask=ok_i, other=0.0).to(tl.float32)
            acc += tl.where(ok_i, gy_i * x_i * tl.exp((-beta - 1.0) * tl.log(s_i)), 0.0)
            if di == HALF:
                s_m = s_i
        gx = gy_m * tl.exp(-beta * tl.log(s_m)) - 2.0 * alpha * beta * x_m * acc
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=inside)

    @torch.library.triton_op('alexnet_lib::lrn_backward', mutates_args=())
    def lrn_backward(x: torch.Tensor, grad_y: torch.Tensor, size: int, k: float, alpha: float,
                     beta: float) -> torch.Tensor:
        """The gradient (B, H, W, C), in x's dtype, of the LRN input x (windows of `size`
        channels) from x and the output's gradient grad_y, both (B, H, W, C) contiguous;
        float32 inside."""
        out = torch.empty_like(x)
        n = x.numel()
        torch.library.wrap_triton(_lrn_backward_kernel)[(triton.cdiv(n, BLOCK),)](
            x, grad_y, out, n, x.shape[-1], k, alpha, beta, HALF=size // 2, BLOCK=BLOCK)
        return out
