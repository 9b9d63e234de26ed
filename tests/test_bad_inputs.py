"""The bad-input catalogue: configs, command lines, batch files, labels, mean files,
snapshots, images, preprocessing paths, the MNIST pickle and the release zip. Each input is
written for real and given to the real script, which must end with one clear line naming the
key or file (exit status 2 for configuration errors, 1 for the rest) and no traceback.

Cases marked 'script' run the script as a process (two at a time); the others call the script's
main() in this process (the same code path without the 3 s start of a Python with torch) and
check the SystemExit status and stderr. docs/bad_inputs.md lists every case; it is written from
the actual messages by

    python tests/test_bad_inputs.py > docs/bad_inputs.md
"""
import concurrent.futures
import dataclasses
import gzip
import io
import os
import re
import pickle
import shutil
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest

from conftest import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOC = os.path.join(ROOT, 'docs', 'bad_inputs.md')
SCRIPT_TIMEOUT = 120


@dataclasses.dataclass
class Case:
    id: str
    group: str
    input: str              # what the user gave, as the table says it
    make: object            # World -> (script, argv)
    expect: tuple           # substrings of the error line
    rc: int = 1
    mode: str = 'main'      # 'main': script's main() in this process; 'script': a process
    skip: object = None     # a reason to skip, or None


# ---------------------------------------------------------------------------------------------
# the world the cases are made in

class World:
    """A good dataset, a complete snapshot 1 (zeros), and a folder for each case's bad files."""

    def __init__(self, root):
        self.root = root
        self.data = make_dataset(os.path.join(root, 'good'), n_train_files=1, file_rows=8,
                                 val_sizes=(4,))
        opts = dict(a.split('=', 1) for a in self.data)
        self.train, self.val = opts['train_folder'], opts['val_folder']
        self.labels, self.mean = opts['label_folder'], opts['mean_file']
        self.snap = os.path.join(root, 'snap')
        from alex_net import AlexNet
        from alexnet_lib.snapshot import save_array, save_snapshot
        save_snapshot(self.snap, 1, AlexNet('cpu', init=False), 0.01)
        save_array(os.path.join(self.snap, 'val_record.npy'), np.zeros((1, 2), np.float32))

    def dir(self, name):
        d = os.path.join(self.root, 'cases', name)
        os.makedirs(d, exist_ok=True)
        return d

    def train_args(self, case, *extra, **replace):
        """train.py's arguments: the good dataset (with replacements), CPU, 1 epoch."""
        opts = dict(a.split('=', 1) for a in self.data)
        opts.update(replace)
        return [f'{k}={v}' for k, v in opts.items()] + [
            'gpu=cpu', 'batch_size=4', 'para_load=False', 'n_epochs=1',
            f'weights_dir={self.dir(case)}/w', *extra]

    def snapshot_copy(self, case):
        """A copy of snapshot 1 (hard links: replace a file, never write into one)."""
        d = os.path.join(self.dir(case), 'snap')
        if not os.path.isdir(d):
            os.makedirs(d)
            for f in os.listdir(self.snap):
                os.link(os.path.join(self.snap, f), os.path.join(d, f))
        return d

    def label_folder(self, case, train_labels):
        d = os.path.join(self.dir(case), 'labels')
        os.makedirs(d, exist_ok=True)
        shutil.copy(os.path.join(self.labels, 'val_labels.npy'), d)
        if train_labels is not None:
            train_labels(os.path.join(d, 'train_labels.npy'))
        return d

    def label_folder_with(self, case, name, labels):
        """A copy of the good label folder with one file replaced."""
        d = os.path.join(self.dir(case), 'labels')
        os.makedirs(d, exist_ok=True)
        for f in ('train_labels.npy', 'val_labels.npy'):
            shutil.copy(os.path.join(self.labels, f), d)
        np.save(os.path.join(d, name), labels)
        return d

    def batch_folder(self, case, write):
        d = os.path.join(self.dir(case), 'train')
        os.makedirs(d, exist_ok=True)
        write(d)
        return d


def _yaml(w, case, name, text):
    path = os.path.join(w.dir(case), name)
    with open(path, 'w') as f:
        f.write(text)
    return path


def _h5(path, name, array):
    with h5py.File(path, 'w') as h5:
        h5.create_dataset(name, data=array)


def _truncated_copy(d, w):
    src = os.path.join(w.train, '0000.hkl')
    data = open(src, 'rb').read()
    with open(os.path.join(d, '0000.hkl'), 'wb') as f:
        f.write(data[:len(data) // 2])


def _files_one_short(d, w, n, short):
    """n batch files of 8 images (copies of the good one) but file ``short``, of 4."""
    from alexnet_lib.batch_files import write_batch
    for i in range(n):
        if i == short:
            write_batch(os.path.join(d, f'{i:04d}.hkl'), np.zeros((4, 256, 256, 3), np.uint8))
        else:
            shutil.copy(os.path.join(w.train, '0000.hkl'), os.path.join(d, f'{i:04d}.hkl'))


def _second_file_a_fifo(d, w):
    """A stalled file: a FIFO nobody writes (h5py's open of it would wait for good)."""
    shutil.copy(os.path.join(w.train, '0000.hkl'), d)
    os.mkfifo(os.path.join(d, '0001.hkl'))


def _data_a_group(path):
    """hickle.dump of a list of images: 'data' is a group, not an array."""
    with h5py.File(path, 'w') as h5:
        h5.create_group('data').create_dataset('data0', data=np.zeros((256, 256, 3), np.uint8))


def _labels_for_two_files(w, case, files=2):
    return w.label_folder(case, lambda p: np.save(p, np.arange(8 * files) % 10))


def _object_array(n):
    a = np.empty(n, dtype=object)
    a[:] = [0] * n
    return a


def _snap_with(w, case, name, array):
    d = w.snapshot_copy(case)
    os.unlink(os.path.join(d, name))
    np.save(os.path.join(d, name), array, allow_pickle=True)
    return d


def _snap_without(w, case, name):
    d = w.snapshot_copy(case)
    os.unlink(os.path.join(d, name))
    return d


def _image(w, case, name, content):
    path = os.path.join(w.dir(case), name)
    with open(path, 'wb') as f:
        f.write(content)
    return path


def _jpeg_bytes():
    from PIL import Image
    buf = io.BytesIO()
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (300, 400, 3)).astype(np.uint8)).save(buf, 'JPEG')
    return buf.getvalue()


