"""The training step: everything from one batch on the device to updated weights.

    step = TrainStep(net, mean_hwc, UpdateRule(0.9, 0.0005), precision='bf16', compiled=True,
                     graphed=True)
    step.set_lr(0.01)                     # a 0-d tensor on the device: one CUDA graph, any rate
    loss, errors = step(batch, t)         # batch: data.Batch; t: the step's index in its epoch

A step is augmentation and the convolutional layers (augmented_features), the fully connected
layers and the loss (classifier_loss), the backward pass cut in two at the fc6 input, the update
rule (sgd.sgd_step_) and, with several replicas, the average (an exchange.Exchanger): with
average='gradients' the fully connected gradients (96% of them, complete first) travel while the
convolutional layers' backward runs; with average='weights' weights and momentum are averaged
after the update, every `every` steps. Gradients land in the flat buffer net.grad: the fully
connected weights' (96%) are written there as they come (WeightGradInto), the rest added to
zeros, and the update zeroes only the rest. Compiled, each piece is one torch.compile'd
function; graphed (one GPU), the whole step is captured after WARMUP steps and replayed as one
CUDA graph.
The precision of every script (training, validation, classify.py, bench.py) comes from
precision_of and autocast here.
"""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import alex_net
from alexnet_lib import fused_layers, fused_update
from alexnet_lib.data import CROP, centre_draws
from alexnet_lib.sgd import sgd_step_


# -- precision ----------------------------------------------------------------------------------

def precision_of(precision, device):
    """'bf16', 'tf32' or 'fp32' ('auto': bf16 on a GPU, fp32 on the CPU)."""
    if precision == 'auto':
        return 'bf16' if torch.device(device).type == 'cuda' else 'fp32'
    return precision


def amp_dtype_of(precision):
    """The autocast dtype of a precision: bfloat16 for bf16, None (no autocast) otherwise."""
    return torch.bfloat16 if precision == 'bf16' else None


def autocast(device_type, amp_dtype):
    return torch.autocast(device_type, dtype=amp_dtype or torch.float32,
                          enabled=amp_dtype is not None)


def configure_device(device, precision):
    """This process's global backend settings for a precision on a device: cuDNN chooses its
    fastest algorithms; TF32 matrix units for tf32 and for what bf16 autocast leaves in
    float32, never for fp32."""
    if torch.device(device).type != 'cuda':
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = precision != 'fp32'
    torch.backends.cudnn.allow_tf32 = precision != 'fp32'


# -- the step's pieces: functions of tensors ------------------------------------------------------

def crop_mirror(images, mean_hwc, offsets, mirror):
    """Mean-subtracted 227x227 crops, mirrored where asked, as float (B, 3, 227, 227) whose
    memory is channels-last. images: uint8 (B, 256, 256, 3) on the device; offsets (B, 2) and
    mirror (B,) tensors on the device. The mean is subtracted before cropping, as the original
    did, so crop and mirror apply to the mean too. On a GPU one kernel does all of it
    (fused_layers.crop_mirror), elsewhere one gather."""
    if fused_layers.available(images.device):
        return fused_layers.crop_mirror(images.contiguous(), mean_hwc.contiguous(),
                                        offsets.to(torch.int64).contiguous(),
                                        mirror.to(torch.uint8).contiguous(),
                                        CROP).permute(0, 3, 1, 2)
    ar = torch.arange(CROP, device=images.device)
    rows = offsets[:, 0, None] + ar
    cols = offsets[:, 1, None] + torch.where(mirror[:, None], CROP - 1 - ar, ar)
    r, c = rows[:, :, None], cols[:, None, :]
    b = torch.arange(images.shape[0], device=images.device)[:, None, None]
    x = images[b, r, c].float() - mean_hwc[r, c]
    return x.permute(0, 3, 1, 2)


def augmented_features(conv_params, images, mean_hwc, offsets, mirror, amp_dtype):
    """Augmentation and the convolutional layers of one minibatch: the fc6 input."""
    x = crop_mirror(images, mean_hwc, offsets, mirror)
    with autocast(x.device.type, amp_dtype):
        return alex_net.features(conv_params, x)


class WeightGradInto(torch.autograd.Function):
    """W as a layer uses it (cast to dtype, or as it is), its gradient written into W.grad (a
    view of net.grad) over whatever is there, not added to it by autograd: adding to zeros
    would be one more pass over the gradient, and zeroing it after the update another."""

    @staticmethod
    def forward(ctx, W, dtype):
        ctx.grad = W.grad
        return W.view_as(W) if dtype is None else W.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        ctx.grad.copy_(grad)           # (a bf16 gradient becomes float32 here)
        return None, None


def classifier_loss(fc_params, feats, labels, masks, amp_dtype):
    """The fully connected layers, the loss and the number of top-1 errors of one minibatch."""
    with autocast(feats.device.type, amp_dtype):
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
    with autocast(x.device.type, amp_dtype):
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


# -- the step -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class UpdateRule:
    """The original's update rule (sgd.py): momentum, weight decay, Nesterov or none."""
    momentum: float = 0.9
    weight_decay: float = 0.0005
    use_momentum: bool = True
    nesterov: bool = False


@dataclass(frozen=True)
class Averaging:
    """How replicas stay together: an exchange.Exchanger; 'weights' (weights and momentum after
    the update, every `every` steps, the original) or 'gradients' (during the backward pass);
    wire: the dtype gradients travel in."""
    exchanger: object
    average: str = 'weights'
    every: int = 1
    wire: torch.dtype = torch.float32


