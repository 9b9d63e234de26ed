"""sgd.sgd_step_ on a CUDA device as one Triton kernel: one pass that reads the weights,
gradients and momentum once and writes the weights, the momentum and the zeroed gradients
(all but the part the next backward pass writes) once.

torch.compile makes one such pass of sgd_step_ when the learning rate is a Python number, but a
0-d rate tensor (what lets one CUDA graph serve every rate) makes it write g + wd*W out first and
read it back: a second pass over the weights. This kernel reads the rate from its tensor and keeps
the single pass. The rule is sgd.py's (stated there); tests compare the two.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:      # a CPU build of torch: sgd_step_ compiled or eager serves
    triton = None

BLOCK = 1024       # elements per program
NUM_WARPS = 16


def available(device):
    """Whether the fused update runs on this device."""
    return triton is not None and torch.device(device).type == 'cuda'


if triton is not None:
    @triton.jit
    # (Triton's launcher binds the arguments in a function of its own with a local named
    # `params`: no argument may take that name)
    def _sgd_step_kernel(w_ptr, g_ptr, v_ptr, lr_ptr, n_weights, n_params, written_lo,
                         written_hi, decay, scale, weight_decay, USE_MOMENTUM: tl.constexpr,
                         BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n_params
        w = tl.load(w_ptr + offs, mask=inside)
        g = tl.load(g_ptr + offs, mask=inside)
        lr = tl.load(lr_ptr)
        is_weight = offs < n_weights
        g = tl.where(is_weight, g + weight_decay * w, g)      # no weight decay for biases
        lr_eff = tl.where(is_weight, lr, 2 * lr)              # biases step at twice the rate
        if USE_MOMENTUM:
            v = tl.load(v_ptr + offs, mask=inside)
            v = v * decay + (-scale * g) * lr_eff
            tl.store(v_ptr + offs, v, mask=inside)
            w = w + v
        else:
            w = w + (-g) * lr_eff
        tl.store(w_ptr + offs, w, mask=inside)
        kept = (offs >= written_lo) & (offs < written_hi)
        tl.store(g_ptr + offs, tl.zeros_like(g), mask=inside & ~kept)


@torch.no_grad()
def sgd_step_(params, grad, momentum, lr, n_weights, mu, weight_decay, use_momentum=True,
              nesterov=False, written=(0, 0), block=None, num_warps=None):
    """sgd.sgd_step_'s arguments and result; the buffers contiguous float32 on one CUDA device,
    lr a 0-d float32 tensor there. block, num_warps: the launch (BLOCK, NUM_WARPS by default)."""
    n_params = params.numel()
    block, num_warps = block or BLOCK, num_warps or NUM_WARPS
    decay, scale = (mu * mu, 1 + mu) if nesterov else (mu, 1.0)
    grid = (triton.cdiv(n_params, block),)
    _sgd_step_kernel[grid](params, grad, momentum, lr, n_weights, n_params, written[0],
                           written[1], float(decay), float(scale), float(weight_decay),
                           USE_MOMENTUM=use_momentum, BLOCK=block, num_warps=num_warps)
