"""The two-GPU MNIST MLP of the original theano_multi_gpu repository (docs/design.md), on PyTorch.

    python dual_mlp.py A B [--dataset mnist.pkl.gz] [--epochs 10] [--batch-size 5000] [--lr 0.13]

A and B are GPU indices (or ``cpu``). Two processes build the deeplearning.net tutorial MLP
(784 -> 500 tanh -> 10 softmax, RandomState(1234)), cost NLL + 0*L1 + 1e-4*L2^2, plain SGD. Of
each pair of minibatches process 0 trains the first and process 1 the second; then they average
their parameters through exchange.py, the same code as the AlexNet trainer uses (peer-to-peer
copies between GPUs, shared host memory on the CPU). Process 0 prints the validation error every
epoch, then epochs per second, the total time and the test error of the final parameters; the
last line of the output is one JSON object {"val_error", "test_error", "epochs_per_s"}.

``--one-process`` trains in this process alone, applying the averaged update of each pair of
minibatches: the reference the two processes must match, and the one-GPU timing.

Data: ``--dataset`` names a real ``mnist.pkl.gz`` (gzip pickle of ((train_x, train_y),
(valid_x, valid_y), (test_x, test_y)), x float32 in [0, 1] with 784 columns), read with an
unpickler that admits NumPy arrays and nothing else (alexnet_lib/mnist.py). Without it the
script uses the real digit images that ship with scikit-learn (1797 8x8 images, upscaled to
28x28, 1000/397/400 split) and, unless --batch-size is given, a batch of 100: the original's
50000/5000 gave 10 minibatches an epoch, and so does 1000/100 (5000 would leave no full
minibatch at all).
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

from alexnet_lib import exchange_backends
from alexnet_lib.config import ConfigError, parse_device, resolve_device
from alexnet_lib.files import atomic_write
from alexnet_lib.mnist import (EMBEDDED_BATCH, EMBEDDED_SPLIT, N_IN, N_OUT, DatasetError,
                               load_data, load_mnist_pickle)

DEFAULTS = dict(epochs=10, batch_size=5000, lr=0.13, l1_reg=0.0, l2_reg=1e-4, n_hidden=500,
                seed=1234)


# ----------------------------------------------------------------------------------------------
# the model: parameters live in one flat buffer [W1, b1, W2, b2], the unit of exchange

def param_shapes(n_hidden):
    return [(N_IN, n_hidden), (n_hidden,), (n_hidden, N_OUT), (N_OUT,)]


def init_params(n_hidden, seed):
    """The tutorial's initialisation: W1 ~ U(+-sqrt(6/(n_in+n_out))) from RandomState(seed),
    b1, W2, b2 zero. Returns a flat float32 numpy array."""
    rng = np.random.RandomState(seed)
    bound = np.sqrt(6.0 / (N_IN + n_hidden))
    w1 = rng.uniform(low=-bound, high=bound, size=(N_IN, n_hidden)).astype(np.float32)
    parts = [w1, np.zeros(n_hidden, np.float32), np.zeros((n_hidden, N_OUT), np.float32),
             np.zeros(N_OUT, np.float32)]
    return np.concatenate([p.reshape(-1) for p in parts])


def split(flat, n_hidden):
    out, i = [], 0
    for shape in param_shapes(n_hidden):
        n = int(np.prod(shape))
        out.append(flat[i:i + n].view(shape))
        i += n
    return out


def sgd_step(flat, x, y, cfg):
    """flat <- flat - lr * d(cost)/d(flat) for one minibatch, in place."""
    import torch
    import torch.nn.functional as F
    p = flat.detach().requires_grad_(True)
    w1, b1, w2, b2 = split(p, cfg['n_hidden'])
    logits = torch.tanh(x @ w1 + b1) @ w2 + b2
    cost = F.cross_entropy(logits, y)
    if cfg['l1_reg']:
        cost = cost + cfg['l1_reg'] * (w1.abs().sum() + w2.abs().sum())
    if cfg['l2_reg']:
        cost = cost + cfg['l2_reg'] * ((w1 * w1).sum() + (w2 * w2).sum())
    (grad,) = torch.autograd.grad(cost, p)
    flat.add_(grad, alpha=-cfg['lr'])


def error_rate(flat, x, y, cfg):
    import torch
    with torch.no_grad():
        w1, b1, w2, b2 = split(flat, cfg['n_hidden'])
        pred = (torch.tanh(x @ w1 + b1) @ w2 + b2).argmax(1)
        return float((pred != y).float().mean().item())


# ----------------------------------------------------------------------------------------------
# training

def cpu_command(one_process):
    """How to run this script on the CPU, for the messages about devices."""
    return ("'python dual_mlp.py cpu --one-process'" if one_process else
            "'python dual_mlp.py cpu cpu'") + ' to run on the CPU'


def device_of(cfg, rank):
    return resolve_device(cfg['devices'][rank], 'device',
                          cpu_hint=cpu_command(cfg.get('one_process', False)))


def train(cfg, rank=0, world=1, exchanger=None, log=print, data=None):
    """Train; with world == 2 this is process `rank` of the pair (exchanger given), with
    world == 1 the one-process reference. data: load_data's result (default: loaded here).
    Returns (flat parameters on the CPU, result dict)."""
    import torch
    device = device_of(cfg, rank)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    else:    # a 'cpu' device is half the machine, in either mode: the comparison stays fair
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    (tx, ty), (vx, vy), (sx, sy) = data or load_data(cfg['dataset'])
    to = lambda a: torch.from_numpy(a).to(device)
    tx, ty, vx, vy, sx, sy = map(to, (tx, ty, vx, vy, sx, sy))
    flat = to(init_params(cfg['n_hidden'], cfg['seed']))
    bs = cfg['batch_size']
    n_batches = tx.shape[0] // bs
    n_pairs = n_batches // 2
    if n_pairs == 0:
        raise ValueError(f'{tx.shape[0]:d} training images make {n_batches:d} minibatch(es) of '
                         f'{bs:d}: need at least 2 (use a smaller --batch-size)')
    if rank == 0 and n_batches % 2:
        log('(the last minibatch of each epoch has no partner and is skipped)')
    batch = lambda i: (tx[i * bs:(i + 1) * bs], ty[i * bs:(i + 1) * bs])
    # warm-up, not timed and without effect on the parameters: CUDA/cuBLAS start-up, and the
    # exchange's first call (registration) on a copy that is the same on both replicas
    scratch = flat.clone()
    sgd_step(scratch, *batch(0), cfg)
    error_rate(scratch, vx[:bs], vy[:bs], cfg)
    if exchanger is not None:
        scratch.copy_(flat)
        exchanger.average_(scratch)
        exchanger.barrier()
    del scratch
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    sync()
    start = time.perf_counter()
    val_error = None
    for epoch in range(1, cfg['epochs'] + 1):
        for k in range(n_pairs):
            if world == 2:
                sgd_step(flat, *batch(2 * k + rank), cfg)
                exchanger.average_(flat)
            else:        # the averaged update of the pair, computed here alone
                p0, p1 = flat.clone(), flat.clone()
                sgd_step(p0, *batch(2 * k), cfg)
                sgd_step(p1, *batch(2 * k + 1), cfg)
                p0.add_(p1)
                torch.div(p0, 2, out=flat)
        if rank == 0:
            val_error = error_rate(flat, vx, vy, cfg)
            log(f'epoch {epoch:d}, minibatch {2 * n_pairs:d}/{n_batches:d}, '
                f'validation error {val_error * 100.0:f} %')
    sync()
    seconds = time.perf_counter() - start
    if exchanger is not None:
        exchanger.check_identical(flat, 'parameters')
    result = None
    if rank == 0:
        test_error = error_rate(flat, sx, sy, cfg)
        eps = cfg['epochs'] / seconds
        log(f"The code run for {cfg['epochs']:d} epochs, with {eps:f} epochs/sec "
            f"({seconds / cfg['epochs']:.4f} s per epoch)")
        log(f'The code for file {os.path.basename(__file__)} ran for {seconds:.1f}s')
        log(f'test error of the final parameters {test_error * 100.0:f} %')
        result = {'val_error': val_error, 'test_error': test_error, 'epochs_per_s': eps}
    return flat.cpu(), result


def _worker(rank, world, cfg_json):
    """One of the two processes (started by launch.spawn)."""
    from alexnet_lib import exchange
    cfg = json.loads(cfg_json)
    device = device_of(cfg, rank)
    log = (lambda s: print(s, flush=True)) if rank == 0 else (lambda s: None)
    ex = exchange.make_exchanger(cfg['exchange'], rank, world, device, port=cfg['port'],
                                 timeout=cfg['timeout'])
    try:
        log(f'exchange: {ex.kind} ({exchange_backends.get(ex.kind).description})')
        flat, result = train(cfg, rank, world, ex, log)
        if rank == 0:
            _write_outputs(cfg, flat, result)
    finally:
        ex.close()


def _write_outputs(cfg, flat, result):
    if cfg.get('save_params'):
        np.save(cfg['save_params'], flat.numpy())
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(result, f)
    atomic_write(cfg['result_file'], write)


class UsageError(ValueError):
    """A bad command-line value: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose own errors (an unknown option, a word that is no number) are one line."""

    def error(self, message):
        raise UsageError(f'{message} (python dual_mlp.py --help lists the options)')


def build_parser():
    ap = _Parser(prog='dual_mlp.py', description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('devices', nargs='*', metavar='DEVICE',
                    help='two GPU indices (0 1), or cpu cpu; one with --one-process (default: '
                         '0 1 with two GPUs, else cpu cpu)')
    ap.add_argument('--dataset', metavar='FILE',
                    help='the gzip pickle mnist.pkl.gz of the deeplearning.net tutorial '
                         '(default: the embedded scikit-learn digits)')
    ap.add_argument('--epochs', type=int, default=DEFAULTS['epochs'],
                    help=f"passes over the training set, at least 1 (default {DEFAULTS['epochs']})")
    ap.add_argument('--batch-size', type=int, default=None, metavar='N',
                    help=f"minibatch of each process, at least 1; an epoch needs two "
                         f"(default {DEFAULTS['batch_size']}; {EMBEDDED_BATCH} with the "
                         f"embedded digits)")
    ap.add_argument('--lr', type=float, default=DEFAULTS['lr'],
                    help=f"learning rate of the plain SGD, positive (default {DEFAULTS['lr']})")
    ap.add_argument('--one-process', action='store_true',
                    help='train in one process on the first device, applying the averaged update '
                         'of each pair of minibatches (the reference; the one-GPU timing)')
    ap.add_argument('--exchange', default='auto', choices=['auto', *exchange_backends.NAMES],
                    help='how the two processes average their parameters: {}; auto: {} between '
                         'GPUs, {} otherwise (default auto)'.format(
                             '; '.join(f'{b.name}{" (GPUs)" * b.needs_gpus}: {b.description}'
                                       for b in exchange_backends.BACKENDS.values()),
                             exchange_backends.ORIGINAL, _ORIGINAL_ON_CPU))
    ap.add_argument('--port', type=int, default=None,
                    help='rendezvous port of the two processes, 1..65535 (default: a free one)')
    ap.add_argument('--timeout', type=float, default=120.0, metavar='SECONDS',
                    help='how long a process waits for its peer (default 120)')
    ap.add_argument('--save-params', metavar='FILE.npy',
                    help='save the final parameters there, one flat float32 array '
                         '[W1, b1, W2, b2] (default: not saved)')
    return ap


def check_args(args):
    """The command line's values, checked before anything starts: (devices, batch size or None
    for the default). Raises UsageError."""
    devices = args.devices
    if not devices:
        import torch
        devices = ['0', '1'] if torch.cuda.device_count() >= 2 else ['cpu', 'cpu']
        print('devices: {} (none given)'.format(' '.join(devices)))
    if len(devices) != (1 if args.one_process and len(devices) == 1 else 2):
        raise UsageError(f"give two devices (GPU indices, or cpu cpu), or one with "
                         f"--one-process; got {len(devices)}: {' '.join(devices) or 'none'}")
    if args.epochs < 1:
        raise UsageError(f'--epochs {args.epochs}: must be at least 1')
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f'--batch-size {args.batch_size}: must be at least 1 (leave it out for '
                         f"the default: {DEFAULTS['batch_size']}, {EMBEDDED_BATCH} with the "
                         'embedded digits)')
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f'--lr {args.lr:g}: must be a positive number (default '
                         f"{DEFAULTS['lr']})")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f'--timeout {args.timeout:g}: must be a positive number of seconds')
    if args.port is not None and not 1 <= args.port <= 65535:
        raise UsageError(f'--port {args.port}: must be a port number 1..65535 (leave it out for '
                         'a free one)')
    if args.dataset is not None:
        if os.path.isdir(args.dataset):
            raise UsageError(f'--dataset {args.dataset} is a folder: give the file mnist.pkl.gz')
        if not os.path.isfile(args.dataset):
            raise UsageError(f'--dataset {args.dataset}: no such file')
    if args.save_params:
        folder = os.path.dirname(os.path.abspath(args.save_params))
        if not os.path.isdir(folder):
            raise UsageError(f'--save-params {args.save_params}: folder {folder} does not exist '
                             '(create it first)')
    for d in devices:
        try:
            parse_device(d, 'device')
        except ConfigError as e:
            raise UsageError(str(e)) from None
    if not args.one_process:
        args.exchange = auto_exchange(args.exchange, devices)
        problem = exchange_backends.run_problem(args.exchange, 'weights', 'fp32',
                                                [parse_device(d) for d in devices],
                                                lambda name: f'--exchange {name}')
        if problem:
            raise UsageError(f'{problem} (or leave it out)')
    for d in devices[:1] if args.one_process else devices:
        try:
            resolve_device(d, 'device', cpu_hint=cpu_command(args.one_process))
        except ConfigError as e:
            raise UsageError(str(e)) from None
    return devices


_ORIGINAL_ON_CPU = exchange_backends.get(exchange_backends.ORIGINAL).fallback


def auto_exchange(choice, devices):
    """--exchange auto: the original's exchange between GPUs, its fallback with a CPU."""
    if choice != 'auto':
        return choice
    gpus = all(parse_device(d) != 'cpu' for d in devices)
    return exchange_backends.ORIGINAL if gpus else _ORIGINAL_ON_CPU


