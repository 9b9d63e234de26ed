"""AlexNet as in the original alex_net.py (docs/design.md), with its parameters in flat buffers.

The network: conv1 -> pool -> LRN -> conv2 (2 groups) -> pool -> LRN -> conv3 -> conv4 (2 groups)
-> conv5 (2 groups) -> pool -> fc6 -> dropout -> fc7 -> dropout -> fc8 -> softmax.

Parameters and momentum live in one float32 buffer ``state`` = [parameters | momentum], so a
multi-GPU exchange moves all of them with one copy. Inside each half, every weight comes first
(in the original param order), then every bias; a weight's elements are a view of the buffer.
``PARAMS`` lists the original parameters in the original order (W_0, b_0, W0_1, b0_1, W1_1, ...),
which is also the order of the original's momentum files mom_{k}. The original has 1,000 classes;
``AlexNet(device, n_classes=10)`` has 10 outputs, its tables in ``net.arch``.

    net = AlexNet('cuda:0')               # initialised from RandomState(23455), as the original
    logits = net.forward(x, masks)        # x: float (B, 3, 227, 227) mean-subtracted crops
    loss.backward()                       # gradients land in the flat buffer net.grad
    arrays = net.to_original()            # {'W_0': (3, 11, 11, 96) ..., 'b_7': (1000,)}
"""
import contextlib
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from layers import (conv_pool_relu, conv_weight_from_original, conv_weight_to_original,
                    dropout, fc, lrn)

INIT_SEED = 23455
N_CLASSES = 1000


@dataclass(frozen=True)
class Layer:
    kind: str          # 'conv' or 'fc'
    n_in: int          # input channels / features
    n_out: int
    kernel: int = 0
    stride: int = 1
    pad: int = 0
    groups: int = 1
    init_std: float = 0.01
    init_bias: float = 0.0
    pool: bool = False
    lrn: bool = False
    relu: bool = True
    dropout: bool = False


def layers_for(n_classes=1000):
    """The layer table; fc8 has one output per class (the original: 1,000)."""
    return (
        Layer('conv', 3, 96, 11, 4, 0, 1, 0.01, 0.0, pool=True, lrn=True),       # 0 conv1
        Layer('conv', 96, 256, 5, 1, 2, 2, 0.01, 0.1, pool=True, lrn=True),      # 1 conv2
        Layer('conv', 256, 384, 3, 1, 1, 1, 0.01, 0.0),                          # 2 conv3
        Layer('conv', 384, 384, 3, 1, 1, 2, 0.01, 0.1),                          # 3 conv4
        Layer('conv', 384, 256, 3, 1, 1, 2, 0.01, 0.0, pool=True),               # 4 conv5
        Layer('fc', 9216, 4096, init_std=0.005, init_bias=0.1, dropout=True),    # 5 fc6
        Layer('fc', 4096, 4096, init_std=0.005, init_bias=0.1, dropout=True),    # 6 fc7
        Layer('fc', 4096, n_classes, init_std=0.01, init_bias=0.0, relu=False),  # 7 fc8 (softmax)
    )


LAYERS = layers_for(N_CLASSES)
DROPOUT_LAYERS = tuple(i for i, l in enumerate(LAYERS) if l.dropout)
DROPOUT_UNITS = tuple(LAYERS[i].n_out for i in DROPOUT_LAYERS)    # the masks' widths
FIRST_FC = next(i for i, l in enumerate(LAYERS) if l.kind == 'fc')


@dataclass(frozen=True)
class Param:
    name: str            # original file stem: 'W_0', 'b0_1', ...
    layer: int
    is_weight: bool
    original_shape: tuple
    shape: tuple         # shape of our view (conv W in PyTorch's (out, in, kh, kw) layout)
    offset: int = 0      # into the parameter half of the state buffer

    @property
    def size(self):
        return int(np.prod(self.shape))


def _original_params(layers):
    """The original's params list: [W, b] per layer, [W0, b0, W1, b1] for groups=2."""
    out = []
    for i, l in enumerate(layers):
        halves = [''] if l.groups == 1 else ['0', '1']
        for h in halves:
            if l.kind == 'conv':
                cin, cout = l.n_in // l.groups, l.n_out // l.groups
                wshape = (cin, l.kernel, l.kernel, cout)
                ours = (cout, cin, l.kernel, l.kernel)
            else:
                cout = l.n_out
                wshape = ours = (l.n_in, l.n_out)
            out.append(Param(f'W{h}_{i}', i, True, wshape, ours))
            out.append(Param(f'b{h}_{i}', i, False, (cout,), (cout,)))
    return out