def compile_cache():
    """Compiled code is cached across runs (PyTorch's inductor cache): only a first run compiles
    for long. Returns the cache folder."""
    return os.environ.setdefault('TORCHINDUCTOR_CACHE_DIR', os.path.join(
        os.path.expanduser('~'), '.cache', 'alexnet_lib', 'torchinductor'))


class TrainStep:
    """One replica's training step: batch on the device -> loss, errors; weights, momentum and
    gradients updated in net's flat buffers. The learning rate is a 0-d tensor on the device
    (set_lr), so a compiled step never recompiles for a new rate and one CUDA graph serves
    every rate. notice: a line for the run to print once (the step fell back from a graph)."""

    WARMUP = 3         # graphed: steps run as they are (compiling, cuDNN's choices) before capture

    def __init__(self, net, mean_hwc, rule, *, precision='fp32', compiled=False, graphed=False,
                 averaging=None, compile_mode=None):
        self.net, self.mean, self.rule, self.averaging = net, mean_hwc, rule, averaging
        self.amp_dtype = amp_dtype_of(precision)
        self.lr = torch.zeros((), dtype=torch.float32, device=net.device)
        self._lr_value = None
        self.features_fn, self.classifier_fn = augmented_features, classifier_loss
        self.update_fn = sgd_step_
        self.compiled = compiled
        if compiled:
            compile_cache()
            # static shapes: fused_layers' kernels take them as constants, and a step has one
            self.features_fn = torch.compile(augmented_features, mode=compile_mode, dynamic=False)
            self.classifier_fn = torch.compile(classifier_loss, mode=compile_mode, dynamic=False)
            # on a GPU the update is one hand-fused pass; compiled with a rate tensor it takes two
            self.update_fn = (fused_update.sgd_step_ if fused_update.available(net.device)
                              else torch.compile(sgd_step_))
        # a graph holds no exchange: only a step of one replica on a GPU is captured
        self.graphed = graphed and averaging is None and net.device.type == 'cuda'
        self.steps_run, self.graph, self.static, self.out = 0, None, None, None
        self.notice = None

    def set_lr(self, lr):
        """The rate of the next steps (a device-side fill, queued like the steps)."""
        if lr != self._lr_value:
            self.lr.fill_(lr)
            self._lr_value = lr

    @property
    def ready(self):
        """Whether the step runs as it will from now on (compiled, and captured if graphed)."""
        return not self.graphed or self.graph is not None

    def __call__(self, batch, step):
        if not self.graphed or self.steps_run < self.WARMUP:
            self.steps_run += 1
            return self.run(batch, step)
        if self.graph is None and not self._capture(batch, step):
            return self.run(batch, step)
        for dst, src in zip(self.static, batch):
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.out

    def _capture(self, batch, step):
        """Capture the step as a CUDA graph with static copies of the batch as its inputs; a
        failure leaves the step ungraphed, with a notice."""
        self.static = [x.clone() for x in batch]
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.net.device)
        try:
            # a capture records the step without running it; it runs at the first replay
            with torch.cuda.graph(graph):
                out = self.run(type(batch)(*self.static), step)
        except RuntimeError as e:     # torch.AcceleratorError is one
            torch.cuda.synchronize(self.net.device)
            self.graphed, self.static = False, None
            self.notice = (f"notice: the training step could not be captured as a CUDA graph "
                           f"({str(e).splitlines()[0]}); it runs without one (cuda_graph=False "
                           f"says so from the start)")
            return False
        self.graph, self.out = graph, out
        return True

    def run(self, batch, step):
        """Forward, backward, update and exchange of one minibatch: (loss, errors).
        The backward pass is cut in two at the fc6 input: the fully connected layers'
        gradients are complete first, and with average 'gradients' they travel to the other
        replicas while the convolutional layers' backward runs."""
        net, arch, avg = self.net, self.net.arch, self.averaging
        first_fc = alex_net.FIRST_FC
        feats = self.features_fn(net.layer_params[:first_fc], batch.images, self.mean,
                                 batch.offsets, batch.mirror, self.amp_dtype)
        cut = feats.detach().requires_grad_()
        fc_params = [(WeightGradInto.apply(W, self.amp_dtype), b)
                     for W, b in net.layer_params[first_fc:]]
        loss, errors = self.classifier_fn(fc_params, cut, batch.labels, batch.masks,
                                          self.amp_dtype)
        loss.backward()               # into the flat buffer net.grad, and cut.grad
        gradients = avg is not None and avg.average == 'gradients'
        if gradients:
            pending = avg.exchanger.start_average_(net.grad[arch.fc_weights], avg.wire)
        feats.backward(cut.grad)
        if gradients:
            for part in arch.not_fc_weights:
                avg.exchanger.average_(net.grad[part], avg.wire)
            pending.wait()
        rule = self.rule
        self.update_fn(net.params, net.grad, net.momentum, self.lr, arch.n_weights,
                       rule.momentum, rule.weight_decay, rule.use_momentum, rule.nesterov,
                       written=(arch.fc_weights.start, arch.fc_weights.stop))
        if avg is not None and avg.average == 'weights' and (step + 1) % avg.every == 0:
            avg.exchanger.average_(net.state)
        # detached: no reference keeps this step's autograd graph (and the gradient
        # accumulators it made on this stream) alive into the next step or a graph capture
        return loss.detach(), errors