def _classify_args(w, image):
    return [image, 'gpu=cpu', f'weights_dir={w.snap}', 'load_epoch=1', f'mean_file={w.mean}']


def _paths_yaml_without_misc(w, case):
    keys = ['train_img_dir', 'val_img_dir', 'tar_root_dir', 'tar_train_dir', 'tar_val_dir',
            'meta_clsloc_mat', 'val_label_file', 'valtxt_filename', 'traintxt_filename']
    return _yaml(w, case, 'paths.yaml', ''.join(f'{k}: somewhere/{k}\n' for k in keys))


def _paths_yaml_one_batch_folder(w, case):
    keys = ['train_img_dir', 'val_img_dir', 'tar_root_dir', 'misc_dir', 'meta_clsloc_mat',
            'val_label_file', 'valtxt_filename', 'traintxt_filename']
    return _yaml(w, case, 'paths.yaml', ''.join(f'{k}: somewhere/{k}\n' for k in keys)
                 + 'tar_train_dir: train_hkl\ntar_val_dir: train_hkl\n')


def _mnist(w, case, obj):
    path = os.path.join(w.dir(case), 'mnist.pkl.gz')
    with gzip.open(path, 'wb') as f:
        f.write(pickle.dumps(obj, protocol=2))
    return path


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def _mnist_rows(n, cols=784):
    rng = np.random.RandomState(0)
    return (rng.rand(n, cols).astype(np.float32), rng.randint(0, 10, n).astype(np.int64))


def _release_zip(w, case):
    path = os.path.join(w.dir(case), 'parameters_releasing.zip')
    buf = io.BytesIO()
    np.save(buf, np.zeros(3, np.float32))
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('parameters_releasing/W_0_65.npy', buf.getvalue())
    return path


NO_CUDA = None
try:
    import torch
    NO_CUDA = 'a CUDA GPU is visible' if torch.cuda.is_available() else None
except ImportError:
    pass

