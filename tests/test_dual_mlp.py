"""dual_mlp.py: the restricted unpickler and the data checks (alexnet_lib/mnist.py), and the
two-process run against the one-process reference (CPU: shared host memory; GPU: peer-to-peer
copies)."""
import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dual_mlp
from alexnet_lib import mnist
from conftest import call_main

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = str(ROOT / 'dual_mlp.py')


# ----------------------------------------------------------------------------------------------
# a pickle as Python 2's cPickle wrote mnist.pkl.gz (protocol 2, numpy.core.multiarray, str data)

def _py2_pickle(obj):
    out = [b'\x80\x02']

    def short_str(b):
        return b'U' + bytes([len(b)]) + b if len(b) < 256 else b'T' + struct.pack('<I', len(b)) + b

    def integer(i):
        return b'K' + bytes([i]) if 0 <= i < 256 else b'J' + struct.pack('<i', i)

    def emit(o):
        if isinstance(o, tuple):
            out.append(b'(')
            for x in o:
                emit(x)
            out.append(b't')
        elif isinstance(o, np.ndarray):
            a = np.ascontiguousarray(o)
            out.append(b'cnumpy.core.multiarray\n_reconstruct\n')
            out.append(b'cnumpy\nndarray\n' + integer(0) + b'\x85' + short_str(b'b') + b'\x87R')
            out.append(b'(' + integer(1))
            emit(tuple(a.shape))
            out.append(b'cnumpy\ndtype\n' + short_str(a.dtype.str[1:].encode()) + integer(0)
                       + integer(1) + b'\x87R')
            out.append(b'(' + integer(3) + short_str(b'<') + b'NNN' + integer(-1) + integer(-1)
                       + integer(0) + b'tb')
            out.append(b'\x89' + short_str(a.tobytes()) + b'tb')
        elif isinstance(o, int):
            out.append(integer(o))
        else:
            raise TypeError(type(o))
    emit(obj)
    out.append(b'.')
    return b''.join(out)


def _fake_mnist(n=(60, 20, 20), seed=0):
    rng = np.random.RandomState(seed)
    return tuple((rng.rand(k, 784).astype(np.float32), rng.randint(0, 10, k).astype(np.int64))
                 for k in n)


def _write_gz(path, data):
    with gzip.open(path, 'wb') as f:
        f.write(data)
    return str(path)


