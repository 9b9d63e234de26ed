"""Device experiment (bench/profile_step.py, variant 'augkernel'): the augmentation's crop,
mirror and mean subtraction (step.crop_mirror) as one Triton kernel, an operator of its own so
that it runs inside the compiled step. Compiled from PyTorch operations the gather is fused with
conv1's space-to-depth rearrangement into one kernel that reads each pixel through index tables;
this one reads one output row's source row straight, in order (reversed when mirrored).

    images (B, 256, 256, 3) uint8, mean_hwc (256, 256, 3) float32, offsets (B, 2) int64,
    mirror (B,) bool  ->  (B, 227, 227, 3) float32, what crop_mirror computes, channels last
"""
import torch
import triton
import triton.language as tl

from alexnet_lib.data import CROP

BLOCK = 1024          # elements of one output row (227 x 3 = 681), padded


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


@torch.library.triton_op('alexnet_bench::crop_mirror', mutates_args=())
def crop_mirror_op(images: torch.Tensor, mean_hwc: torch.Tensor, offsets: torch.Tensor,
                   mirror: torch.Tensor) -> torch.Tensor:
    B, size = images.shape[0], images.shape[1]
    out = torch.empty((B, CROP, CROP, 3), dtype=torch.float32, device=images.device)
    torch.library.wrap_triton(_crop_mirror_kernel)[(B * CROP,)](
        images, mean_hwc, offsets, mirror, out, CROP=CROP, SIZE=size, BLOCK=BLOCK)
    return out


def crop_mirror(images, mean_hwc, offsets, mirror):
    """step.crop_mirror through the kernel: (B, 3, 227, 227), channels-last memory."""
    return crop_mirror_op(images.contiguous(), mean_hwc.contiguous(),
                          offsets.to(torch.int64).contiguous(),
                          mirror.to(torch.uint8).contiguous()).permute(0, 3, 1, 2)