T = 'train.py'
CASES = [
    # -- configuration and command line --------------------------------------------------------
    Case('unknown-key', 'config', 'an unknown key on the command line: `n_epoch=2`',
         lambda w, c: (T, w.train_args(c, 'n_epoch=2')),
         ("config error: unknown key 'n_epoch' in the command line; did you mean 'n_epochs'?",),
         rc=2, mode='script'),
    Case('unknown-key-yaml', 'config', 'an unknown key in a yaml file: `learning_rat: 0.1`',
         lambda w, c: (T, w.train_args(c, _yaml(w, c, 'extra.yaml', 'learning_rat: 0.1\n'))),
         ("unknown key 'learning_rat' in", "extra.yaml", "did you mean 'learning_rate'?"), rc=2),
    Case('wrong-type', 'config', 'a value of the wrong type: `n_epochs=ten`',
         lambda w, c: (T, w.train_args(c, 'n_epochs=ten')),
         ("n_epochs: 'ten' is not a whole number",), rc=2),
    Case('wrong-bool', 'config', 'not a boolean: `para_load=maybe`',
         lambda w, c: (T, w.train_args(c, 'para_load=maybe')),
         ("para_load: 'maybe' is not True or False",), rc=2),
    Case('out-of-range', 'config', 'a value out of range: `batch_size=0`',
         lambda w, c: (T, w.train_args(c, 'batch_size=0')),
         ("batch_size: 0 must be at least 1",), rc=2),
    Case('nan-value', 'config', 'a non-finite number: `learning_rate=.nan`',
         lambda w, c: (T, w.train_args(c, 'learning_rate=.nan')),
         ("learning_rate: nan is not a finite number",), rc=2),
    Case('prefetch', 'config', 'fewer than two loader buffers: `prefetch=1`',
         lambda w, c: (T, w.train_args(c, 'prefetch=1')),
         ("prefetch: 1 must be at least 2",), rc=2),
    Case('bad-gpu', 'config', 'a device that is no device: `gpu=tpu0`',
         lambda w, c: (T, w.train_args(c, 'gpu=tpu0')),
         ("gpu: 'tpu0' is not a device; use gpu0, 0, cuda:0 or cpu",), rc=2),
    Case('no-cuda', 'config', 'a GPU on a machine without one: `gpu=gpu0`',
         lambda w, c: (T, w.train_args(c, 'gpu=gpu0')),
         ("device cuda:0 asked for, but no CUDA GPU is visible; use gpu=cpu",), rc=2,
         skip=NO_CUDA),
    Case('p2p-on-cpu', 'config', 'GPU exchange between CPU replicas: `train_2gpu.py gpu0=cpu '
         'gpu1=cpu exchange=p2p`',
         lambda w, c: ('train_2gpu.py', w.data + ['gpu0=cpu', 'gpu1=cpu', 'exchange=p2p']),
         ("exchange: p2p needs GPUs", "use exchange: host or exchange: gloo"), rc=2,
         mode='script'),
    Case('gossip-on-p2p', 'config', 'a rule the backend cannot run: `train_2gpu.py '
         'exchange=p2p average=gossip`',
         lambda w, c: ('train_2gpu.py', w.data + ['gpu0=cpu', 'gpu1=cpu', 'exchange=p2p',
                                                   'average=gossip']),
         ("average: gossip needs exchange: nccl or exchange: gloo, not exchange: p2p",), rc=2,
         mode='script'),
    Case('elastic-overshoot', 'config', 'an elastic pull past the mean: `gpus=[cpu,cpu,cpu] '
         'average=elastic elastic_alpha=0.5`',
         lambda w, c: ('train_2gpu.py', w.data + ['gpus=[cpu,cpu,cpu]', 'exchange=gloo',
                                                   'average=elastic']),
         ("average: elastic with 3 replicas moves the centre by elastic_alpha x replicas = 1.5",
          "set elastic_alpha to at most 0.333333"), rc=2, mode='script'),
    Case('missing-yaml', 'config', 'a yaml file that does not exist: `nowhere.yaml`',
         lambda w, c: (T, w.train_args(c, os.path.join(w.dir(c), 'nowhere.yaml'))),
         ("config file", "nowhere.yaml' not found"), rc=2),
    Case('malformed-yaml', 'config', 'malformed yaml: `n_epochs: [1, 2`',
         lambda w, c: (T, w.train_args(c, _yaml(w, c, 'bad.yaml', 'n_epochs: [1, 2\n'))),
         ("bad.yaml' is not valid yaml",), rc=2),
    Case('yaml-folder', 'config', 'a yaml "file" that is a folder: `configs.yaml/`',
         lambda w, c: (T, w.train_args(c, _folder(w, c, 'configs.yaml'))),
         ("cannot read config file", "configs.yaml': Is a directory"), rc=2),
    Case('yaml-not-mapping', 'config', 'a yaml file that is a list, not `key: value` lines',
         lambda w, c: (T, w.train_args(c, _yaml(w, c, 'list.yaml', '- 1\n- 2\n'))),
         ("list.yaml' must hold 'key: value' lines",), rc=2),
    Case('bad-argument', 'config', 'a word that is neither `key=value` nor a yaml file: '
         '`n_epochs 2`', lambda w, c: (T, w.train_args(c, 'n_epochs', '2')),
         ("unexpected argument 'n_epochs': give settings as key=value",), rc=2),
    Case('negative-seed', 'config', 'a negative seed: `seed=-1`',
         lambda w, c: (T, w.train_args(c, 'seed=-1')),
         ("seed: -1 must be 0 or more",), rc=2),
    Case('no-cuda-2gpu', 'config', 'train_2gpu.py on a machine without GPUs (its default '
         '`gpu0`, `gpu1`)',
         lambda w, c: ('train_2gpu.py', w.data + ['batch_size=4', 'n_epochs=1',
                                                  f'weights_dir={w.dir(c)}/w']),
         ("device cuda:0 asked for, but no CUDA GPU is visible; use gpus=[cpu,cpu] "
          "exchange=host",), rc=2, skip=NO_CUDA),
    Case('weight-decay', 'config', 'a negative weight decay: `weight_decay=-1`',
         lambda w, c: (T, w.train_args(c, 'weight_decay=-1')),
         ("weight_decay: -1.0 must be 0 or more",), rc=2),
    Case('lr-step-negative', 'config', 'an epoch before the first: `lr_step=[-5]`',
         lambda w, c: (T, w.train_args(c, 'lr_step=[-5]')),
         ("lr_step: [-5] must hold epochs (1 or more)",), rc=2),
    Case('lr-step-number', 'config', 'a number where a list of epochs belongs: `lr_step=1`',
         lambda w, c: (T, w.train_args(c, 'lr_step=1')),
         ("lr_step: 1 is a number, not a list of epochs: write lr_step=[1]",), rc=2),
    # -- a run's data and folder ---------------------------------------------------------------
    Case('no-data', 'a run', 'a configuration that names no data: `python train.py`',
         lambda w, c: (T, ['gpu=cpu', f'weights_dir={w.dir(c)}/w']),
         ("train_folder, val_folder, label_folder, mean_file not set: point them at your "
          "preprocessing output",), rc=2),
    Case('mixed-outputs', 'a run', 'the labels of another preprocessing output',
         lambda w, c: (T, _mixed_outputs(w, c)),
         ("label_folder comes from another preprocessing output (8 training images, order",
          "than train_folder, val_folder and mean_file (8 training images"), rc=2),
    Case('long-labels', 'a run', 'a validation label file longer than its images (8 labels '
         'for 4 images in one partial file)',
         lambda w, c: (T, w.train_args(c, label_folder=_long_val_labels(w, c))),
         ("val_labels.npy' has 8 labels, but the validation batch files hold 4 images",)),
    Case('label-classes', 'a run', 'labels beyond n_classes: labels 0..9 with `n_classes=3`',
         lambda w, c: (T, w.train_args(c, 'n_classes=3')),
         ("outside 0..2 (n_classes: 3): set n_classes to the number of classes",)),
    Case('snapshot-classes', 'a run', 'validate.py with `n_classes=10` on a snapshot of 1000 '
         'classes', lambda w, c: ('validate.py', w.data + ['gpu=cpu', f'weights_dir={w.snap}',
                                                           'load_epoch=1', 'n_classes=10']),
         ("has 1000 classes (b_7_1.npy), the network 10: set n_classes=1000",)),
    Case('weights-dir-file', 'a run', 'a weights_dir that is a file',
         lambda w, c: (T, w.train_args(c, f'weights_dir={_a_file(w, c)}')),
         ("runs cannot be written: it is a file, not a folder; choose another weights_dir",)),
    Case('another-run', 'a run', "a new run into another run's weights_dir",
         lambda w, c: (T, w.train_args(c, f'weights_dir={w.snapshot_copy(c)}')),
         ("already holds another run (snapshot 1): resume it (resume_train=True load_epoch=1, "
          "or resume_train=auto), write to another weights_dir, or replace it with "
          "overwrite=True",)),
    Case('live-run', 'a run', 'a second run into the weights_dir of a live run',
         lambda w, c: (T, w.train_args(c, 'overwrite=True',
                                       f'weights_dir={_locked_by_a_live_run(w, c)}')),
         ("is in use by a live run (pid ", "wait for it to end or choose another "
          "weights_dir")),
    # -- batch files ---------------------------------------------------------------------------
    Case('no-train-folder', 'batch files', 'a training folder that does not exist',
         lambda w, c: (T, w.train_args(c, train_folder=os.path.join(w.dir(c), 'nowhere'))),
         ("batch folder", "nowhere' does not exist: run preprocessing",)),
    Case('bench-no-folder', 'batch files', '`bench.py --cpu` with a validation folder that '
         'does not exist',
         lambda w, c: ('bench.py', ['--cpu', f'--out={w.dir(c)}/bench.json'] + [
             a for a in w.data if not a.startswith('val_folder=')]
             + [f"val_folder={os.path.join(w.dir(c), 'nowhere')}"]),
         ("batch folder", "nowhere' does not exist: run preprocessing",)),
    Case('empty-folder', 'batch files', 'a batch folder without .hkl files',
         lambda w, c: (T, w.train_args(c, train_folder=w.batch_folder(c, lambda d: None))),
         ("holds no .hkl batch files",)),
    Case('truncated-batch', 'batch files', 'a truncated batch file (para_load: True)',
         lambda w, c: (T, w.train_args(c, 'para_load=True', train_folder=w.batch_folder(
             c, lambda d: _truncated_copy(d, w)))),
         ("cannot read batch file", "0000.hkl", "truncated"), mode='script'),
    Case('nchw-batch', 'batch files', 'a batch file in channels-first layout: uint8 '
         '(8, 3, 256, 256)',
         lambda w, c: (T, w.train_args(c, train_folder=w.batch_folder(c, lambda d: _h5(
             os.path.join(d, '0000.hkl'), 'data', np.zeros((8, 3, 256, 256), np.uint8))))),
         ("0000.hkl' holds uint8 (8, 3, 256, 256); expected uint8 (B, 256, 256, 3)",)),
    Case('float-batch', 'batch files', 'a batch file of float32 images',
         lambda w, c: (T, w.train_args(c, train_folder=w.batch_folder(c, lambda d: _h5(
             os.path.join(d, '0000.hkl'), 'data', np.zeros((8, 256, 256, 3), np.float32))))),
         ("0000.hkl' holds float32 (8, 256, 256, 3); expected uint8",)),
    Case('not-hdf5', 'batch files', 'a file named .hkl that is not HDF5',
         lambda w, c: (T, w.train_args(c, train_folder=w.batch_folder(c, lambda d: open(
             os.path.join(d, '0000.hkl'), 'w').write('not a batch\n')))),
         ("cannot read batch file", "0000.hkl")),
    Case('no-data-array', 'batch files', "an HDF5 file without the 'data' array",
         lambda w, c: (T, w.train_args(c, train_folder=w.batch_folder(c, lambda d: _h5(
             os.path.join(d, '0000.hkl'), 'images', np.zeros((8, 256, 256, 3), np.uint8))))),
         ("0000.hkl' has no 'data' array",)),
    Case('data-group', 'batch files', "a batch file whose 'data' is a group (hickle.dump of a "
         "list of images)",
         lambda w, c: (T, w.train_args(c, train_folder=w.batch_folder(c, lambda d: _data_a_group(
             os.path.join(d, '0000.hkl'))))),
         ("0000.hkl' has no 'data' array",)),
    Case('fifo-batch', 'batch files', 'a batch file that is a FIFO nobody writes (a stalled '
         'file), read by the loader process (para_load: True) in the middle of the epoch',
         lambda w, c: (T, w.train_args(c, 'para_load=True', label_folder=_labels_for_two_files(
             w, c), train_folder=w.batch_folder(c, lambda d: _second_file_a_fifo(d, w)))),
         ("0001.hkl' is not a regular file (a FIFO or a device?)",), mode='script'),
    Case('prefetch-huge', 'batch files', 'more loader buffers than the process may have: '
         '`prefetch=100000`',
         lambda w, c: (T, w.train_args(c, 'para_load=True', 'prefetch=100000')),
         ("cannot make the loader's 100000 buffers", "lower prefetch"), mode='script'),
    Case('batch-size', 'batch files', 'a batch_size that does not divide the batch files: '
         '`batch_size=3` for files of 8', lambda w, c: (T, w.train_args(c, 'batch_size=3')),
         ("batch_size 3 must divide the 8 images of each training batch file",), rc=2),
    Case('short-second-file', 'batch files', 'a middle batch file with fewer images than the '
         'first (found when it is read)',
         lambda w, c: (T, w.train_args(
             c, 'para_load=True', train_folder=w.batch_folder(
                 c, lambda d: _files_one_short(d, w, 3, 1)),
             label_folder=_labels_for_two_files(w, c, 3))),
         ("0001.hkl' has 4 images; rows [4, 8) were asked for",), mode='script'),
    Case('short-last-file', 'batch files', 'a last training batch file with fewer images than '
         'the first (found at the start)',
         lambda w, c: (T, w.train_args(
             c, train_folder=w.batch_folder(c, lambda d: _files_one_short(d, w, 2, 1)),
             label_folder=_labels_for_two_files(w, c))),
         ("training batch file", "0001.hkl' holds 4 images, the first 8: every training batch "
          "file holds as many",)),
    # -- labels --------------------------------------------------------------------------------
    Case('no-label-file', 'labels', 'a label folder without train_labels.npy',
         lambda w, c: (T, w.train_args(c, label_folder=w.label_folder(c, None))),
         ("label file", "train_labels.npy' not found: run preprocessing (make_labels.py)",)),
    Case('short-labels', 'labels', 'fewer labels than images',
         lambda w, c: (T, w.train_args(c, label_folder=w.label_folder(
             c, lambda p: np.save(p, np.arange(4))))),
         ("train_labels.npy' has 4 labels, but the training batch files hold 8 images",)),
    Case('label-range', 'labels', 'a label outside 0..999',
         lambda w, c: (T, w.train_args(c, label_folder=w.label_folder(
             c, lambda p: np.save(p, np.array([0, 1, 2, 3, 4, 5, 6, 1000]))))),
         ("train_labels.npy' holds labels 0..1000, outside 0..999 (n_classes: 1000)",)),
    Case('float-labels', 'labels', 'float labels',
         lambda w, c: (T, w.train_args(c, label_folder=w.label_folder(
             c, lambda p: np.save(p, np.zeros(8))))),
         ("train_labels.npy' holds float64 (8,); expected 1-D integer labels",)),
    Case('pickled-labels', 'labels', 'a label file holding a pickled (object) array',
         lambda w, c: (T, w.train_args(c, label_folder=w.label_folder(
             c, lambda p: np.save(p, _object_array(8), allow_pickle=True)))),
         ("train_labels.npy' is not a .npy array", "allow_pickle=False")),
    # -- mean file -----------------------------------------------------------------------------
    Case('no-mean', 'mean file', 'a mean file that does not exist',
         lambda w, c: (T, w.train_args(c, mean_file=os.path.join(w.dir(c), 'img_mean.npy'))),
         ("mean file", "img_mean.npy' not found: run preprocessing or fix mean_file")),
    Case('hwc-mean', 'mean file', 'a mean image of shape (256, 256, 3)',
         lambda w, c: (T, w.train_args(c, mean_file=_mean(w, c, np.zeros((256, 256, 3),
                                                                           np.float32)))),
         ("has shape (256, 256, 3); expected (3, 256, 256)",)),
    Case('nan-mean', 'mean file', 'a mean image holding NaN',
         lambda w, c: (T, w.train_args(c, mean_file=_mean(w, c, np.full((3, 256, 256), np.nan,
                                                                         np.float32)))),
         ("img_mean.npy' holds NaN or infinite values",)),
    # -- snapshots -----------------------------------------------------------------------------
    Case('no-snapshot', 'snapshots', 'validate.py with a load_epoch that has no snapshot',
         lambda w, c: ('validate.py', w.data + ['gpu=cpu', f'weights_dir={w.snap}',
                                                'load_epoch=7']),
         ("no snapshot 7 in", "its complete snapshots are epochs 1 (fix load_epoch)")),
    Case('no-weights-dir', 'snapshots', 'validate.py with a weights_dir that does not exist',
         lambda w, c: ('validate.py', w.data + ['gpu=cpu', 'load_epoch=1',
                                                f'weights_dir={w.dir(c)}/nowhere']),
         ("no snapshot 1 in", "the folder does not exist")),
    Case('misshaped-param', 'snapshots', 'a snapshot file of the wrong shape',
         lambda w, c: ('validate.py', w.data + ['gpu=cpu', 'load_epoch=1', 'weights_dir=' +
                                                _snap_with(w, c, 'W_0_1.npy',
                                                           np.zeros((3, 3), np.float32))]),
         ("W_0_1.npy has shape (3, 3), expected (3, 11, 11, 96)",)),
    Case('pickled-param', 'snapshots', 'a snapshot file holding a pickled (object) array',
         lambda w, c: ('validate.py', w.data + ['gpu=cpu', 'load_epoch=1', 'weights_dir=' +
                                                _snap_with(w, c, 'b_7_1.npy',
                                                           _object_array(1000))]),
         ("cannot read parameter file", "b_7_1.npy", "allow_pickle=False")),
    Case('incomplete-snapshot', 'snapshots', 'resuming from a snapshot without its lr file '
         '(its writing was interrupted)',
         lambda w, c: (T, w.train_args(c, 'resume_train=True', 'load_epoch=1',
                                       f'weights_dir={_snap_without(w, c, "lr_1.npy")}')),
         ("snapshot 1 in", "is incomplete: its lr file (written last) is missing, so writing it "
          "was interrupted"), mode='script'),
    Case('no-momentum', 'snapshots', 'resuming from a snapshot that lacks a momentum file',
         lambda w, c: (T, w.train_args(c, 'resume_train=True', 'load_epoch=1', 'n_epochs=2',
                                       f'weights_dir={_snap_without(w, c, "mom_3_1.npy")}')),
         ("missing momentum file", "mom_3_1.npy")),
    # -- images (classify.py) ------------------------------------------------------------------
    Case('corrupt-image', 'images', 'classify.py on a truncated JPEG',
         lambda w, c: ('classify.py', _classify_args(
             w, _image(w, c, 'cut.jpg', _jpeg_bytes()[:400]))),
         ("error: cannot read image", "cut.jpg"), mode='script'),
    Case('not-an-image', 'images', 'classify.py on a text file named .jpg',
         lambda w, c: ('classify.py', _classify_args(
             w, _image(w, c, 'notes.jpg', b'these are notes, not pixels\n'))),
         ("cannot read image", "notes.jpg")),
    Case('no-images-in-folder', 'images', 'classify.py on a folder without images',
         lambda w, c: ('classify.py', _classify_args(w, _folder(w, c, 'photos'))),
         ("folder", "photos holds no image (it is empty)",)),
    Case('missing-image', 'images', 'classify.py on an image that does not exist',
         lambda w, c: ('classify.py', _classify_args(w, os.path.join(w.dir(c), 'gone.png'))),
         ("image", "gone.png not found")),
    Case('plot-no-epoch', 'plots', 'plot.py on a run whose metrics.csv has only its header',
         lambda w, c: ('plot.py', [_header_only_run(w, c)]),
         ("metrics.csv holds no epoch yet",)),
    Case('plot-format', 'plots', 'plot.py -o with a mistyped file type: `-o curves.pgn`',
         lambda w, c: ('plot.py', [_header_only_run(w, c), '-o',
                                   os.path.join(w.dir(c), 'curves.pgn')]),
         ("cannot write a plot to", "curves.pgn: name a file ending in one of", ".png")),
    # -- preprocessing, MNIST, release ---------------------------------------------------------
    Case('paths-key', 'preprocessing', 'preprocessing/paths.yaml without `misc_dir`',
         lambda w, c: ('preprocessing/make_hkl.py', ['--paths', _paths_yaml_without_misc(w, c)]),
         ("paths.yaml has no key 'misc_dir'",), mode='script'),
    Case('one-batch-folder', 'preprocessing', 'preprocessing/paths.yaml with `tar_val_dir` the '
         'same as `tar_train_dir`',
         lambda w, c: ('preprocessing/make_hkl.py',
                       ['--paths', _paths_yaml_one_batch_folder(w, c)]),
         ("tar_train_dir and tar_val_dir give the same batch folder",
          "give tar_val_dir another name"), mode='script'),
    Case('folder-in-class-folder', 'preprocessing', 'a folder inside a class folder of '
         'train_img_dir', lambda w, c: ('preprocessing/make_hkl.py',
                                        ['--paths', _folder_in_a_class_folder(w, c)]),
         ("holds a folder", "/extra/; a class folder holds only its images"), mode='script'),
    Case('mnist-batch-size', 'MNIST pickle', 'dual_mlp.py --batch-size 0',
         lambda w, c: ('dual_mlp.py', ['cpu', 'cpu', '--batch-size', '0']),
         ("--batch-size 0: must be at least 1",), rc=2),
    Case('mnist-no-cuda', 'MNIST pickle', 'dual_mlp.py 0 1 on a machine without GPUs',
         lambda w, c: ('dual_mlp.py', ['0', '1']),
         ("no CUDA GPU is visible; use 'python dual_mlp.py cpu cpu' to run on the CPU",), rc=2,
         skip=NO_CUDA),
    Case('mnist-not-gzip', 'MNIST pickle', 'dual_mlp.py --dataset with a text file',
         lambda w, c: ('dual_mlp.py', ['cpu', 'cpu', '--dataset', _image(
             w, c, 'notes.txt', b'not a data set\n')]),
         ("notes.txt is neither gzip-compressed nor a pickle: --dataset must be the gzip pickle "
          "mnist.pkl.gz",), rc=1),
    Case('evil-pickle', 'MNIST pickle', 'dual_mlp.py --dataset with a pickle that runs a command',
         lambda w, c: ('dual_mlp.py', ['cpu', 'cpu', '--dataset', _mnist(
             w, c, _RunsCommand(os.path.join(w.dir(c), 'pwned')))]),
         ("refusing to load", "system: this file may only hold NumPy arrays"), rc=1,
         mode='script'),
    Case('mnist-shape', 'MNIST pickle', 'dual_mlp.py --dataset with 783-column images',
         lambda w, c: ('dual_mlp.py', ['cpu', 'cpu', '--dataset', _mnist(
             w, c, (_mnist_rows(20, 783), _mnist_rows(10), _mnist_rows(10)))]),
         ("train x should be a float32 array of shape (n, 784)",), rc=1),
    Case('release-folder', 'release zip', 'pretrained/import_params.py on the unzipped '
         'folder', lambda w, c: ('pretrained/import_params.py', [
             _folder(w, c, 'parameters_releasing'), os.path.join(w.dir(c), 'weights')]),
         ("parameters_releasing is a folder: give the zip file itself",)),
    Case('release-checksum', 'release zip', 'pretrained/import_params.py on a zip whose sha1 '
         'is not the release\'s', lambda w, c: ('pretrained/import_params.py', [
             _release_zip(w, c), os.path.join(w.dir(c), 'weights')]),
         ("error: sha1 of", "expected 58950804f50f8d1a76705e1b28d3546e12ea8a81",
          "--skip-checksum"), mode='script'),
]