def _same(a, b):
    return all(np.array_equal(x, y) and x.dtype == y.dtype
               for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def test_reads_python2_and_python3_pickles(tmp_path):
    data = _fake_mnist()
    raw = _py2_pickle(data)
    assert b'numpy.core.multiarray' in raw
    assert _same(mnist.load_mnist_pickle(_write_gz(tmp_path / 'py2.pkl.gz', raw)), data)
    for protocol in (2, 4, 5):
        path = _write_gz(tmp_path / f'p{protocol:d}.pkl.gz', pickle.dumps(data, protocol=protocol))
        assert _same(mnist.load_mnist_pickle(path), data), protocol
    plain = tmp_path / 'plain.pkl'
    plain.write_bytes(pickle.dumps(data, protocol=2))
    assert _same(mnist.load_mnist_pickle(str(plain)), data)


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


class _Evaluates:
    def __reduce__(self):
        return (eval, ('1 + 1',))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    evil = _write_gz(tmp_path / 'evil.pkl.gz', pickle.dumps(_RunsCommand(marker), protocol=2))
    with pytest.raises(mnist.DatasetError, match=r'refusing to load (posix|os|nt)\.system'):
        mnist.load_mnist_pickle(evil)
    assert not marker.exists()
    # inside an otherwise valid dataset too, and through builtins
    data = _fake_mnist()
    nested = ((data[0][0], data[0][1]), data[1], (data[2][0], _Evaluates()))
    path = _write_gz(tmp_path / 'nested.pkl.gz', pickle.dumps(nested, protocol=2))
    with pytest.raises(mnist.DatasetError,
                       match=r'refusing to load (__builtin__|builtins)\.eval'):
        mnist.load_mnist_pickle(path)
    # the command line says so and exits 1 (a bad file) before starting any worker
    assert dual_mlp.main(['cpu', 'cpu', '--dataset', evil]) == 1
    assert not marker.exists()


@pytest.mark.parametrize('change,complaint', [
    (lambda d: ((d[0][0].astype(np.float64), d[0][1]), d[1], d[2]), 'float32 array of shape'),
    (lambda d: ((d[0][0][:, :783], d[0][1]), d[1], d[2]), r'shape \(n, 784\)'),
    (lambda d: (d[0], (d[1][0], d[1][1][:-1]), d[2]), 'integer array of shape'),
    (lambda d: (d[0], d[1]), 'expected a tuple'),
    (lambda d: (d[0], d[1], (d[2][0] * 3, d[2][1])), r'lie in \[0, 1\]'),
    (lambda d: (d[0], d[1], (d[2][0], d[2][1] + 10)), 'labels should be 0..9'),
])
def test_wrong_shape_or_dtype_is_a_clear_error(tmp_path, change, complaint):
    path = _write_gz(tmp_path / 'bad.pkl.gz', pickle.dumps(change(_fake_mnist()), protocol=2))
    with pytest.raises(mnist.DatasetError, match=complaint):
        mnist.load_mnist_pickle(path)


def test_not_a_pickle_is_a_clear_error(tmp_path):
    path = _write_gz(tmp_path / 'junk.pkl.gz', b'this is not a pickle')
    with pytest.raises(mnist.DatasetError, match='junk.pkl.gz'):
        mnist.load_mnist_pickle(path)


def _main(args, capsys):
    return call_main(dual_mlp.main, args, capsys)


def _one_line(rc, out, lines, status):
    assert rc == status, (rc, out[-2000:], lines)
    assert len(lines) == 1, lines
    assert lines[0].startswith('dual_mlp: ') and 'Traceback' not in lines[0], lines
    assert 'validation error' not in out, out      # refused before any training
    return lines[0]


@pytest.mark.parametrize('args,words', [
    (['--batch-size', '0'], ['--batch-size', '0', 'at least 1']),
    (['--batch-size', '-5'], ['--batch-size', '-5', 'at least 1']),
    (['--batch-size', '600'], ['--batch-size', '600', '1000 training images', '500']),
    (['--epochs', '0'], ['--epochs', '0', 'at least 1']),
    (['--epochs', '-1'], ['--epochs', '-1', 'at least 1']),
    (['--epochs', 'ten'], ['--epochs', 'ten']),
    (['--lr', '0'], ['--lr', '0', 'positive']),
    (['--lr', '-0.1'], ['--lr', '-0.1', 'positive']),
    (['--lr', 'nan'], ['--lr', 'nan', 'positive']),
    (['--lr', 'inf'], ['--lr', 'inf', 'positive']),
    (['--timeout', '0'], ['--timeout', '0', 'positive']),
    (['--port', '0'], ['--port', '0', '1..65535']),
    (['--port', '70000'], ['--port', '70000', '1..65535']),
    (['--exchange', 'nccl'], ['nccl', 'GPU', 'host']),
    (['cpu'], ['two devices', '--one-process']),
])
def test_a_bad_option_value_is_one_line_and_no_training(args, words, capsys):
    if args[0] != 'cpu':
        args = ['cpu', 'cpu'] + args
    line = _one_line(*_main(args, capsys), status=2)
    for w in words:
        assert w in line, (w, line)


@pytest.mark.skipif('__import__("torch").cuda.is_available()', reason='a machine without GPUs')
@pytest.mark.parametrize('args,hint', [
    (['0', '1'], "'python dual_mlp.py cpu cpu'"),
    (['0', '--one-process'], "'python dual_mlp.py cpu --one-process'"),
])
def test_gpus_asked_for_without_gpus_give_the_command_for_the_cpu(args, hint, capsys):
    line = _one_line(*_main(args, capsys), status=2)
    assert hint in line and 'no CUDA GPU is visible' in line, line
    assert 'device=cpu' not in line, line


@pytest.mark.parametrize('name,content', [
    ('text.txt', b'hello, these are notes\n' * 20),
    ('random.bin', np.random.RandomState(0).bytes(3000)),
    ('dict.pkl', pickle.dumps({'a': 1}, protocol=2)),
    ('empty.pkl', b''),
    ('gz-text.pkl.gz', gzip.compress(b'hello, these are notes\n' * 20)),
    ('cut.pkl.gz', gzip.compress(pickle.dumps(_fake_mnist(), protocol=2))[:500]),
], ids=lambda v: v if isinstance(v, str) else '')
def test_a_file_that_is_not_the_gzip_pickle_is_one_line_naming_it(tmp_path, name, content,
                                                                   capsys):
    path = tmp_path / name
    path.write_bytes(content)
    line = _one_line(*_main(['cpu', 'cpu', '--dataset', str(path)], capsys), status=1)
    assert str(path) in line and 'gzip pickle mnist.pkl.gz' in line, line


def test_a_dataset_that_is_a_folder_or_missing_is_one_line(tmp_path, capsys):
    for path, words in ((tmp_path, 'is a folder'), (tmp_path / 'nowhere.pkl.gz', 'no such file')):
        line = _one_line(*_main(['cpu', 'cpu', '--dataset', str(path)], capsys), status=2)
        assert str(path) in line and words in line, line


def test_help_explains_every_option(capsys):
    parser = dual_mlp.build_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), action.option_strings or action.dest
    with pytest.raises(SystemExit) as e:
        dual_mlp.main(['--help'])
    assert e.value.code == 0
    out = ' '.join(capsys.readouterr().out.split())
    for option in ('--dataset', '--epochs', '--batch-size', '--lr', '--one-process',
                   '--exchange', '--port', '--timeout', '--save-params'):
        assert option in out, option
    assert '(default 10)' in out and '(default 0.13)' in out, out