def check_batch_size(batch_size, n_train):
    """An epoch is pairs of minibatches: at least one pair must fit the training set."""
    if 2 * batch_size > n_train:
        raise UsageError(f'--batch-size {batch_size}: {n_train} training images make '
                         f'{n_train // batch_size} minibatch(es) of {batch_size}, and an epoch '
                         f'needs at least 2; use --batch-size {n_train // 2} or less')


def main(argv=None):
    try:
        return _main(argv)
    except UsageError as e:
        print(f'dual_mlp: {e}', file=sys.stderr)
        return 2


def _main(argv):
    args = build_parser().parse_args(argv)
    devices = check_args(args)
    data = None
    try:
        if args.dataset is None:
            a, b, c = EMBEDDED_SPLIT
            print('dataset: embedded scikit-learn digits (1797 real 8x8 images upscaled to '
                  f'28x28, {a}/{b}/{c} train/valid/test); use --dataset mnist.pkl.gz for MNIST')
            batch_size, n_train = args.batch_size or EMBEDDED_BATCH, a
            if args.batch_size is None:
                print(f'batch size {batch_size:d} (10 minibatches an epoch, as the original had '
                      'with MNIST and 5000)')
        else:
            print(f'dataset: {args.dataset}')
            data = load_mnist_pickle(args.dataset)   # a bad file is reported here, not by a worker
            batch_size = args.batch_size or DEFAULTS['batch_size']
            n_train = len(data[0][0])
    except DatasetError as e:
        print(f'dual_mlp: {e}', file=sys.stderr)
        return 1
    check_batch_size(batch_size, n_train)

    cfg = dict(DEFAULTS, epochs=args.epochs, batch_size=batch_size, lr=args.lr,
               dataset=args.dataset, devices=devices, exchange=args.exchange,
               timeout=args.timeout, save_params=args.save_params,
               one_process=args.one_process)
    sys.stdout.flush()
    from alexnet_lib import launch
    try:
        if args.one_process:
            print(f'one process on {parse_device(devices[0])}, averaging the updates of each '
                  'pair of minibatches')
            flat, result = train(cfg, 0, 1, None, lambda s: print(s, flush=True), data)
            if args.save_params:
                np.save(args.save_params, flat.numpy())
        else:
            del data                                   # each worker reads its own
            with tempfile.TemporaryDirectory(prefix='dual_mlp-') as tmp:
                cfg['result_file'] = os.path.join(tmp, 'result.json')
                cfg['port'] = args.port or launch.free_port()
                launch.spawn(_worker, 2, args=(json.dumps(cfg),))
                with open(cfg['result_file']) as f:
                    result = json.load(f)
    except launch.WorkerFailed as e:
        print(f'dual_mlp: {e}', file=sys.stderr)
        return 1
    print(json.dumps({'val_error': result['val_error'], 'test_error': result['test_error'],
                      'epochs_per_s': result['epochs_per_s']}), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