# bad inputs whose errors other test files already check (listed in docs/bad_inputs.md too)
ELSEWHERE = [
    ('tests/test_preprocessing.py', 'test_a_truncated_image_stops_the_run_naming_the_file'),
    ('tests/test_pretrained.py', 'test_path_traversal_member_is_refused'),
    ('tests/test_pretrained.py', 'test_misshaped_wrong_dtype_and_pickled_files_are_named'),
    ('tests/test_preprocessing.py', 'test_wnid_absent_from_the_devkit_is_named'),
    ('tests/test_proc_load.py', 'test_script_without_startup_line_exits'),
    ('tests/test_run_folder.py', 'test_weights_dir_on_a_read_only_mount_is_one_line_at_once'),
    ('tests/test_run_folder.py',
     'test_another_projects_config_yaml_is_named_with_where_it_was_found'),
    ('tests/test_run_folder.py', 'test_validation_refuses_data_other_than_the_runs'),
    ('tests/test_run_folder.py', 'test_resume_auto_resumes_the_latest_snapshot_or_starts_afresh'),
    ('tests/test_run_folder.py', 'test_one_yaml_drives_both_training_scripts'),
    ('tests/test_run_folder.py',
     'test_the_start_block_says_what_was_merged_and_where_the_run_writes'),
    ('tests/test_preprocessing.py',
     'test_every_image_format_is_taken_and_a_folder_in_a_class_folder_stops'),
    ('tests/test_preprocessing.py',
     'test_a_devkit_without_words_gives_the_wnids_alone_with_a_notice'),
    ('tests/test_preprocessing.py', 'test_a_file_size_limit_is_one_line_naming_the_file'),
    ('tests/test_preprocessing.py', 'test_a_decoding_process_that_dies_stops_the_run_naming_it'),
    ('tests/test_preprocessing.py',
     'test_sigterm_stops_the_run_at_once_whatever_its_processes_do'),
]