def test_embedded_digits_have_the_mnist_format():
    (tx, ty), (vx, vy), (sx, sy) = mnist.embedded_digits()
    assert tx.shape == (1000, 784) and vx.shape == (397, 784) and sx.shape == (400, 784)
    assert tx.dtype == np.float32 and 0.0 <= tx.min() and tx.max() <= 1.0
    assert set(np.unique(ty)) == set(range(10))


# ----------------------------------------------------------------------------------------------
# runs of the script

def _run(args, timeout=300):
    proc = subprocess.run([sys.executable, SCRIPT] + args, capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))
    assert proc.returncode == 0, 'dual_mlp.py {} failed:\n{}\n{}'.format(
        ' '.join(args), proc.stdout, proc.stderr)
    lines = proc.stdout.strip().splitlines()
    return proc.stdout, json.loads(lines[-1])


@pytest.fixture(scope='module')
def cpu_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp('dual_mlp')
    two_out, two = _run(['cpu', 'cpu', '--save-params', str(d / 'two.npy')])
    one_out, one = _run(['cpu', '--one-process', '--save-params', str(d / 'one.npy')])
    return dict(two_out=two_out, two=two, one_out=one_out, one=one,
                two_params=np.load(d / 'two.npy', allow_pickle=False),
                one_params=np.load(d / 'one.npy', allow_pickle=False))


@pytest.mark.slow
def test_default_run_learns_the_embedded_digits(cpu_runs):
    out, result = cpu_runs['two_out'], cpu_runs['two']
    assert 'embedded scikit-learn digits' in out and 'batch size 100' in out
    assert 'exchange: host' in out
    assert out.count('validation error') == 10
    assert set(result) == {'val_error', 'test_error', 'epochs_per_s'}
    assert result['val_error'] < 0.10, result
    assert result['test_error'] < 0.15, result
    assert result['epochs_per_s'] > 0


@pytest.mark.slow
def test_two_processes_match_the_averaged_update_of_each_pair(cpu_runs):
    two, one = cpu_runs['two_params'], cpu_runs['one_params']
    assert two.shape == one.shape == (784 * 500 + 500 + 500 * 10 + 10,)
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-6)
    assert cpu_runs['two']['val_error'] == pytest.approx(cpu_runs['one']['val_error'], abs=1e-6)


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.skipif('not __import__("torch").cuda.device_count() >= 2',
                    reason='needs two CUDA GPUs')
def test_two_gpus_use_peer_copies_and_match_one_process(tmp_path):
    import torch
    two_out, two = _run(['0', '1', '--save-params', str(tmp_path / 'two.npy')])
    one_out, one = _run(['0', '--one-process', '--save-params', str(tmp_path / 'one.npy')])
    if torch.cuda.can_device_access_peer(0, 1):
        assert 'exchange: p2p' in two_out, two_out
    else:
        assert 'exchange: host' in two_out, two_out
    two_p = np.load(tmp_path / 'two.npy', allow_pickle=False)
    one_p = np.load(tmp_path / 'one.npy', allow_pickle=False)
    np.testing.assert_allclose(two_p, one_p, rtol=0, atol=1e-5)
    assert two['val_error'] < 0.10, two
    print('dual_mlp embedded digits: 2 GPUs {:.4f} s/epoch, 1 GPU {:.4f} s/epoch'.format(
        1 / two['epochs_per_s'], 1 / one['epochs_per_s']))
