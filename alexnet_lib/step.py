"""The training step's pieces, each a function of tensors (compiled whole with torch.compile):
augmentation and the convolutional layers, the classifier and its loss, the test-time logits;
and GraphedStep, a compiled step replayed as one CUDA graph.

    feats = augmented_features(conv_params, images, mean_hwc, offsets, mirror, torch.bfloat16)
    loss, errors = classifier_loss(fc_params, feats, labels, masks, torch.bfloat16)

The training loop (loop.py) cuts the backward pass at the fc6 input, between the two: the fully
connected layers' gradients are complete first, so that several replicas can average them while
the convolutional layers' backward runs.
"""
import torch
import torch.nn.functional as F

import alex_net
from alexnet_lib.data import centre_draws, crop_mirror


def precision_of(cfg, device):
    """'bf16', 'tf32' or 'fp32' ('auto': bf16 on a GPU, fp32 on the CPU)."""
    p = cfg['precision']
    return ('bf16' if device.type == 'cuda' else 'fp32') if p == 'auto' else p


def augmented_features(conv_params, images, mean_hwc, offsets, mirror, amp_dtype):
    """Augmentation and the convolutional layers of one minibatch: the fc6 input."""
    x = crop_mirror(images, mean_hwc, offsets, mirror)
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        return alex_net.features(conv_params, x)


def classifier_loss(fc_params, feats, labels, masks, amp_dtype):
    """The fully connected layers, the loss and the number of top-1 errors of one minibatch."""
    with torch.autocast(feats.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        logits = alex_net.classifier(fc_params, feats, masks)
    loss = F.cross_entropy(logits.float(), labels)
    errors = (logits.argmax(1) != labels).sum()
    return loss, errors


def test_logits(layer_params, images, mean_hwc, amp_dtype):
    """Float logits of the test-time network (no dropout masks) on the centre crops of uint8
    (B, 256, 256, 3) images on the device: what validation and classify.py compute."""
    offsets, mirror = centre_draws(images.shape[0])
    x = crop_mirror(images, mean_hwc, torch.from_numpy(offsets).to(images.device),
                    torch.from_numpy(mirror).to(images.device))
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        return alex_net.forward(layer_params, x).float()


@torch.no_grad()
def eval_batch(layer_params, images, labels, mean_hwc, amp_dtype):
    """Sum of loss, top-1 errors and top-5 errors of a validation minibatch."""
    logits = test_logits(layer_params, images, mean_hwc, amp_dtype)
    loss = F.cross_entropy(logits, labels, reduction='sum')
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    top1_err = (top5[:, 0] != labels).sum()
    top5_err = (top5 != labels[:, None]).all(1).sum()
    return torch.stack([loss, top1_err.float(), top5_err.float()])


class GraphedStep:
    """Replica.step captured as one CUDA graph and replayed: a step's few hundred kernel
    launches cost one. The first WARMUP steps run as they are (compiling, choosing cuDNN's
    algorithms), then the step is captured with static input buffers, into which each step's
    inputs are copied before the replay. The graph holds the learning rate as a constant: a new
    graph is captured when the rate changes (at most once per lr step)."""

    WARMUP = 3

    def __init__(self, rep):
        self.rep, self.graphs, self.pool, self.static, self.warm = rep, {}, None, None, 0

    def __call__(self, images, labels, offsets, mirror, masks, lr, step):
        rep = self.rep
        inputs = (images, labels, offsets, mirror, masks)
        if self.warm < self.WARMUP:     # every training step has the same shapes after these
            self.warm += 1
            return rep.step(*inputs, lr, step)
        if self.static is None:
            self.static = [x.clone() for x in inputs]
            self.pool = torch.cuda.graph_pool_handle()
        for dst, src in zip(self.static, inputs):
            dst.copy_(src, non_blocking=True)
        if lr not in self.graphs:
            g = torch.cuda.CUDAGraph()
            # a capture records the step without running it; it runs at the replay below
            torch.cuda.synchronize(rep.device)
            try:
                with torch.cuda.graph(g, pool=self.pool):
                    out = rep.step(*self.static, lr, step)
            except RuntimeError as e:     # torch.AcceleratorError is one
                rep.log(f"notice: the training step could not be captured as a CUDA graph "
                        f"({str(e).splitlines()[0]}); it runs without one (cuda_graph=False "
                        f"says so from the start)")
                torch.cuda.synchronize(rep.device)
                rep.graphed = None
                return rep.step(*inputs, lr, step)
            self.graphs[lr] = (g, out)
        g, out = self.graphs[lr]
        g.replay()
        return out