def _recorded(root, order):
    """A dataset whose four folders carry the record preprocessing writes."""
    from alexnet_lib.provenance import make_record, write_record
    data = make_dataset(root, n_train_files=1, file_rows=8, val_sizes=(4,))
    o = dict(a.split('=', 1) for a in data)
    record = make_record([f'{order}{i}.JPEG' for i in range(8)], 1,
                         [f'v{i}.JPEG' for i in range(4)], 1, batch_size=8)
    for folder in (o['train_folder'], o['val_folder'], o['label_folder'],
                   os.path.dirname(o['mean_file'])):
        write_record(folder, record)
    return o


def _mixed_outputs(w, c):
    """train.py's arguments: one preprocessing output, with the labels of another."""
    one = _recorded(os.path.join(w.dir(c), 'one'), 'a')
    two = _recorded(os.path.join(w.dir(c), 'two'), 'b')
    return w.train_args(c, **dict(one, label_folder=two['label_folder']))


def _a_file(w, c):
    path = os.path.join(w.dir(c), 'runs')
    with open(path, 'w') as f:
        f.write('a file where the run folder should be\n')
    return path


def _locked_by_a_live_run(w, c):
    """A weights_dir whose lock names a live process of this host that is neither this process
    nor its parent (pid 1 can be the parent, in a container): a sleep started by a shell that
    exits at once, so that it is no child of ours (a child's exit would leave a zombie here),
    killed at exit."""
    import atexit
    import signal
    import socket
    import subprocess
    d = os.path.join(w.dir(c), 'w')
    os.makedirs(d, exist_ok=True)
    pid = int(subprocess.run(['sh', '-c', 'sleep 300 >/dev/null 2>&1 & echo $!'],
                             capture_output=True, text=True, check=True).stdout)

    def end():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    atexit.register(end)
    with open(os.path.join(d, '.run.lock'), 'w') as f:
        f.write(f'{pid} {socket.gethostname()}\n')
    return d


