"""The MNIST data of dual_mlp.py: a real mnist.pkl.gz read by an unpickler that admits NumPy
arrays and nothing else (a pickle cannot run code while it is read), checked for the format
((train_x, train_y), (valid_x, valid_y), (test_x, test_y)), x float32 in [0, 1] with 784
columns, labels 0..9; or, without a file, the real digit images that ship with scikit-learn in
that format.

    (train_x, train_y), valid, test = load_data('mnist.pkl.gz')   # or load_data(None)
"""
import gzip
import io
import pickle
import zlib

import numpy as np

EMBEDDED_BATCH = 100                 # the minibatch of the embedded digits (see dual_mlp.py)
EMBEDDED_SPLIT = (1000, 397, 400)    # their train / validation / test images
N_IN, N_OUT = 28 * 28, 10


class DatasetError(ValueError):
    """The dataset file is not an MNIST pickle of the expected layout."""


def _numpy_reconstruct():
    try:
        from numpy._core import multiarray
    except ImportError:           # NumPy 1.x
        from numpy.core import multiarray
    return multiarray._reconstruct


def _numpy_frombuffer():
    try:
        from numpy._core import numeric
    except ImportError:
        from numpy.core import numeric
    return numeric._frombuffer


class _Refused(pickle.UnpicklingError):
    """A global the restricted unpickler does not admit."""


class RestrictedUnpickler(pickle.Unpickler):
    """Builds NumPy arrays (as pickled by Python 2 or 3) and plain containers; refuses every
    other global, so a pickle cannot run code while it is read."""

    def find_class(self, module, name):
        if name == '_reconstruct' and module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
            return _numpy_reconstruct()
        if name == '_frombuffer' and module in ('numpy.core.numeric', 'numpy._core.numeric'):
            return _numpy_frombuffer()                  # protocol 5
        if module == 'numpy' and name in ('ndarray', 'dtype'):
            return getattr(np, name)
        if module == '_codecs' and name == 'encode':   # how Python 3 writes bytes at protocol 2
            import _codecs
            return _codecs.encode
        raise _Refused(f'refusing to load {module}.{name}: this file may only hold NumPy arrays')


def loads_arrays(data):
    """The object pickled in ``data``, by RestrictedUnpickler: NumPy arrays and plain values
    (also what make_hkl.py's decoding processes send back)."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


MNIST_FORMAT = ('--dataset must be the gzip pickle mnist.pkl.gz of ((train_x, train_y), '
                '(valid_x, valid_y), (test_x, test_y))')


def load_mnist_pickle(path):
    """((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) from an mnist.pkl.gz (a pickle
    that is not compressed is read too). Raises DatasetError naming the file."""
    gz = _is_gzip(path)
    try:
        with (gzip.open if gz else open)(path, 'rb') as f:
            obj = RestrictedUnpickler(f, encoding='latin1').load()
    except _Refused as e:
        raise DatasetError(f'{path}: {e}') from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        if gz:
            raise DatasetError(f'{path} is a damaged or truncated gzip file ({_why(e)}): '
                               f'{MNIST_FORMAT}') from None
        raise DatasetError(f'{path} is neither gzip-compressed nor a pickle: '
                           f'{MNIST_FORMAT}') from None
    except Exception:    # whatever the bytes make the unpickler stumble on
        what = ('gzip-compressed but holds no pickle' if gz else
                'neither gzip-compressed nor a pickle')
        raise DatasetError(f'{path} is {what}: {MNIST_FORMAT}') from None
    try:
        return check_dataset(obj, path)
    except DatasetError as e:
        if gz:
            raise
        why = str(e)[len(f'{path}: '):]
        raise DatasetError(f'{path} is a pickle that is not gzip-compressed nor MNIST ({why}): '
                           f'{MNIST_FORMAT}') from None


def _why(e):
    return f'{type(e).__name__}: {e}' if str(e) else type(e).__name__


def _is_gzip(path):
    with open(path, 'rb') as f:
        return f.read(2) == b'\x1f\x8b'


def check_dataset(obj, where):
    if not (isinstance(obj, (tuple, list)) and len(obj) == 3):
        raise DatasetError(f'{where}: expected a tuple (train, valid, test), got {_describe(obj)}')
    out = []
    for name, part in zip(('train', 'valid', 'test'), obj):
        if not (isinstance(part, (tuple, list)) and len(part) == 2):
            raise DatasetError(f'{where}: the {name} set should be a pair (x, y), '
                               f'got {_describe(part)}')
        x, y = part
        if (not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2
                or x.shape[1] != N_IN):
            raise DatasetError(f'{where}: {name} x should be a float32 array of shape '
                               f'(n, {N_IN:d}), got {_describe(x)}')
        if not isinstance(y, np.ndarray) or y.dtype.kind not in 'iu' or y.shape != (x.shape[0],):
            raise DatasetError(f'{where}: {name} y should be an integer array of shape '
                               f'({x.shape[0]:d},), got {_describe(y)}')
        if x.shape[0] == 0:
            raise DatasetError(f'{where}: the {name} set is empty')
        if not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
            raise DatasetError(f'{where}: {name} x should lie in [0, 1] '
                               f'(min {np.nanmin(x):g}, max {np.nanmax(x):g})')
        if y.min() < 0 or y.max() >= N_OUT:
            raise DatasetError(f'{where}: {name} labels should be 0..9, '
                               f'got {y.min():d}..{y.max():d}')
        out.append((np.ascontiguousarray(x), y.astype(np.int64)))
    return tuple(out)


def _describe(v):
    if isinstance(v, np.ndarray):
        return f'{v.dtype} array of shape {v.shape}'
    if isinstance(v, (tuple, list)):
        return f'{type(v).__name__} of length {len(v)}'
    return type(v).__name__


def embedded_digits():
    """MNIST-format data from scikit-learn's 1797 real 8x8 handwritten digits."""
    import torch
    from sklearn.datasets import load_digits
    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    big = torch.nn.functional.interpolate(images, size=(28, 28), mode='bilinear',
                                          align_corners=False)
    x = big.clamp_(0.0, 1.0).reshape(len(images), N_IN).numpy().astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.RandomState(0).permutation(len(x))
    x, y = x[order], y[order]
    a, b, _ = EMBEDDED_SPLIT
    return check_dataset(((x[:a], y[:a]), (x[a:a + b], y[a:a + b]), (x[a + b:], y[a + b:])),
                         'embedded digits')


def load_data(dataset):
    return embedded_digits() if dataset is None else load_mnist_pickle(dataset)