def _layout(params):
    """Offsets: all weights first (so a groups=2 layer's W0 and W1 are adjacent and form the
    grouped convolution's weight), then all biases."""
    placed, offset = {}, 0
    for want_weight in (True, False):
        for p in params:
            if p.is_weight == want_weight:
                placed[p.name] = Param(p.name, p.layer, p.is_weight, p.original_shape, p.shape,
                                       offset)
                offset += p.size
    return [placed[p.name] for p in params], offset


@dataclass(frozen=True)
class Architecture:
    """The layer table of a network with n_classes outputs, its parameters in the original
    order and their places in the flat buffers."""
    n_classes: int
    layers: tuple
    params: list         # Param, in the original param order
    n_params: int
    n_weights: int       # weights first in the buffer, then biases
    layer_slices: tuple  # per layer: (W offset, W shape, b offset, b size), both halves
    fc_weights: slice    # the fully connected weights (96% of the parameters), contiguous
    not_fc_weights: tuple  # the rest: convolutional weights, all biases

    @property
    def snapshot_bytes(self):
        """The disk a snapshot takes: parameters and momentum, float32."""
        return 2 * 4 * self.n_params


def architecture(n_classes=N_CLASSES):
    layers = layers_for(n_classes)
    params, n_params = _layout(_original_params(layers))
    n_weights = sum(p.size for p in params if p.is_weight)
    slices = []
    for i, l in enumerate(layers):
        ws = [p for p in params if p.layer == i and p.is_weight]
        bs = [p for p in params if p.layer == i and not p.is_weight]
        shape = ((l.n_out, l.n_in // l.groups, l.kernel, l.kernel) if l.kind == 'conv'
                 else (l.n_in, l.n_out))
        slices.append((ws[0].offset, shape, bs[0].offset, l.n_out))
    fc_start = slices[FIRST_FC][0]
    return Architecture(n_classes, layers, params, n_params, n_weights, tuple(slices),
                        slice(fc_start, n_weights),
                        (slice(0, fc_start), slice(n_weights, n_params)))


ORIGINAL = architecture(N_CLASSES)   # the original's 1,000 classes
PARAMS, N_PARAMS, N_WEIGHTS = ORIGINAL.params, ORIGINAL.n_params, ORIGINAL.n_weights
LAYER_SLICES = ORIGINAL.layer_slices


def original_init(seed=INIT_SEED, arch=ORIGINAL):
    """The original initialisation, in original layouts: one RandomState draws every weight in
    layer order (W0 before W1); biases are constants and draw nothing. The draws take seconds
    (61 million normal values), so they are kept in ~/.cache/alexnet_lib/init, in a file named
    by the seed and the layer table, and read from there by later runs."""
    weights = [p for p in arch.params if p.is_weight]
    flat = _cached_draws(seed, arch, weights)
    arrays, start = {}, 0
    for p in arch.params:
        if p.is_weight:
            arrays[p.name] = flat[start:start + p.size].reshape(p.original_shape)
            start += p.size
        else:
            arrays[p.name] = np.full(p.original_shape, arch.layers[p.layer].init_bias, np.float32)
    return arrays


def _draws(seed, arch, weights):
    rng = np.random.RandomState(seed)
    return np.concatenate([rng.normal(0.0, arch.layers[p.layer].init_std, p.original_shape)
                           .astype(np.float32).ravel() for p in weights])


def _cached_draws(seed, arch, weights):
    """_draws, from the cache when it holds them (a file of another size is drawn again); a
    cache that cannot be written is skipped."""
    table = [(p.name, p.original_shape, arch.layers[p.layer].init_std) for p in weights]
    key = hashlib.sha256(repr((seed, table)).encode()).hexdigest()[:20]
    path = os.path.join(os.path.expanduser('~'), '.cache', 'alexnet_lib', 'init', f'{key}.npy')
    n = sum(p.size for p in weights)
    try:
        flat = np.load(path, allow_pickle=False)
        if flat.dtype == np.float32 and flat.shape == (n,):
            return flat
    except (OSError, ValueError, EOFError):
        pass
    flat = _draws(seed, arch, weights)
    tmp = f'{path[:-4]}.tmp{os.getpid()}.npy'
    try:                             # written whole, then renamed: readers never see a part
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(tmp, flat)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return flat


def features(conv_params, x):
    """The convolutional part: (B, 3, 227, 227) -> (B, 9216) in (channel, row, col) order, the
    original's fc6 input. conv_params: (W, b) of the convolutional layers."""
    for l, (W, b) in zip(LAYERS[:FIRST_FC], conv_params):
        x = conv_pool_relu(x, W, b, l.stride, l.pad, l.groups, l.pool)
        if l.lrn:
            x = lrn(x)
    return x.flatten(1)


def classifier(fc_params, x, masks=None):
    """The fully connected part: features -> logits. masks: None at test time, else the
    keep-masks (B, 4096) of fc6 and fc7."""
    for i, (W, b) in enumerate(fc_params, FIRST_FC):
        x = fc(x, W, b)
        if LAYERS[i].relu:
            x = torch.relu(x)
        if LAYERS[i].dropout:
            x = dropout(x, None if masks is None else masks[DROPOUT_LAYERS.index(i)])
    return x


def forward(layer_params, x, masks=None):
    """Logits of AlexNet. layer_params: (W, b) of each layer (AlexNet.layer_params); x: (B, 3,
    227, 227); masks: None at test time, else the keep-masks (B, 4096) of fc6 and fc7."""
    return classifier(layer_params[FIRST_FC:], features(layer_params[:FIRST_FC], x), masks)


class AlexNet:
    """The parameters and momentum of one replica, in one flat buffer on ``device``."""

    def __init__(self, device='cpu', init=True, n_classes=N_CLASSES):
        self.device = torch.device(device)
        self.arch = arch = ORIGINAL if n_classes == N_CLASSES else architecture(n_classes)
        self.state = torch.zeros(2 * arch.n_params, dtype=torch.float32, device=self.device)
        self.params = self.state[:arch.n_params]
        self.momentum = self.state[arch.n_params:]
        # each layer's W and b are autograd leaves that view the flat buffer, and their .grad
        # views one flat gradient buffer: backward accumulates in place, with no per-step
        # full-size copies, and the update and exchange see one buffer
        self.grad = torch.zeros(arch.n_params, dtype=torch.float32, device=self.device)
        self.layer_params = []
        for wo, wshape, bo, bn in arch.layer_slices:
            pair = []
            for off, shape in ((wo, wshape), (bo, (bn,))):
                n = int(np.prod(shape))
                leaf = self.params[off:off + n].view(shape).requires_grad_()
                leaf.grad = self.grad[off:off + n].view(shape)
                pair.append(leaf)
            self.layer_params.append(tuple(pair))
        if init:
            self.load_original(original_init(arch=arch))

    def forward(self, x, masks=None):
        return forward(self.layer_params, x, masks)

    def view(self, buf, p):
        return buf[p.offset:p.offset + p.size].view(p.shape)

    def load_original(self, arrays, momentum=None):
        """Fill parameters (and momentum, if given) from original-layout arrays by name
        (momentum: the list in param order)."""
        with torch.no_grad():
            for k, p in enumerate(self.arch.params):
                for buf, src in ((self.params, arrays[p.name]),
                                 (self.momentum, None if momentum is None else momentum[k])):
                    if src is None:
                        continue
                    src = np.asarray(src, dtype=np.float32)
                    if src.shape != p.original_shape:
                        raise ValueError(f"{p.name}: shape {src.shape}, expected "
                                         f"{p.original_shape}")
                    if p.is_weight and p.layer < FIRST_FC:
                        src = conv_weight_from_original(src)
                    self.view(buf, p).copy_(torch.from_numpy(np.ascontiguousarray(src)))

    def _to_original(self, buf):
        out = []
        for p in self.arch.params:
            a = self.view(buf, p).detach().cpu().numpy()
            if p.is_weight and p.layer < FIRST_FC:
                a = conv_weight_to_original(a)
            out.append(np.ascontiguousarray(a, dtype=np.float32))
        return out

    def to_original(self):
        """{name: array} of the parameters in the original layouts."""
        return dict(zip((p.name for p in self.arch.params), self._to_original(self.params)))

    def momentum_to_original(self):
        """The momentum of each parameter, in param order and the parameter's original layout."""
        return self._to_original(self.momentum)
