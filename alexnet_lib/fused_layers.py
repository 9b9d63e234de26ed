"""Two layers' work on a CUDA device as Triton kernels, each an operator of its own
(torch.library.triton_op) so that it runs inside compiled code and CUDA graphs. Tensors are
channels-last, (B, H, W, C) contiguous. Elsewhere (the CPU) the PyTorch compositions in
layers.py and step.py serve, and the tests hold each kernel equal to its composition.

max_pool_backward  the 3x3/2 max pool (layers.MaxPoolByCodes): each input element's gradient is
                   the sum of the output gradients of the (at most 2 x 2) windows that hold it
                   and picked it as their max, read from the byte code of each window's max.
                   Compiled from PyTorch operations this is several kernels that write partial
                   sums to memory; the kernel reads the output's gradient and the codes once
                   and writes the input's gradient once.
crop_mirror        the augmentation (step.crop_mirror): a crop of each uint8 image less the
                   mean, mirrored where asked, as float32. Compiled from PyTorch operations it
                   is a gather of every pixel through index tables; the kernel reads each
                   output row's source row straight, in order (reversed when mirrored).

The shapes are compile-time constants of the kernels (a network has few of them): indexing then
divides by constants, which the compiler turns into multiplications, and 32-bit indices serve
whenever the tensors are under 2^31 elements. So code that calls them compiles with static
shapes (torch.compile(..., dynamic=False)): a size traced as a symbol cannot be a constant.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:      # a CPU build of torch: the compositions serve
    triton = None

POOL_BLOCK = 1024       # input elements per program of the pool's backward


def available(device):
    """Whether the kernels run on this device."""
    return triton is not None and torch.device(device).type == 'cuda'


if triton is not None:
    @triton.jit
    def _max_pool_backward_kernel(g_ptr, code_ptr, out_ptr, n, H: tl.constexpr,
                                  W: tl.constexpr, Ho: tl.constexpr, Wo: tl.constexpr,
                                  C: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        if WIDE:
            pid = pid.to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
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
        torch.library.wrap_triton(_max_pool_backward_kernel)[(triton.cdiv(n, POOL_BLOCK),)](
            grad_y, code, out, n, H=H, W=W, Ho=Ho, Wo=Wo, C=C, WIDE=n + POOL_BLOCK >= 2 ** 31,
            BLOCK=POOL_BLOCK)
        return out

    @triton.jit
    def _crop_mirror_kernel(img_ptr, mean_ptr, off_ptr, mirror_ptr, out_ptr, CROP: tl.constexpr,
                            SIZE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)                 # one output row: image b, row `row`
        b = pid // CROP
        row = pid % CROP
        e = tl.arange(0, BLOCK)
        inside = e < CROP * 3
        col = e // 3
        ch = e % 3
        r0 = tl.load(off_ptr + 2 * b)
        c0 = tl.load(off_ptr + 2 * b + 1)
        flip = tl.load(mirror_ptr + b)
        src = ((r0 + row) * SIZE + c0 + tl.where(flip != 0, CROP - 1 - col, col)) * 3 + ch
        x = tl.load(img_ptr + b.to(tl.int64) * (SIZE * SIZE * 3) + src, mask=inside, other=0)
        mean = tl.load(mean_ptr + src, mask=inside, other=0.0)
        tl.store(out_ptr + pid.to(tl.int64) * (CROP * 3) + e, x.to(tl.float32) - mean,
                 mask=inside)

    @torch.library.triton_op('alexnet_lib::crop_mirror', mutates_args=())
    def crop_mirror(images: torch.Tensor, mean_hwc: torch.Tensor, offsets: torch.Tensor,
                    mirror: torch.Tensor, crop: int) -> torch.Tensor:
        """(B, crop, crop, 3) float32: images (B, S, S, 3) uint8 and mean_hwc (S, S, 3) float32
        cropped at offsets (B, 2) int64 (row, column), mirrored where mirror (B,) uint8 is
        nonzero; all contiguous."""
        B, size = images.shape[0], images.shape[1]
        out = torch.empty((B, crop, crop, 3), dtype=torch.float32, device=images.device)
        torch.library.wrap_triton(_crop_mirror_kernel)[(B * crop,)](
            images, mean_hwc, offsets, mirror, out, CROP=crop, SIZE=size,
            BLOCK=triton.next_power_of_2(3 * crop))    # one output row, padded
        return out