def _folder_in_a_class_folder(w, c):
    from preproc_tree import build_tree
    tree = build_tree(os.path.join(w.dir(c), 'tree'), per_class=(3, 3, 3), n_val=4,
                      quirks=False)
    os.makedirs(os.path.join(tree.train_dir, sorted(os.listdir(tree.train_dir))[0], 'extra'))
    return tree.write_paths_yaml(os.path.join(w.dir(c), 'paths.yaml'),
                                 os.path.join(w.dir(c), 'out'))


def _header_only_run(w, c):
    d = _folder(w, c, 'run')
    with open(os.path.join(d, 'metrics.csv'), 'w') as f:
        f.write('epoch,lr,train_loss,val_top1_error,val_top5_error,val_loss,images_per_s,'
                'wall_time_s\n')
    return d


def _long_val_labels(w, c):
    return w.label_folder_with(c, 'val_labels.npy', np.arange(8) % 10)


def _folder(w, c, name):
    path = os.path.join(w.dir(c), name)
    os.makedirs(path, exist_ok=True)
    return path


def _mean(w, c, array):
    path = os.path.join(w.dir(c), 'img_mean.npy')
    np.save(path, array)
    return path


# ---------------------------------------------------------------------------------------------
# running a case

def run_script(script, argv):
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT,
                       capture_output=True, text=True, timeout=SCRIPT_TIMEOUT,
                       stdin=subprocess.DEVNULL)
    return r.returncode, r.stderr


