"""The network and the update rule against the original's formulas (docs/design.md), in float64
NumPy."""
import numpy as np
import pytest
import torch

from alex_net import AlexNet, N_PARAMS, N_WEIGHTS, PARAMS, original_init
import torch.nn.functional as F

from layers import (ConvGradsByForward, MaxPoolByCodes, conv_by_blocks, conv_pool_relu, lrn,
                    max_pool)
from alexnet_lib.sgd import adjust_learning_rate, sgd_step_, sgd_update_
from alexnet_lib.snapshot import load_snapshot, save_snapshot

torch.set_num_threads(2)


def test_param_shapes_order_and_count():
    names = [p.name for p in PARAMS]
    assert names == ['W_0', 'b_0', 'W0_1', 'b0_1', 'W1_1', 'b1_1', 'W_2', 'b_2',
                     'W0_3', 'b0_3', 'W1_3', 'b1_3', 'W0_4', 'b0_4', 'W1_4', 'b1_4',
                     'W_5', 'b_5', 'W_6', 'b_6', 'W_7', 'b_7']
    shapes = {p.name: p.original_shape for p in PARAMS}
    assert shapes['W_0'] == (3, 11, 11, 96)
    assert shapes['W0_1'] == shapes['W1_1'] == (48, 5, 5, 128)
    assert shapes['W_2'] == (256, 3, 3, 384)
    assert shapes['W0_3'] == (192, 3, 3, 192)
    assert shapes['W0_4'] == (192, 3, 3, 128)
    assert shapes['W_5'] == (9216, 4096) and shapes['W_7'] == (4096, 1000)
    assert N_PARAMS == 60965224
    # weights first, then biases; views cover the buffer exactly once
    spans = sorted((p.offset, p.offset + p.size) for p in PARAMS)
    assert spans[0][0] == 0 and spans[-1][1] == N_PARAMS
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(p.offset < N_WEIGHTS for p in PARAMS if p.is_weight)


def test_forward_shapes():
    net = AlexNet('cpu', init=False)
    with torch.no_grad():
        y = net.forward(torch.randn(2, 3, 227, 227))
    assert y.shape == (2, 1000)


@pytest.mark.slow
def test_init_is_the_original_draw_sequence():
    a = original_init()
    rng = np.random.RandomState(23455)
    assert np.array_equal(a['W_0'], rng.normal(0, 0.01, (3, 11, 11, 96)).astype(np.float32))
    assert np.array_equal(a['W0_1'], rng.normal(0, 0.01, (48, 5, 5, 128)).astype(np.float32))
    assert np.array_equal(a['W1_1'], rng.normal(0, 0.01, (48, 5, 5, 128)).astype(np.float32))
    assert np.all(a['b0_1'] == np.float32(0.1)) and np.all(a['b_0'] == 0)
    assert np.all(a['b_5'] == np.float32(0.1)) and np.all(a['b_7'] == 0)
    assert abs(a['W_5'].std() - 0.005) < 1e-4 and abs(a['W_7'].std() - 0.01) < 1e-4


def test_init_draws_come_from_a_cache_that_heals(tmp_path, monkeypatch):
    """The draws are read back from ~/.cache/alexnet_lib/init by later runs; a cache file cut
    short (or of any other size) is drawn again and replaced, an unwritable cache skipped."""
    import alex_net
    arch = alex_net.architecture(10)          # a table of its own: a file of its own
    monkeypatch.setenv('HOME', str(tmp_path))
    first = original_init(arch=arch)
    (cached,) = (tmp_path / '.cache' / 'alexnet_lib' / 'init').glob('*.npy')
    assert np.array_equal(np.load(cached)[:10], first['W_0'].ravel()[:10])
    with open(cached, 'r+b') as f:
        f.truncate(1000)
    again = original_init(arch=arch)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert np.load(cached).size == sum(p.size for p in arch.params if p.is_weight)
    cached.unlink()
    cached.parent.chmod(0o500)
    try:
        assert all(np.array_equal(first[k], v) for k, v in original_init(arch=arch).items())
    finally:
        cached.parent.chmod(0o700)


