"""The max pool's backward pass on a CUDA device as one Triton kernel, an operator of its own
(torch.library.triton_op) so that it runs inside compiled code and CUDA graphs; tensors are
channels-last, (B, H, W, C) contiguous. Compiled from PyTorch operations the same backward pass
is several kernels that write intermediate sums to memory; this one reads the output's gradient
and the window codes and writes the input's gradient once.

max_pool_backward  the 3x3/2 max pool (layers.MaxPoolByCodes): each input element's gradient is
                   the sum of the output gradients of the (at most 2 x 2) windows that hold it
                   and picked it as their max, read from the byte code of each window's max.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:      # a CPU build of torch: the layer's own backward pass serves
    triton = None

BLOCK = 1024       # input elements per program


def available(device):
    """Whether the fused backward pass runs on this device."""
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