def run_main(script, argv, capsys):
    """The script's main(argv) in this process: (exit status, stderr)."""
    import importlib.util
    name = 'bad_input_' + os.path.basename(script)[:-3]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    try:
        code = module.main(argv)
    except SystemExit as e:
        code = e.code
    code = 0 if code is None else code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


def error_line(stderr):
    """The message line of a failed run: the last line that is not a warning or notice."""
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ''


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp('bad_inputs')
    yield World(str(root))
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope='module')
def scripts(world):
    """The 'script' cases, started two at a time in the background when the first of them is
    asked for; scripts()[case id] -> future."""
    pool = concurrent.futures.ThreadPoolExecutor(2)
    futures = {}

    def started():
        if not futures:
            futures.update({c.id: pool.submit(run_script, *c.make(world, c.id)) for c in CASES
                            if c.mode == 'script' and not c.skip})
        return futures
    yield started
    pool.shutdown(wait=True, cancel_futures=True)


# script cases start processes (seconds each): the full suite's, not the fast tier's
SLOW_CASES = {'short-second-file'}      # a real training run until the short file is read


@pytest.mark.parametrize('case', [
    pytest.param(c, marks=pytest.mark.slow) if c.mode == 'script' or c.id in SLOW_CASES
    else c for c in CASES], ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_line(case, world, scripts, capsys, monkeypatch):
    if case.skip:
        pytest.skip(case.skip)
    if case.mode == 'script':
        rc, err = scripts()[case.id].result(timeout=SCRIPT_TIMEOUT + 60)
    else:
        monkeypatch.chdir(ROOT)
        rc, err = run_main(*case.make(world, case.id), capsys)
    assert 'Traceback' not in err, err
    line = error_line(err)
    assert rc == case.rc, f"exit status {rc}, expected {case.rc}: {err[-2000:]}"
    assert line.startswith(('error:', 'config error:', 'dual_mlp:')), err[-2000:]
    for word in case.expect:
        assert word in line, f"{word!r} not in {line!r}"
    if case.id == 'evil-pickle':
        assert not os.path.exists(os.path.join(world.dir(case.id), 'pwned'))


def test_the_catalogue_is_documented():
    """docs/bad_inputs.md has a row for every case, and the catalogue has at least 25."""
    assert len(CASES) >= 25
    with open(DOC, encoding='utf-8') as f:
        doc = f.read()
    missing = [c.id for c in CASES if f'| {c.input} |' not in doc]
    assert not missing, f"cases missing from {DOC}: {missing}"
    for path, test in ELSEWHERE:
        with open(os.path.join(ROOT, path)) as f:
            assert f'def {test}(' in f.read(), (path, test)


# ---------------------------------------------------------------------------------------------
# the table

def _shorten(line, world):
    line = line.replace(world.root + os.sep, '…/').replace(world.root, '…')
    line = re.sub(r'\(pid \d+ on [^)]+\)', '(pid N on this host)', line)   # a run's own
    return line if len(line) <= 200 else line[:197] + '…'


def main():
    import tempfile
    root = tempfile.mkdtemp(prefix='bad_inputs-')
    try:
        w = World(root)
        rows = []
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            jobs = [(c, pool.submit(run_script, *c.make(w, c.id))) for c in CASES if not c.skip]
            for c, job in jobs:
                rc, err = job.result()
                msg = _shorten(error_line(err), w).replace('|', '\\|')
                rows.append(f"| {c.input} | `{msg}` (exit {rc}) |")
        print("# Bad inputs and what the user sees\n")
        print("Each row is a bad input given to the real script and the one line it ends with "
              "(paths shortened to `…/`). Configuration errors exit with status 2, the others "
              "with 1; no traceback. Tested by `tests/test_bad_inputs.py` (one test per row); "
              "this file is written by `python tests/test_bad_inputs.py`.\n")
        group = None
        for c, row in zip([c for c in CASES if not c.skip], rows):
            if c.group != group:
                group = c.group
                print(f"\n## {group[0].upper() + group[1:]}\n")
                print("| input | what the user sees |")
                print("| --- | --- |")
            print(row)
        print("\n## Faults during a run\n")
        print("What a run ends with when something fails under it (`tests/test_faults.py` and "
              "`tests/test_cleanup.py`, real processes, faults at seeded random points). In "
              "every case no process and no private folder is left behind and the last complete "
              "snapshot is byte for byte the one an uninterrupted run wrote; resuming from it "
              "(`resume_train=True load_epoch=N`) ends with the uninterrupted run's weights.\n")
        print("| fault | what the user sees |")
        print("| --- | --- |")
        for fault, seen in FAULTS:
            print(f"| {fault} | {seen} |")
        print("\n## Tested elsewhere\n")
        print("| input | test |")
        print("| --- | --- |")
        for text, (path, test) in zip(ELSEWHERE_TEXT, ELSEWHERE):
            print(f"| {text} | `{path}::{test}` |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


FAULTS = [
    ('SIGKILL of train.py (at any moment, a snapshot write included)',
     'nothing (killed); the loader exits with it; a half-written snapshot has no `lr_N.npy`, so '
     'the last complete one is used; its leftover temporary files go when that snapshot is '
     'written again'),
    ('SIGKILL of the loader process',
     "`error: loader process (pid 4242) was killed by signal SIGKILL while loading rows [0, 4) "
     "of '…/0000.hkl'` (exit 1)"),
    ('SIGKILL of one trainer of train_2gpu.py',
     '`error: worker rank 1 (pid 4242) failed: signal SIGKILL (then stopped the others: rank 0: '
     'exit code 1)` (exit 1)'),
    ('SIGKILL of the train_2gpu.py launcher',
     '`worker 4243: the launcher (pid 4241) has gone, exiting` from each trainer; their loaders '
     'follow'),
    ('Ctrl-C (SIGINT to the process group) of train.py, with or without para_load',
     '`interrupted` (exit 130); the loader process, in a session of its own, is stopped by its '
     'trainer; no process and no private folder (`proc_load-<pid>-…`) is left'),
    ('SIGINT to the loader process alone',
     "`error: loader process (pid 4242) was interrupted (SIGINT) while loading rows [0, 4) of "
     "'…/0000.hkl'` (exit 1)"),
    ('Ctrl-C (SIGINT) to the train_2gpu.py launcher',
     '`launcher: SIGINT received, workers stopped (rank 0: exit code 130, rank 1: exit code '
     '130); rank 0: KeyboardInterrupt` (exit 130)'),
    ('SIGTERM (preemption) to the train_2gpu.py launcher',
     '`launcher: SIGTERM received, workers stopped (rank 0: exit code 143, rank 1: exit code '
     '143); rank 0: Preempted: SIGTERM: stopped after epoch 1 and wrote a resumable snapshot to '
     '…/w; resume with resume_train=True load_epoch=1` (exit 143; the replicas agree to stop '
     'at a step that is a multiple of 10 or at the epoch\'s end)'),
    ('SIGTERM to one trainer of train_2gpu.py alone',
     '`launcher: rank 1 stopped by SIGTERM, workers stopped (rank 0: exit code 143, rank 1: '
     'exit code 143); rank 0: Preempted: SIGTERM: stopped after epoch 1 and wrote a resumable '
     'snapshot to …/w; resume with resume_train=True load_epoch=1` (exit 143, as a SIGTERM to '
     'the launcher)'),
    ('exchange: host with a /dev/shm too small for its segments (a container\'s 64 MB; '
     'tests/test_exchange.py)',
     '`error: worker rank 0 (pid 4242) failed: exit code 1: ExchangeError: rank 0: exchange: host '
     'needs 930 MiB of shared memory per replica in /dev/shm (No space left on device): use '
     'exchange: gloo, or give it more room (a container: docker run --shm-size)` (exit 1)'),
    ('SIGTERM to train.py',
     '`preempted: SIGTERM: stopped after step 1 of epoch 2 and wrote a resumable snapshot to …/w; '
     'resume with resume_train=True load_epoch=2` (exit 143; during an epoch\'s last step: '
     '`stopped after epoch 1`, an ordinary complete snapshot)'),
    ('the disk fills (or RLIMIT_FSIZE is hit) while a snapshot is written',
     '`error: snapshot 2 was not written, its files in …/w are incomplete: cannot write '
     '…/w/W_5_2.npy (disk full or over a file-size limit?): …; the last complete snapshot is '
     'epoch 1` (exit 1)'),
    ('a batch file truncated while the run goes on',
     "`error: cannot read batch file '…/0001.hkl' (truncated or corrupt?): Unable to "
     "synchronously open file (truncated file: …)` (exit 1)"),
    ('a learning rate far too high: the loss becomes NaN',
     '`error: the training loss became nan at iteration 7 (epoch 2); stopped instead of '
     'training on garbage: the last good snapshot is epoch 1 in …/w; lower the learning rate '
     'it holds (…/w/lr_1.npy) and resume with resume_train=True load_epoch=1` (exit 1)'),
    ("the last step of an epoch spoils the weights (NaN), its loss still finite",
     '`error: the validation loss became nan after epoch 1; stopped instead of training on '
     'garbage: no snapshot was written yet; start again with a lower learning_rate (and '
     'overwrite=True)` (exit 1; '
     'no snapshot of the spoilt weights)'),
]

ELSEWHERE_TEXT = [
    'a truncated JPEG among the training images (make_hkl.py; names the file, suggests '
    '`--skip-bad`)',
    'a release zip with a member path like `../W_0_65.npy` (import_params.py: unsafe path)',
    'release files of the wrong shape or dtype, or pickled (import_params.py names each)',
    'a training folder (WNID) absent from the devkit (make_train_val_txt.py names it)',
    'proc_load.py started by hand, without its start-up line',
    'weights_dir on a read-only mount: `error: weights_dir …/w cannot be written: Read-only '
    'file system; choose another weights_dir` (exit 1, within seconds of the start)',
    "another project's `config.yaml` in the current folder with a key this one lacks: `config "
    "error: unknown key 'learning_rat' in …/config.yaml (found in the current folder); did you "
    "mean 'learning_rate'?` (exit 2); with valid keys it is merged and the start block says "
    "`…/config.yaml (found in the current folder)`",
    'validate.py with data other than the run trained on: `config error: the run in …/w trained '
    'on another preprocessing output (…) than val_folder, label_folder and mean_file (…); point '
    'them at the data it trained on` (exit 2)',
    'resuming a run that already has its n_epochs: `nothing to train: snapshot 2 in …/w already '
    'ends this run (n_epochs: 2); to train more, raise n_epochs (n_epochs=12 '
    'resume_train=True load_epoch=2)` (exit 0)',
    'a yaml with `gpu:` given to train_2gpu.py: `notice: gpu (in …/mine.yaml) ignored: '
    'train_2gpu.py takes its devices from gpus (or gpu0 and gpu1)`, and the run trains',
    'where a run writes, and how much: the start block names the config files merged and why '
    '(`config: …/config.yaml (the defaults); …/config.yaml (found in the current folder); '
    '…/mine.yaml (named); the command line (key=value)`), the data folders, `weights_dir: '
    '…/runs/first (set in …/mine.yaml, relative to its folder): a new run` and `a snapshot '
    'takes 465 MiB; this run keeps up to 4 (1.8 GiB; keep_snapshots: 3, the last ones and the '
    'best)`',
    'other files beside the images of a class folder: `notice: train_img_dir …/train: 2 files '
    'not named as an image (.jpeg, .jpg, .png, .bmp, .webp, ... in any case) are left out, e.g. '
    'README.txt` (a folder there stops the run: see the preprocessing rows)',
    "a devkit without the `words` field: `notice: devkit file …/meta_clsloc.mat has no 'words' "
    "(class names) for its classes: …/misc/synset_words.txt names them by WNID alone`",
    'preprocessing under a file-size limit (`ulimit -f`): `error: cannot write batch file '
    '…/0000.hkl (File too large): over the file-size limit (ulimit -f); raise the limit '
    '(ulimit -f unlimited) and run the same command again: complete files are kept` (exit 1)',
    "a decoding process of make_hkl.py killed (the kernel's out-of-memory killer): `error: a "
    'decoding process (pid N) died (signal SIGKILL) with …/0001.hkl to make: out of memory? '
    '(--workers N runs fewer); run the same command again to continue` (exit 1, at once)',
    'SIGTERM to make_hkl.py (a batch system\'s time limit; to the whole process group too): '
    '`interrupted` (exit 130, at once), as Ctrl-C: its decoding processes are gone, the complete '
    'batch files stay and the same command goes on from them',
]

if __name__ == '__main__':
    main()