def np_lrn(x, n=5, k=2.0, alpha=1e-4, beta=0.75):
    """The original: y = x / (k + alpha * sum over n adjacent channels of x^2) ^ beta (zero-
    padded)."""
    c = x.shape[1]
    sq = np.pad(x ** 2, ((0, 0), (n // 2, n // 2), (0, 0), (0, 0)))
    s = np.stack([sq[:, i:i + n].sum(1) for i in range(c)], 1)
    return x / (k + alpha * s) ** beta


def test_lrn_matches_float64_formula():
    x = np.random.RandomState(1).randn(2, 7, 5, 4) * 30  # large values: the sum matters
    got = lrn(torch.tensor(x)).numpy()
    np.testing.assert_allclose(got, np_lrn(x), rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize('device, dtype, tol, C', [
    ('cpu', torch.float32, 1e-5, 3),
    pytest.param('cuda:0', torch.float32, 1e-5, 96, marks=pytest.mark.gpu),
    pytest.param('cuda:0', torch.float32, 1e-5, 3, marks=pytest.mark.gpu),
    pytest.param('cuda:0', torch.bfloat16, 2 ** -7, 96, marks=pytest.mark.gpu),
    pytest.param('cuda:0', torch.bfloat16, 2 ** -7, 3, marks=pytest.mark.gpu)])
def test_compiled_lrn_gradient_is_the_float64_gradient(device, dtype, tol, C):
    """Compiled, the LRN's values and input gradient are those of the formula in float64 from
    the same inputs, up to float32 arithmetic and, in bf16, one rounding of the result: 96
    channels (each end of the window) and 3 (fewer than a window), channels-last as in the
    network. (A custom autograd.Function in its place once compiled to a zero gradient in
    float32 on a GPU: the backward was traced into the forward graph.)"""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(2, C, 6, 5, generator=g) * 30).to(dtype)
    gy = torch.randn(2, C, 6, 5, generator=g).to(dtype)
    x64 = x.double().requires_grad_()
    want_y = lrn(x64)
    want_y.backward(gy.double())
    xi = x.to(device).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = torch.compile(lrn, dynamic=False)(xi)
    y.backward(gy.to(device).contiguous(memory_format=torch.channels_last))
    for got, want in ((y, want_y.detach()), (xi.grad, x64.grad)):
        torch.testing.assert_close(got.detach().cpu().double(), want, rtol=tol,
                                   atol=tol * want.abs().max().item())


@pytest.mark.parametrize('shape', [(2, 5, 55, 55), (2, 4, 27, 27), (1, 3, 13, 13), (2, 3, 14, 16),
                                   (3, 96, 55, 55), (2, 128, 27, 27)])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('device, dtype', [
    ('cpu', torch.float64),
    pytest.param('cuda:0', torch.float32, marks=pytest.mark.gpu),
    pytest.param('cuda:0', torch.bfloat16, marks=pytest.mark.gpu)])
def test_pool_by_codes_is_torch_max_pool(shape, channels_last, device, dtype):
    """Values and gradients equal F.max_pool2d's, ties included (small integers tie often; the
    gradient must go to the same, first, element of a window). On a GPU the backward is
    fused_layers' kernel, on the CPU the composition."""
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randint(-3, 4, shape, generator=g).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = F.max_pool2d(x1, 3, 2), MaxPoolByCodes.apply(x2)
    assert torch.equal(y1, y2)
    # integers: sums are exact, in bf16 too
    gy = torch.randint(-5, 6, y1.shape, generator=g).to(device, dtype)
    y1.backward(gy)
    y2.backward(gy)
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.slow
@pytest.mark.parametrize('device, dtype, size', [
    ('cpu', torch.float32, 27),
    pytest.param('cuda:0', torch.float32, 27, marks=pytest.mark.gpu),
    pytest.param('cuda:0', torch.bfloat16, 55, marks=pytest.mark.gpu),
    pytest.param('cuda:0', torch.bfloat16, 14, marks=pytest.mark.gpu)])
def test_compiled_max_pool_is_torch_max_pool(device, dtype, size):
    """Compiled, max_pool is MaxPoolByCodes (its backward one Triton kernel on a GPU); the same
    values and gradients as eager, bit for bit: small integers, many ties, sums exact in bf16;
    an even size leaves the last row and column in no window."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (2, 6, size, size), generator=g).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    out = (size - 3) // 2 + 1
    gy = torch.randint(-5, 6, (2, 6, out, out), generator=g).to(device, dtype)
    grads = []
    for fn in (max_pool, torch.compile(max_pool, dynamic=False)):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.backward(gy)
        grads.append((y.detach(), xi.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize('C, k, stride, H, Wd', [(3, 11, 4, 227, 227), (3, 7, 3, 30, 31),
                                                 (2, 4, 4, 17, 16)])
def test_conv_by_blocks_is_conv2d(C, k, stride, H, Wd):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, C, H, Wd, generator=g, dtype=torch.float64)
    W = torch.randn(5, C, k, k, generator=g, dtype=torch.float64, requires_grad=True)
    want = F.conv2d(x, W, stride=stride)
    got = conv_by_blocks(x.contiguous(memory_format=torch.channels_last), W, stride)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    gy = torch.randn(want.shape, generator=g, dtype=torch.float64)
    gW_want, = torch.autograd.grad(want, W, gy)
    gW_got, = torch.autograd.grad(got, W, gy)
    torch.testing.assert_close(gW_got, gW_want, rtol=1e-12, atol=1e-12)


CONV_SHAPES = [(48, 96, 3, 0, 9), (48, 128, 5, 2, 9), (256, 384, 3, 1, 5), (192, 128, 3, 1, 6)]


@pytest.mark.parametrize('compiled', [False, True])
@pytest.mark.parametrize('C, O, k, pad, H, by_forward', [
    *[(*shape, (True, True)) for shape in CONV_SHAPES],
    (*CONV_SHAPES[2], (True, False)), (*CONV_SHAPES[2], (False, True))])
def test_conv_grads_by_forward_are_conv2d_grads(C, O, k, pad, H, by_forward, compiled):
    """The gradients of x and W, by forward convolutions (both, or one and the other as PyTorch
    computes it), are F.conv2d's, in float64, eager and compiled; channels-last input as the
    step has it (AlexNet's stride-1 layer shapes: conv1 over blocks, conv2, conv3, conv5's
    groups)."""
    g = torch.Generator().manual_seed(C + k)
    x = torch.randn(3, C, H, H, generator=g, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    W = torch.randn(O, C, k, k, generator=g, dtype=torch.float64, requires_grad=True)
    want = F.conv2d(x, W, padding=pad)
    def conv(x, W, pad):
        return ConvGradsByForward.apply(x, W, pad, *by_forward)
    if compiled:
        torch._dynamo.reset()
        conv = torch.compile(conv, dynamic=False)
    got = conv(x, W, pad)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    gy = torch.randn(want.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, (x, W), gy), torch.autograd.grad(want, (x, W), gy)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_grads_by_forward_names_the_networks_convolutions():
    """Every kernel shape in layers.FP32_GRADS_BY_FORWARD is one the network convolves with at
    stride 1 (a shape the network does not have would silently choose nothing)."""
    from torch.overrides import TorchFunctionMode
    import layers
    from alex_net import FIRST_FC, LAYERS, features

    class Record(TorchFunctionMode):
        shapes = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.conv2d and kwargs.get('stride', 1) == 1:
                self.shapes.add(tuple(args[1].shape[:3]))
            return func(*args, **kwargs)
    params = [(torch.empty(l.n_out, l.n_in // l.groups, l.kernel, l.kernel, device='meta'),
               torch.empty(l.n_out, device='meta')) for l in LAYERS[:FIRST_FC]]
    with Record() as rec:
        features(params, torch.empty(1, 3, 227, 227, device='meta'))
    assert set(layers.FP32_GRADS_BY_FORWARD) <= rec.shapes, rec.shapes
    assert len(rec.shapes) == 5, rec.shapes


@pytest.mark.gpu
@pytest.mark.parametrize('C, O, k, pad, H', CONV_SHAPES)
def test_conv_grads_by_forward_on_the_gpu_are_the_float64_grads(C, O, k, pad, H):
    """On the GPU in strict float32 (cuDNN's FFT and Winograd algorithms among the choices):
    the gradients within float32 rounding of the float64 ones: as close as cuDNN's own forward
    convolution (the same algorithms) or its own backward."""
    g = torch.Generator().manual_seed(C + k)
    x64 = torch.randn(8, C, H, H, generator=g, dtype=torch.float64)
    W64 = torch.randn(O, C, k, k, generator=g, dtype=torch.float64)
    xr, Wr = x64.clone().requires_grad_(), W64.clone().requires_grad_()
    y64 = F.conv2d(xr, Wr, padding=pad)
    gy64 = torch.randn(y64.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(y64, (xr, Wr), gy64)

    def error(a, b):
        return float((a.double().cpu() - b).norm() / b.norm())
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        errors = []
        for conv in (ConvGradsByForward.apply, lambda x, W, p: F.conv2d(x, W, padding=p)):
            x = x64.float().cuda().contiguous(memory_format=torch.channels_last)
            W = W64.float().cuda().requires_grad_()
            x.requires_grad_()
            y = conv(x, W, pad)
            got = torch.autograd.grad(y, (x, W), gy64.float().cuda())
            errors.append([error(y.detach(), y64.detach())]
                          + [error(a, b) for a, b in zip(got, want)])
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    ours, cudnns = errors
    assert max(ours) < 1e-5, errors
    noise = max(cudnns)         # cuDNN's own: forward, input and weight gradient
    assert max(ours[1:]) <= 10 * noise, errors


@pytest.mark.parametrize('C, groups, stride, pad, pool', [(3, 1, 4, 0, True), (8, 2, 1, 2, True),
                                                          (8, 2, 1, 1, False)])
def test_conv_pool_relu_is_the_original_order(C, groups, stride, pad, pool):
    """relu(pool(conv + b)) against the original's pool(relu(conv + b)): the same values, and
    the same gradients of W, b and x."""
    g = torch.Generator().manual_seed(C + groups)
    x = torch.randn(2, C, 31, 31, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, C // groups, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = (torch.randn(6, generator=g, dtype=torch.float64) * 8).requires_grad_()   # some all-0
    want = F.relu(F.conv2d(x, W, b, stride=stride, padding=pad, groups=groups))
    if pool:
        want = F.max_pool2d(want, 3, 2)
    got = conv_pool_relu(x, W, b, stride, pad, groups, pool)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (want == 0).any() and (want > 0).any()
    gy = torch.randn(want.shape, generator=g, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad(got, (x, W, b), gy),
                    torch.autograd.grad(want, (x, W, b), gy)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


# -- a float64 NumPy forward of the original layer math, from original-layout parameters --------
def np_conv_true(x, W, stride, pad):
    """True convolution (kernels flipped, as cuDNN's conv mode) of x (C, H, W) with W in the
    original (in, kh, kw, out) layout."""
    cin, kh, kw, cout = W.shape
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    Wf = W[:, ::-1, ::-1, :]  # convolution = correlation with the flipped kernel
    cols = np.empty((ho, wo, cin, kh, kw))
    for u in range(kh):
        for v in range(kw):
            cols[:, :, :, u, v] = x[:, u:u + stride * ho:stride, v:v + stride * wo:stride] \
                .transpose(1, 2, 0)
    return np.tensordot(cols, Wf, axes=([2, 3, 4], [0, 1, 2])).transpose(2, 0, 1)


def np_pool(x):
    c, h, w = x.shape
    o = (h - 3) // 2 + 1
    out = np.full((c, o, o), -np.inf)
    for u in range(3):
        for v in range(3):
            out = np.maximum(out, x[:, u:u + 2 * o:2, v:v + 2 * o:2])
    return out


def np_alexnet_test(x, P):
    """Test-time output probabilities (softmax) for one image x (3, 227, 227)."""
    relu = lambda a: np.maximum(a, 0)
    P = {k: v.astype(np.float64) for k, v in P.items()}

    def conv(x, i, stride, pad, groups):
        if groups == 1:
            return relu(np_conv_true(x, P[f'W_{i}'], stride, pad)
                        + P[f'b_{i}'][:, None, None])
        h = x.shape[0] // 2
        return np.concatenate([relu(np_conv_true(x[g * h:(g + 1) * h], P[f'W{g}_{i}'], stride, pad)
                                    + P[f'b{g}_{i}'][:, None, None]) for g in (0, 1)])
    x = np_lrn(np_pool(conv(x, 0, 4, 0, 1))[None])[0]
    x = np_lrn(np_pool(conv(x, 1, 1, 2, 2))[None])[0]
    x = conv(x, 2, 1, 1, 1)
    x = conv(x, 3, 1, 1, 2)
    x = np_pool(conv(x, 4, 1, 1, 2)).reshape(-1)
    x = relu(x @ P['W_5'] + P['b_5']) * 0.5   # original test-time dropout scaling
    x = relu(x @ P['W_6'] + P['b_6']) * 0.5
    z = x @ P['W_7'] + P['b_7']
    e = np.exp(z - z.max())
    return e / e.sum()


@pytest.mark.slow
def test_original_parameters_give_the_original_function(tmp_path):
    rng = np.random.RandomState(7)
    P = {}
    for p in PARAMS:  # random, with scales that keep every layer active and LRN non-trivial
        std = {0: 0.05, 1: 0.02, 2: 0.02, 3: 0.03, 4: 0.03, 5: 0.02, 6: 0.03, 7: 0.05}[p.layer]
        P[p.name] = (rng.randn(*p.original_shape) * (std if p.is_weight else 0.1)
                     ).astype(np.float32)
    for p in PARAMS:  # write them in the original snapshot format, then load as a snapshot
        np.save(tmp_path / f'{p.name}_5.npy', P[p.name])
    net = AlexNet('cpu', init=False)
    load_snapshot(str(tmp_path), 5, net, with_momentum=False)
    x = (rng.randn(2, 3, 227, 227) * 50).astype(np.float32)
    with torch.no_grad():
        got = torch.softmax(net.forward(torch.from_numpy(x)).double(), 1).numpy()
    for i in range(2):
        want = np_alexnet_test(x[i].astype(np.float64), P)
        assert want.max() > 0.01 and want.min() < 0.001  # a non-trivial output
        np.testing.assert_allclose(got[i], want, rtol=2e-3, atol=1e-6)


@pytest.mark.slow
def test_snapshot_round_trip(tmp_path):
    net = AlexNet('cpu')
    with torch.no_grad():
        net.momentum.copy_(torch.randn(N_PARAMS))
    save_snapshot(str(tmp_path), 3, net, lr=0.001)
    other = AlexNet('cpu', init=False)
    lr = load_snapshot(str(tmp_path), 3, other)
    assert lr == pytest.approx(0.001)
    assert torch.equal(net.state, other.state)
    assert not list(tmp_path.glob('*.tmp*'))
    assert np.load(tmp_path / 'W_0_3.npy').shape == (3, 11, 11, 96)
    assert np.load(tmp_path / 'mom_21_3.npy').shape == (1000,)


@pytest.mark.parametrize('mode', ['momentum', 'nesterov', 'none'])
def test_update_step_against_hand_arithmetic(mode):
    mu, wd, lr = 0.9, 0.0005, 0.01
    n_w = 3
    params = torch.tensor([0.5, -1.0, 2.0, 0.3, -0.2])       # 3 weights, 2 biases
    grad = torch.tensor([0.1, 0.2, -0.3, 0.4, -0.5])
    mom = torch.tensor([0.01, -0.02, 0.03, -0.04, 0.05])
    p0, v0 = params.double().numpy().copy(), mom.double().numpy().copy()
    sgd_update_(params, grad, mom, lr, n_w, mu, wd, use_momentum=mode != 'none',
                nesterov=mode == 'nesterov')
    g = grad.double().numpy()
    # a weight: g' = g + wd*W, step lr; a bias: g' = g, step 2*lr
    gp = np.concatenate([g[:3] + wd * p0[:3], g[3:]])
    step = np.array([lr] * 3 + [2 * lr] * 2)
    if mode == 'momentum':
        v = mu * v0 - step * gp
        w = p0 + v
    elif mode == 'nesterov':
        v = mu ** 2 * v0 - (1 + mu) * step * gp
        w = p0 + v
    else:
        v, w = v0, p0 - step * gp
    np.testing.assert_allclose(params.numpy(), w, rtol=1e-6)
    np.testing.assert_allclose(mom.numpy(), v, rtol=1e-6)
    # e.g. the first weight with momentum: 0.9*0.01 - 0.01*(0.1 + 0.0005*0.5) = 0.0079975
    if mode == 'momentum':
        assert mom[0].item() == pytest.approx(0.0079975, abs=1e-7)
        assert params[3].item() == pytest.approx(0.3 + (0.9 * -0.04 - 0.02 * 0.4), abs=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize('mode, written', [('momentum', (0, 0)), ('nesterov', (0, 0)),
                                           ('none', (0, 0)), ('momentum', (1500, 4000))])
def test_fused_update_is_the_rule(mode, written):
    """The one-pass Triton update equals sgd_step_ (eager, the rule as written) on buffers of
    several blocks whose weight/bias boundary falls inside a block, at two rates of one tensor;
    the gradients zeroed but for the part `written` (inside blocks at both ends)."""
    from alexnet_lib import fused_update
    dev = torch.device('cuda:0')
    n, n_w = 5 * fused_update.BLOCK + 77, 3 * fused_update.BLOCK + 1000
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(n, generator=gen).to(dev) * s for s in (0.1, 0.01, 0.01)]
    lr = torch.tensor(0.01, device=dev)
    ours, rule = [x.clone() for x in start], [x.clone() for x in start]
    for rate in (0.01, 0.003):
        lr.fill_(rate)
        ours[1].copy_(start[1])           # this step's gradients, the same for both
        rule[1].copy_(start[1])
        fused_update.sgd_step_(*ours, lr, n_w, 0.9, 0.0005, use_momentum=mode != 'none',
                               nesterov=mode == 'nesterov', written=written)
        sgd_step_(*rule, lr, n_w, 0.9, 0.0005, use_momentum=mode != 'none',
                  nesterov=mode == 'nesterov', written=written)
    change = (rule[0] - start[0]).abs().max()
    # float32 rounding of the same operations (a fused multiply-add may round once less)
    torch.testing.assert_close(ours[0], rule[0], rtol=2.5e-7, atol=1e-6 * change.item())
    torch.testing.assert_close(ours[2], rule[2], rtol=2.5e-7, atol=1e-6 * change.item())
    lo, hi = written                      # zeroed for the next backward pass, but for those
    assert not ours[1][:lo].any() and not ours[1][hi:].any()
    assert torch.equal(ours[1][lo:hi], start[1][lo:hi])


def test_learning_rate_policies():
    cfg = {'lr_policy': 'step', 'lr_step': [20, 40], 'lr_adapt_threshold': 0.01}
    lrs, lr = [], 0.01
    for epoch in range(1, 45):
        lrs.append(lr)
        lr = adjust_learning_rate(cfg, epoch, lr, [])
    assert lrs[19] == 0.01 and lrs[20] == pytest.approx(0.001) and lrs[40] == pytest.approx(1e-4)
    cfg['lr_policy'] = 'auto'
    assert adjust_learning_rate(cfg, 5, 0.01, [0.5, 0.5, 0.5]) == 0.01      # not before epoch 6
    assert adjust_learning_rate(cfg, 6, 0.01, [0.5, 0.499, 0.495]) == pytest.approx(0.001)
    assert adjust_learning_rate(cfg, 6, 0.01, [0.5, 0.45, 0.40]) == 0.01


def test_benchs_plain_peer_is_this_network():
    """bench.py's peer, this network written plainly with torch.nn, has this network's
    parameters, layer by layer (a fair comparison of speed)."""
    import bench
    from alex_net import LAYERS
    plain = [m for m in bench.plain_alexnet() if isinstance(m, (torch.nn.Conv2d,
                                                                   torch.nn.Linear))]
    assert len(plain) == len(LAYERS)
    for i, m in enumerate(plain):
        assert m.weight.numel() + m.bias.numel() == sum(p.size for p in PARAMS if p.layer == i)
