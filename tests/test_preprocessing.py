"""End-to-end tests of preprocessing/: the real scripts (and shell scripts) in subprocesses, on
trees with every quirk of the real ImageNet (tests/preproc_tree.py), checked image by image."""
import ctypes
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import default_sigint

from preproc_tree import (DEVKIT_IDS, DEVKITS, NODES, PALETTE, RGBA_COLOUR, WNIDS, build_tree,
                          truncate, write_image, write_meta)

from alexnet_lib import provenance
from alexnet_lib.batch_files import batch_rows, list_batch_files
from alexnet_lib.config import ConfigError
from alexnet_lib.images import IMAGE_SUFFIXES, ImageDecodeError, is_image_name, load_image_256
from alexnet_lib.devkit import read_devkit_synsets
from alexnet_lib.imagenet import PrepError, load_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREP = os.path.join(REPO, 'preprocessing')

ENV = dict(os.environ, PYTHON=sys.executable)


def run(args, cwd):
    """Run a preprocessing script (.py with this Python, .sh with bash) from folder ``cwd``."""
    script = os.path.join(PREP, args[0])
    cmd = (['bash', script] if script.endswith('.sh') else [sys.executable, script]) + args[1:]
    return subprocess.run(cmd, cwd=str(cwd), env=ENV, capture_output=True, text=True, timeout=300)


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def error_line(result):
    """The one 'error: ...' line of a failed run (and no traceback)."""
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert 'Traceback' not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1, result.stderr
    return errors[0]


def load(path):
    return np.load(path, allow_pickle=False)


def shuffled_order(paths):
    return load(os.path.join(paths['misc_dir'], 'shuffled_train_filenames.npy')).tolist()


def record_folders(paths):
    """The four folders that carry a preprocessing record, by the config key naming each."""
    return {'train_folder': paths['train_batch_dir'], 'val_folder': paths['val_batch_dir'],
            'label_folder': paths['labels_dir'], 'mean_file': paths['misc_dir']}


def records(paths):
    return {key: provenance.read_record(folder) for key, folder in record_folders(paths).items()}


def assert_record_describes(paths, train_names, val_names):
    """The four folders carry one record, and it describes the batches and labels written:
    ``train_names`` the training order the batches were cut from, ``val_names`` the
    validation images of the batches."""
    found = records(paths)
    record = found['train_folder']
    assert record is not None and all(r == record for r in found.values()), found
    assert provenance.check_together(record_folders(paths)) == record
    train_files = list_batch_files(paths['train_batch_dir'])
    val_files = list_batch_files(paths['val_batch_dir'])
    assert record['batch_size'] == 256
    assert record['train_images'] == len(train_names)
    assert record['train_order_sha1'] == provenance.fingerprint(train_names)
    assert record['train_batches'] == len(train_files) == len(train_names) // 256
    assert all(batch_rows(f) == 256 for f in train_files)
    assert record['val_images'] == len(val_names) == sum(batch_rows(f) for f in val_files)
    assert record['val_list_sha1'] == provenance.fingerprint(val_names)
    assert record['val_batches'] == len(val_files)
    labels = paths['labels_dir']
    assert len(load(os.path.join(labels, 'train_labels.npy'))) == record['train_images']
    assert len(load(os.path.join(labels, 'val_labels.npy'))) == record['val_images']
    return record


def read_batches(folder):
    out = []
    for path in list_batch_files(folder):
        with h5py.File(path, 'r') as h5:
            out.append(h5['data'][()])
    return out


def independent_decode(path):
    """Decode with plain PIL (full-size decode, no libjpeg scaling), then resize like the
    original pipeline: bilinear to 256x256, grey replicated, alpha dropped."""
    img = Image.open(path)
    if img.mode == 'I;16':
        img = Image.fromarray((np.asarray(img, np.uint16) // 257).astype(np.uint8))
    return np.asarray(img.convert('RGB').resize((256, 256), Image.Resampling.BILINEAR))


def assert_row_is_image(row, path, kind):
    np.testing.assert_array_equal(row, load_image_256(path), err_msg=path)
    expected = independent_decode(path).astype(int)
    if kind == 'big':  # libjpeg decoded it at 1/4 scale: close, not bit-identical
        diff = np.abs(row.astype(int) - expected)
        assert diff.mean() < 2.0 and np.percentile(diff, 99) < 12, path
    else:
        np.testing.assert_array_equal(row, expected, err_msg=path)


# ---------------------------------------------------------------- the main end-to-end run

@pytest.fixture(scope='module')
def done(tmp_path_factory):
    """A quirky tree preprocessed by generate_data.sh, run from an unrelated folder with a
    paths.yaml whose relative paths point elsewhere."""
    tmp = tmp_path_factory.mktemp('prep')
    tree = build_tree(tmp / 'imagenet', per_class=(200, 150, 250), n_val=300)
    yaml_path = tree.write_paths_yaml(tmp / 'cfg' / 'paths.yaml', tmp / 'out')
    elsewhere = tmp / 'elsewhere'
    elsewhere.mkdir()
    result = ok(run(['generate_data.sh', '../cfg/paths.yaml', '--workers', '2'], elsewhere))
    paths = load_paths(yaml_path)
    return tree, paths, yaml_path, result


@pytest.mark.slow
def test_paths_resolve_against_the_yaml_folder(done):
    tree, paths, _, _ = done
    out = os.path.join(os.path.dirname(tree.root), 'out')
    assert paths['train_img_dir'] == tree.train_dir
    assert paths['train_batch_dir'] == os.path.join(out, 'train_hkl_b256_b_256')
    assert paths['val_batch_dir'] == os.path.join(out, 'val_hkl_b256_b_256')
    assert paths['labels_dir'] == os.path.join(out, 'labels')


def test_training_order_is_sorted_then_shuffled_with_seed_1(done):
    tree, paths, _, _ = done
    saved = np.load(os.path.join(paths['misc_dir'], 'shuffled_train_filenames.npy'),
                    allow_pickle=False)
    expected = np.asarray(tree.train_files())
    np.random.seed(1)  # the original: np.random.seed(1); np.random.shuffle(sorted names)
    np.random.shuffle(expected)
    assert saved.dtype.kind == 'U'
    assert saved.tolist() == expected.tolist()


@pytest.mark.slow
def test_every_training_image_is_in_its_batch_row(done):
    tree, paths, _, _ = done
    order = np.load(os.path.join(paths['misc_dir'], 'shuffled_train_filenames.npy'),
                    allow_pickle=False).tolist()
    batches = read_batches(paths['train_batch_dir'])
    assert len(order) == 600
    assert [b.shape for b in batches] == [(256, 256, 256, 3)] * 2  # the last 88 are dropped
    for i, name in enumerate(order[:512]):
        assert_row_is_image(batches[i // 256][i % 256], os.path.join(tree.train_dir, name),
                            tree.kind[name])


def test_validation_keeps_every_image_in_sorted_order(done):
    tree, paths, _, _ = done
    batches = read_batches(paths['val_batch_dir'])
    assert [len(b) for b in batches] == [256, 44]  # the short last batch is kept
    rows = np.concatenate(batches)
    for i, name in enumerate(tree.val_names):
        assert_row_is_image(rows[i], os.path.join(tree.val_dir, name), tree.kind[name])


def test_labels_follow_the_batches(done):
    tree, paths, _, _ = done
    order = np.load(os.path.join(paths['misc_dir'], 'shuffled_train_filenames.npy'),
                    allow_pickle=False).tolist()
    train_labels = np.load(os.path.join(paths['labels_dir'], 'train_labels.npy'),
                           allow_pickle=False)
    val_labels = np.load(os.path.join(paths['labels_dir'], 'val_labels.npy'), allow_pickle=False)
    # label = index of the WNID among the sorted folders, not the devkit id
    assert train_labels.tolist() == [tree.train_label[name] for name in order]
    assert val_labels.tolist() == tree.val_label
    assert train_labels.dtype == np.int64 and val_labels.dtype == np.int64


def test_the_four_folders_carry_the_record_of_what_was_written(done):
    tree, paths, _, result = done
    order = shuffled_order(paths)
    assert len(order) == 600  # 2 batches, the 88 of the dropped partial batch in the record
    record = assert_record_describes(paths, order, tree.val_names)
    assert record['train_images'] == 600 and record['train_batches'] == 2
    assert record['val_images'] == 300 and record['val_batches'] == 2
    assert 'preprocessing.json' in result.stdout


def test_caffe_style_lists(done):
    tree, paths, _, _ = done
    with open(paths['traintxt_filename']) as f:
        assert f.read().splitlines() == [f'{n} {tree.train_label[n]}' for n in tree.train_files()]
    with open(paths['valtxt_filename']) as f:
        assert f.read().splitlines() == [f'{n} {label}'
                                         for n, label in zip(tree.val_names, tree.val_label)]
    with open(os.path.join(paths['misc_dir'], 'synset_words.txt')) as f:
        assert f.read().splitlines() == [f'{w} words of {w}' for w in WNIDS]


@pytest.mark.slow
def test_mean_image_is_the_mean_of_the_training_batches(done):
    _, paths, _, _ = done
    mean = np.load(os.path.join(paths['misc_dir'], 'img_mean.npy'), allow_pickle=False)
    rows = np.concatenate(read_batches(paths['train_batch_dir']))
    assert mean.dtype == np.float32 and mean.shape == (3, 256, 256)
    expected = rows.astype(np.float64).mean(axis=0).transpose(2, 0, 1)
    np.testing.assert_allclose(mean, expected, rtol=0, atol=1e-4)


def test_colours_of_quirky_images_are_right(done):
    tree, paths, _, _ = done
    order = np.load(os.path.join(paths['misc_dir'], 'shuffled_train_filenames.npy'),
                    allow_pickle=False).tolist()
    batches = read_batches(paths['train_batch_dir'])
    rows = {name: batches[i // 256][i % 256] for i, name in enumerate(order[:512])}
    rows.update(zip(tree.val_names, np.concatenate(read_batches(paths['val_batch_dir']))))
    seen = set()
    for name, row in rows.items():
        kind = tree.kind[name]
        seen.add(kind)
        if kind == 'cmyk_red':  # pure red CMYK comes out pure red RGB
            assert np.abs(row.astype(int) - (255, 0, 0)).max() <= 2, name
        elif kind in ('grey', 'la_png', 'grey16_png'):  # grey replicated to three channels
            assert (row[..., 0] == row[..., 1]).all() and (row[..., 1] == row[..., 2]).all()
        elif kind == 'rgba_png':  # alpha dropped, not composited (alpha is 0 at the left)
            assert (row == RGBA_COLOUR).all(), name
        elif kind == 'palette_png':  # palette colours, the transparent index included
            assert tuple(row[0, 0]) == PALETTE[0] and tuple(row[0, -1]) == PALETTE[1]
            assert tuple(row[-1, 0]) == PALETTE[2] and tuple(row[-1, -1]) == PALETTE[3]
        if kind == 'grey16_png':  # a 0..65535 ramp from left to right
            assert row[0, 0, 0] == 0 and row[0, -1, 0] == 255
    assert {'cmyk_red', 'grey', 'rgba_png', 'palette_png', 'png', 'big', 'cmyk'} <= seen


def test_rerun_skips_complete_batches_and_ignores_leftover_tmp_files(done):
    tree, paths, yaml_path, _ = done
    train_dir, val_dir = paths['train_batch_dir'], paths['val_batch_dir']
    before = {p: os.stat(p).st_mtime_ns for d in (train_dir, val_dir) for p in list_batch_files(d)}
    second = os.path.join(train_dir, '0001.hkl')
    with open(second, 'rb') as f:
        second_bytes = f.read()
    mean_file = os.path.join(paths['misc_dir'], 'img_mean.npy')
    mean_before = np.load(mean_file, allow_pickle=False)
    # as if a run was killed while writing batch 1: no 0001.hkl, a half-written tmp file
    os.unlink(second)
    with open(second + '.tmp4242', 'wb') as f:
        f.write(second_bytes[:1000])
    assert len(list_batch_files(train_dir)) == 1  # a tmp file is not a batch

    result = ok(run(['make_hkl.py', '--paths', yaml_path, '--workers', '2'], REPO))
    assert '(1 complete, 1 to make)' in result.stdout
    assert '(2 complete, 0 to make)' in result.stdout
    assert not [n for n in os.listdir(train_dir) if '.tmp' in n]
    for path, mtime in before.items():
        if path != second:
            assert os.stat(path).st_mtime_ns == mtime, f"{path} was rewritten"
    rows = read_batches(train_dir)[1]
    order = np.load(os.path.join(paths['misc_dir'], 'shuffled_train_filenames.npy'),
                    allow_pickle=False).tolist()
    for i in range(0, 256, 15):
        name = order[256 + i]
        assert_row_is_image(rows[i], os.path.join(tree.train_dir, name), tree.kind[name])
    np.testing.assert_array_equal(np.load(mean_file, allow_pickle=False), mean_before)
    assert_record_describes(paths, order, tree.val_names)


def test_stale_batches_beyond_the_run_are_refused(done):
    _, paths, yaml_path, _ = done
    extra = os.path.join(paths['val_batch_dir'], '0002.hkl')
    with open(os.path.join(paths['val_batch_dir'], '0001.hkl'), 'rb') as f, open(extra, 'wb') as g:
        g.write(f.read())
    before = records(paths)
    try:
        line = error_line(run(['make_hkl.py', '--paths', yaml_path, '--workers', '2'], REPO))
        assert '0002.hkl' in line
        assert records(paths) == before  # refused before anything changed: the record stays
    finally:
        os.unlink(extra)


def make_hkl_past_its_first_batch(tmp_path, workers, **popen):
    """make_hkl.py (--workers ``workers``) on a tree of four training batches, running, once
    it has written the first: (the process, the tree, its paths.yaml, load_paths of it)."""
    tree = build_tree(tmp_path / 'imagenet', per_class=(400, 300, 330), n_val=10, quirks=False)
    yaml_path = tree.write_paths_yaml(tmp_path / 'paths.yaml', tmp_path / 'out')
    paths = load_paths(yaml_path)
    first = os.path.join(paths['train_batch_dir'], '0000.hkl')
    proc = subprocess.Popen([sys.executable, os.path.join(PREP, 'make_hkl.py'), '--paths',
                             yaml_path, '--workers', str(workers)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)
    deadline = time.monotonic() + 120
    while not os.path.exists(first) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if not os.path.exists(first):
        proc.kill()
        _, stderr = proc.communicate()
        raise AssertionError(f'make_hkl.py wrote no batch file: {stderr[-2000:]}')
    return proc, tree, yaml_path, paths


@pytest.mark.slow
def test_ctrl_c_then_rerun_finishes_the_same_batches(tmp_path):
    proc, tree, yaml_path, paths = make_hkl_past_its_first_batch(tmp_path, 1,
                                                                 preexec_fn=default_sigint)
    proc.send_signal(signal.SIGINT)  # Ctrl-C after the first of four training batches
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert 'interrupted' in stderr and 'Traceback' not in stderr
    assert len(list_batch_files(paths['train_batch_dir'])) < 4

    result = ok(run(['make_hkl.py', '--paths', yaml_path, '--workers', '2'], REPO))
    train_line, = [line for line in result.stdout.splitlines() if line.startswith('train: ')
                   and ' to make)' in line]
    assert '(0 complete' not in train_line  # the batches of the first run were kept
    rows = np.concatenate(read_batches(paths['train_batch_dir']))
    order = np.load(os.path.join(paths['misc_dir'], 'shuffled_train_filenames.npy'),
                    allow_pickle=False).tolist()
    assert len(rows) == 1024
    for i in range(0, 1024, 9):
        assert_row_is_image(rows[i], os.path.join(tree.train_dir, order[i]), 'rgb')
    mean = np.load(os.path.join(paths['misc_dir'], 'img_mean.npy'), allow_pickle=False)
    np.testing.assert_allclose(mean, rows.mean(axis=0, dtype=np.float64).transpose(2, 0, 1),
                               rtol=0, atol=1e-4)
    ok(run(['make_train_val_txt.py', '--paths', yaml_path], REPO))
    ok(run(['make_labels.py', '--paths', yaml_path], REPO))
    record = assert_record_describes(paths, order, tree.val_names)

    # a rerun that is stopped (by SIGTERM: kill, a batch system's time limit, the same as
    # Ctrl-C, its decoding processes gone with it) takes the record away from every folder it
    # changes, so that none describes a half-rewritten output
    for path in list_batch_files(paths['train_batch_dir'])[1:]:
        os.unlink(path)
    second = os.path.join(paths['train_batch_dir'], '0001.hkl')
    proc = subprocess.Popen([sys.executable, os.path.join(PREP, 'make_hkl.py'), '--paths',
                             yaml_path, '--workers', '2'], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    while not os.path.exists(second) and proc.poll() is None:
        time.sleep(0.01)
    workers = subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and 'Traceback' not in stderr, stderr
    assert not [w for w in workers if os.path.exists(f'/proc/{w}')]  # no decoder left behind
    assert len(list_batch_files(paths['train_batch_dir'])) < 4
    assert not [n for n in os.listdir(paths['train_batch_dir']) if '.tmp' in n]
    found = records(paths)
    assert found['train_folder'] is found['val_folder'] is found['mean_file'] is None, found
    assert found['label_folder'] == record  # make_labels.py's, of the run before
    with pytest.raises(ConfigError, match='train_folder, val_folder and mean_file have no '
                                          'preprocessing.json, but label_folder was written'):
        provenance.check_together(record_folders(paths))
    line = error_line(run(['make_labels.py', '--paths', yaml_path], REPO))
    assert 'preprocessing.json' in line and 'run make_hkl.py first' in line

    ok(run(['make_hkl.py', '--paths', yaml_path, '--workers', '2'], REPO))
    assert assert_record_describes(paths, order, tree.val_names) == record


def wait_until_idle(pids, seconds=30.0):
    """Until every process of ``pids`` has been asleep (state S) for a second without using the
    CPU: stuck on a pipe or a lock, or waiting for work."""
    def sample():
        out = []
        for pid in pids:
            with open(f'/proc/{pid}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
            out.append((fields[0], int(fields[11]) + int(fields[12])))  # state, utime + stime
        return out

    deadline = time.monotonic() + seconds
    last = sample()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = sample()
        if now == last and all(state == 'S' for state, _ in now):
            return
        last = now
    raise AssertionError(f'processes {pids} still busy after {seconds:.0f} s')


def signal_thread(pid, tid, signum):
    """``signum`` to thread ``tid`` of process ``pid`` alone (tgkill): as the kernel may deliver
    a signal sent to the process."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, 'tgkill'):
        pytest.skip('no tgkill in this C library')
    if libc.tgkill(pid, tid, signum) != 0:
        raise OSError(ctypes.get_errno(), f'tgkill {pid} {tid}')


@pytest.mark.slow
@pytest.mark.parametrize('case', ['to every process', 'to another thread'])
def test_sigterm_stops_the_run_at_once_whatever_its_processes_do(tmp_path, case):
    """SIGTERM stops the run at once, as Ctrl-C does, and no decoding process is left.
    'to every process' (a batch system's time limit, kill -TERM -PGID) while a decoding process
    is in the middle of sending its result, a batch's sum, larger than a pipe holds (the main
    process is held by SIGSTOP meanwhile, so that the results wait in the pipes): one killed
    there kept the lock of multiprocessing.Pool's result queue for ever, and stopping the pool
    waited for that lock. 'to another thread': the signal reaches a thread of the main process
    other than the one that waits for the decoding processes (tqdm's monitor; the kernel may
    choose any), while those cannot answer (held by SIGSTOP): the wait still ends."""
    proc, _, _, paths = make_hkl_past_its_first_batch(tmp_path, 2, preexec_fn=default_sigint,
                                                      start_new_session=True)
    try:
        workers = subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True,
                                 text=True).stdout.split()
        assert len(workers) == 2  # three of four training batches still to come
        if case == 'to every process':
            os.kill(proc.pid, signal.SIGSTOP)
            wait_until_idle(workers)
            os.killpg(proc.pid, signal.SIGTERM)
            os.kill(proc.pid, signal.SIGCONT)
        else:
            for pid in workers:
                os.kill(int(pid), signal.SIGSTOP)
            wait_until_idle([str(proc.pid)])
            others = [int(t) for t in os.listdir(f'/proc/{proc.pid}/task') if t != str(proc.pid)]
            assert others
            signal_thread(proc.pid, others[0], signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130 and 'interrupted' in stderr and 'Traceback' not in stderr, \
        stderr
    assert not [w for w in workers if os.path.exists(f'/proc/{w}')]
    assert len(list_batch_files(paths['train_batch_dir'])) < 4
    assert not [n for n in os.listdir(paths['train_batch_dir']) if '.tmp' in n]


@pytest.mark.slow
def test_a_decoding_process_that_dies_stops_the_run_naming_it(tmp_path):
    """A decoding process killed (by the kernel's out-of-memory killer, say) stops the run with
    one line naming it, at once: not a wait for results that never come (a pool that starts a
    new worker in its place loses the task the dead one had)."""
    proc, _, _, paths = make_hkl_past_its_first_batch(tmp_path, 2, start_new_session=True)
    try:
        workers = subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True,
                                 text=True).stdout.split()
        assert len(workers) == 2
        for pid in workers:  # three of four training batches still to come
            os.kill(int(pid), signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    line = error_line(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert re.fullmatch(r'error: a decoding process \(pid (\d+)\) died \(signal SIGKILL\) '
                        r'with \S+\.hkl to (make|read): out of memory\? \(--workers N runs '
                        r'fewer\); run the same command again to continue', line), line
    assert re.search(r'pid (\d+)', line).group(1) in workers
    assert not [n for n in os.listdir(paths['train_batch_dir']) if '.tmp' in n]


# ---------------------------------------------------------------- unreadable images

@pytest.fixture
def bad_tree(tmp_path):
    """520 training images (2 full batches), 20 validation images; one training image in the
    first batch and one validation image are broken."""
    tree = build_tree(tmp_path / 'imagenet', per_class=(300, 220, 0), n_val=20, quirks=False)
    order = np.asarray(tree.train_files())
    np.random.RandomState(1).shuffle(order)
    bad_train = str(order[5])
    truncate(os.path.join(tree.train_dir, bad_train))
    bad_val = tree.val_names[7]
    with open(os.path.join(tree.val_dir, bad_val), 'w') as f:
        f.write('not an image\n')
    yaml_path = tree.write_paths_yaml(tmp_path / 'paths.yaml', tmp_path / 'out')
    return tree, yaml_path, bad_train, bad_val, load_paths(yaml_path)


def test_a_truncated_image_stops_the_run_naming_the_file(bad_tree):
    tree, yaml_path, bad_train, _, paths = bad_tree
    line = error_line(run(['make_hkl.py', '--paths', yaml_path, '--workers', '2'], REPO))
    assert os.path.join(tree.train_dir, bad_train) in line and 'truncated' in line
    assert '--skip-bad' in line
    assert not os.path.exists(os.path.join(paths['train_batch_dir'], '0000.hkl'))
    # the shell script stops too, with the same message
    result = run(['generate_data.sh', yaml_path, '--workers', '2'], REPO)
    assert result.returncode != 0 and bad_train in result.stderr


@pytest.mark.slow
def test_skip_bad_leaves_images_out_of_batches_and_labels(bad_tree):
    tree, yaml_path, bad_train, bad_val, paths = bad_tree
    result = ok(run(['generate_data.sh', yaml_path, '--skip-bad', '--workers', '2'], REPO))
    assert f'leaving out {bad_train}: cannot read image' in result.stdout

    with open(os.path.join(paths['misc_dir'], 'skipped_train_images.txt')) as f:
        listed = [line.split('\t')[0] for line in f if not line.startswith('#')]
    assert listed == [bad_train]
    with open(os.path.join(paths['misc_dir'], 'skipped_val_images.txt')) as f:
        assert [line.split('\t')[0] for line in f if not line.startswith('#')] == [bad_val]

    order = np.load(os.path.join(paths['misc_dir'], 'shuffled_train_filenames.npy'),
                    allow_pickle=False).tolist()
    good = [name for name in order if name != bad_train]
    rows = np.concatenate(read_batches(paths['train_batch_dir']))
    assert len(rows) == 512
    for i in list(range(0, 512, 7)) + [4, 5, 6, 255, 256, 511]:
        assert_row_is_image(rows[i], os.path.join(tree.train_dir, good[i]), 'rgb')
    train_labels = np.load(os.path.join(paths['labels_dir'], 'train_labels.npy'))
    assert train_labels.tolist() == [tree.train_label[name] for name in good]
    mean = np.load(os.path.join(paths['misc_dir'], 'img_mean.npy'), allow_pickle=False)
    np.testing.assert_allclose(mean, rows.mean(axis=0, dtype=np.float64).transpose(2, 0, 1),
                               rtol=0, atol=1e-4)

    val_rows = np.concatenate(read_batches(paths['val_batch_dir']))
    val_good = [(n, label) for n, label in zip(tree.val_names, tree.val_label) if n != bad_val]
    assert len(val_rows) == 19
    for row, (name, _) in zip(val_rows, val_good):
        assert_row_is_image(row, os.path.join(tree.val_dir, name), 'rgb')
    val_labels = np.load(os.path.join(paths['labels_dir'], 'val_labels.npy'))
    assert val_labels.tolist() == [label for _, label in val_good]

    # the record: the order less the image left out, the dropped partial batch included
    assert_record_describes(paths, good, [n for n, _ in val_good])
    assert '(1 file)' in result.stdout and '(1 files)' not in result.stdout

    # a re-run, with or without --skip-bad, keeps leaving them out and redoes nothing
    result = ok(run(['make_hkl.py', '--paths', yaml_path, '--workers', '2'], REPO))
    assert '(2 complete, 0 to make)' in result.stdout
    assert '(1 complete, 0 to make)' in result.stdout
    assert_record_describes(paths, good, [n for n, _ in val_good])

    # the image downloaded again and the report deleted: the batches from it on hold other
    # images now, and are made again
    write_image(os.path.join(tree.train_dir, bad_train), 'rgb', np.random.RandomState(5))
    os.unlink(os.path.join(paths['misc_dir'], 'skipped_train_images.txt'))
    result = ok(run(['generate_data.sh', yaml_path, '--workers', '2'], REPO))
    assert f"2 batches in {paths['train_batch_dir']} were cut from other images" in result.stdout
    assert '(0 complete, 2 to make)' in result.stdout
    assert_batches_hold(paths, tree, order, [n for n, _ in val_good])


# ---------------------------------------------------------------- what each batch holds

@pytest.fixture
def one_batch_tree(tmp_path):
    """260 training images (one full batch, 4 dropped), 6 validation images."""
    tree = build_tree(tmp_path / 'imagenet', per_class=(100, 100, 60), n_val=6, quirks=False)
    yaml_path = tree.write_paths_yaml(tmp_path / 'paths.yaml', tmp_path / 'out')
    return tree, yaml_path, load_paths(yaml_path)


def assert_batches_hold(paths, tree, order, val_names=None):
    """Every row of the training batches is its image of ``order``, the labels follow
    ``order``, and the record describes both (and ``val_names``, all of them unless given)."""
    rows = np.concatenate(read_batches(paths['train_batch_dir']))
    assert len(rows) == len(order) // 256 * 256
    for row, name in zip(rows, order):
        np.testing.assert_array_equal(row, load_image_256(os.path.join(tree.train_dir, name)),
                                      err_msg=name)
    labels = load(os.path.join(paths['labels_dir'], 'train_labels.npy'))
    assert labels.tolist() == [tree.train_label[name] for name in order]
    assert_record_describes(paths, order, tree.val_names if val_names is None else val_names)


def test_a_new_training_order_makes_the_batches_again(one_batch_tree):
    """An image gone from the tree: the saved order no longer fits and says so; deleting it
    (as the error says) gives a new order, and the batch cut from the old one is made again."""
    tree, yaml_path, paths = one_batch_tree
    ok(run(['generate_data.sh', yaml_path, '--workers', '2'], REPO))
    first = shuffled_order(paths)
    os.unlink(os.path.join(tree.train_dir, first[0]))
    del tree.train_label[first[0]]
    order_file = os.path.join(paths['misc_dir'], 'shuffled_train_filenames.npy')
    line = error_line(run(['make_hkl.py', '--paths', yaml_path, '--workers', '2'], REPO))
    assert line == (f"error: {order_file} is not an order of the images of train_img_dir "
                    f"{tree.train_dir} (260 listed, 259 there; {first[0]} is not in the tree): "
                    f"put the images back, or delete it to start over with a new order (every "
                    f"batch is made again)")
    os.unlink(order_file)
    result = ok(run(['generate_data.sh', yaml_path, '--workers', '2'], REPO))
    assert (f"1 batch in {paths['train_batch_dir']} were cut from other images (another "
            f"training order, or other images left out): making them again") in result.stdout
    second = shuffled_order(paths)
    assert len(second) == 259 and second[:256] != first[1:257]
    assert_batches_hold(paths, tree, second)


def test_batches_without_their_images_record_are_kept_only_when_the_output_record_fits(
        one_batch_tree):
    """Batches of a complete output made before batch_images.json existed are kept (its
    preprocessing.json describes them); without that record what they hold is unknown."""
    tree, yaml_path, paths = one_batch_tree
    ok(run(['generate_data.sh', yaml_path, '--workers', '2'], REPO))
    folders = (paths['train_batch_dir'], paths['val_batch_dir'])
    for folder in folders:
        os.unlink(os.path.join(folder, 'batch_images.json'))
    result = ok(run(['make_hkl.py', '--paths', yaml_path, '--workers', '2'], REPO))
    assert result.stdout.count('(1 complete, 0 to make)') == 2
    assert all(os.path.isfile(os.path.join(f, 'batch_images.json')) for f in folders)
    assert_batches_hold(paths, tree, shuffled_order(paths))

    os.unlink(os.path.join(paths['train_batch_dir'], 'batch_images.json'))
    os.unlink(os.path.join(paths['train_batch_dir'], 'preprocessing.json'))
    line = error_line(run(['make_hkl.py', '--paths', yaml_path, '--workers', '2'], REPO))
    assert line == (f"error: {paths['train_batch_dir']} holds batch files but no "
                    f"batch_images.json, the record of the images they hold (an older or "
                    f"unfinished make_hkl.py made them, or they were copied in): delete them "
                    f"and run again")


def test_the_originals_order_of_full_paths_is_reused(one_batch_tree):
    """The original's preprocessing saved the shuffled order as full paths (every class
    folder's JPEGs, sorted, then np.random.seed(1); np.random.shuffle)."""
    tree, yaml_path, paths = one_batch_tree
    src = tree.train_dir + '/'
    names = []
    for folder in os.listdir(src):
        names += [src + folder + '/' + name for name in os.listdir(src + folder)]
    names = np.asarray(sorted(names))
    np.random.RandomState(1).shuffle(names)
    os.makedirs(paths['misc_dir'])
    np.save(os.path.join(paths['misc_dir'], 'shuffled_train_filenames.npy'), names)
    result = ok(run(['generate_data.sh', yaml_path, '--workers', '2'], REPO))
    assert 'training order: reusing' in result.stdout
    order = [name[len(src):] for name in names.tolist()]
    ours = np.asarray(tree.train_files())
    np.random.RandomState(1).shuffle(ours)
    assert order == ours.tolist()  # the same order as one of our own
    assert_batches_hold(paths, tree, order)


def test_generate_data_takes_the_paths_file_as_an_option_too(one_batch_tree, tmp_path):
    """--paths, as every script takes it: all three steps read that file."""
    tree, yaml_path, paths = one_batch_tree
    result = ok(run(['generate_data.sh', '--paths', str(yaml_path), '--workers', '2'], tmp_path))
    assert os.path.isfile(os.path.join(paths['misc_dir'], 'train.txt'))
    assert f"paths from {yaml_path}" in result.stdout
    assert_batches_hold(paths, tree, shuffled_order(paths))


# ---------------------------------------------------------------- configuration errors

@pytest.fixture
def small_tree(tmp_path):
    tree = build_tree(tmp_path / 'imagenet', per_class=(3, 2, 2), n_val=4, quirks=False)
    return tree, tmp_path


def test_missing_paths_key_is_named(small_tree):
    tree, tmp = small_tree
    yaml_path = tree.write_paths_yaml(tmp / 'paths.yaml', tmp / 'out', misc_dir=None)
    for script in ('make_hkl.py', 'make_train_val_txt.py', 'make_labels.py'):
        line = error_line(run([script, '--paths', yaml_path], tmp))
        assert "'misc_dir'" in line and 'paths.yaml' in line
    assert run(['generate_data.sh', yaml_path], tmp).returncode != 0


def test_one_batch_folder_for_both_splits_is_refused(small_tree):
    tree, tmp = small_tree
    yaml_path = tree.write_paths_yaml(tmp / 'paths.yaml', tmp / 'out', tar_val_dir='train_hkl')
    for script in ('make_hkl.py', 'make_train_val_txt.py', 'make_labels.py'):
        line = error_line(run([script, '--paths', yaml_path], tmp))
        assert line == (f"error: paths file {yaml_path}: tar_train_dir and tar_val_dir give the "
                        f"same batch folder {tmp / 'out' / 'train_hkl_b256_b_256'}; the training "
                        f"and validation batches need folders of their own: give tar_val_dir "
                        f"another name")
    assert not os.path.exists(tmp / 'out')


def test_missing_paths_file_is_named(small_tree):
    _, tmp = small_tree
    line = error_line(run(['make_hkl.py', '--paths', 'nowhere.yaml'], tmp))
    assert 'nowhere.yaml' in line


def test_missing_folder_is_named(small_tree):
    tree, tmp = small_tree
    yaml_path = tree.write_paths_yaml(tmp / 'paths.yaml', tmp / 'out',
                                      train_img_dir='no_such_train_dir')
    for script in ('make_hkl.py', 'make_train_val_txt.py'):
        line = error_line(run([script, '--paths', yaml_path], tmp))
        assert 'train_img_dir' in line and 'no_such_train_dir' in line


def test_wnid_absent_from_the_devkit_is_named(small_tree):
    tree, tmp = small_tree
    write_meta(tree.meta, {w: i for w, i in DEVKIT_IDS.items() if w != 'n01443537'},
               tree.devkit, NODES)
    yaml_path = tree.write_paths_yaml(tmp / 'paths.yaml', tmp / 'out')
    line = error_line(run(['make_train_val_txt.py', '--paths', yaml_path], tmp))
    assert 'n01443537' in line and 'meta_clsloc.mat' in line
    result = run(['generate_data.sh', yaml_path], tmp)
    assert result.returncode != 0 and 'n01443537' in result.stderr


def test_ground_truth_line_count_must_match_validation_images(small_tree):
    tree, tmp = small_tree
    with open(tree.gt, 'a') as f:
        f.write('1\n')
    yaml_path = tree.write_paths_yaml(tmp / 'paths.yaml', tmp / 'out')
    line = error_line(run(['make_train_val_txt.py', '--paths', yaml_path], tmp))
    assert os.path.basename(tree.gt) in line and '5 lines' in line and '4 images' in line


def test_make_labels_before_make_hkl_says_what_to_run(small_tree):
    tree, tmp = small_tree
    yaml_path = tree.write_paths_yaml(tmp / 'paths.yaml', tmp / 'out')
    ok(run(['make_train_val_txt.py', '--paths', yaml_path], tmp))
    line = error_line(run(['make_labels.py', '--paths', yaml_path], tmp))
    assert 'train_hkl_b256_b_256 has no preprocessing.json' in line
    assert 'run make_hkl.py first' in line


# ---------------------------------------------------------------- the two devkits

@pytest.mark.slow
@pytest.mark.parametrize('devkit', sorted(DEVKITS))
def test_each_devkit_layout_end_to_end(tmp_path, devkit):
    """Either devkit's files give the same labels: the index of the WNID among the sorted
    training folders, for validation images through the ground truth's ids."""
    tree = build_tree(tmp_path / 'imagenet', per_class=(100, 90, 80), n_val=30, quirks=False,
                      devkit=devkit)
    folder, meta_name, _, gt_name = DEVKITS[devkit]
    assert tree.meta.endswith(os.path.join(folder, 'data', meta_name))
    assert tree.gt.endswith(os.path.join(folder, 'data', gt_name))
    import scipy.io  # the file has its devkit's id field and internal nodes besides the classes
    synsets = scipy.io.loadmat(tree.meta, squeeze_me=True)['synsets']
    assert synsets.dtype.names[0] == DEVKITS[devkit][2]
    assert sorted(synsets['WNID'][synsets['num_children'] > 0]) == sorted(NODES)
    yaml_path = tree.write_paths_yaml(tmp_path / 'cfg' / 'paths.yaml', tmp_path / 'out')
    ok(run(['generate_data.sh', yaml_path, '--workers', '2'], tmp_path))
    paths = load_paths(yaml_path)

    label_of_wnid = {wnid: label for label, wnid in enumerate(sorted(os.listdir(tree.train_dir)))}
    wnid_of_id = {class_id: wnid for wnid, class_id in DEVKIT_IDS.items()}
    with open(tree.gt) as f:
        gt_ids = [int(line) for line in f]
    val_expected = [label_of_wnid[wnid_of_id[class_id]] for class_id in gt_ids]
    assert val_expected == tree.val_label and len(set(val_expected)) == 3
    assert val_expected != [class_id - 1 for class_id in gt_ids]  # not the devkit's id order

    order = np.load(os.path.join(paths['misc_dir'], 'shuffled_train_filenames.npy'),
                    allow_pickle=False).tolist()
    train_labels = np.load(os.path.join(paths['labels_dir'], 'train_labels.npy'))
    val_labels = np.load(os.path.join(paths['labels_dir'], 'val_labels.npy'))
    assert train_labels.tolist() == [label_of_wnid[name.split('/')[0]] for name in order]
    assert val_labels.tolist() == val_expected
    with open(paths['traintxt_filename']) as f:
        assert f.read().splitlines() == [f"{n} {label_of_wnid[n.split('/')[0]]}"
                                         for n in sorted(order)]
    with open(paths['valtxt_filename']) as f:
        assert f.read().splitlines() == [f'{n} {label}'
                                         for n, label in zip(tree.val_names, val_expected)]
    with open(os.path.join(paths['misc_dir'], 'synset_words.txt')) as f:
        assert f.read().splitlines() == [f'{w} words of {w}' for w in label_of_wnid]


@pytest.mark.parametrize('devkit', sorted(DEVKITS))
def test_an_internal_node_is_never_a_class(small_tree, devkit):
    tree, tmp = small_tree
    meta = os.path.join(tmp, devkit, DEVKITS[devkit][1])
    write_meta(meta, DEVKIT_IDS, devkit, NODES)
    synsets = read_devkit_synsets(meta)
    assert {w: class_id for w, (class_id, _) in synsets.items()} == DEVKIT_IDS

    # a validation image labelled with a node's id
    node_wnid, (node_id, _) = next(iter(NODES.items()))
    yaml_path = tree.write_paths_yaml(tmp / 'paths.yaml', tmp / 'out', meta_clsloc_mat=meta)
    with open(tree.gt) as f:
        lines = f.readlines()
    with open(tree.gt, 'w') as f:
        f.writelines([f'{node_id}\n'] + lines[1:])
    line = error_line(run(['make_train_val_txt.py', '--paths', yaml_path], tmp))
    assert f'line 1: class id {node_id} ' in line and os.path.basename(meta) in line

    # a training folder named after a node
    os.rename(os.path.join(tree.train_dir, WNIDS[2]), os.path.join(tree.train_dir, node_wnid))
    line = error_line(run(['make_train_val_txt.py', '--paths', yaml_path], tmp))
    assert f"'{node_wnid}'" in line and 'without children' in line


def save_synsets(path, fields, rows):
    """A .mat file with a 1xN struct `synsets` of the given fields and rows."""
    import scipy.io
    synsets = np.zeros((1, len(rows)), dtype=[(f, 'O') for f in fields])
    for j, row in enumerate(rows):
        synsets[0, j] = row
    scipy.io.savemat(path, {'synsets': synsets})


def test_devkit_struct_quirks_are_read(tmp_path):
    """What loadmat(squeeze_me=True) makes of real-looking files: a 1-synset struct (0-d),
    uint8 and double ids, empty strings, no num_children; a struct whose id and WNID fields
    have other names is read by position (id first, WNID second), as the original read it."""
    path = str(tmp_path / 'meta.mat')
    save_synsets(path, ['ILSVRC2012_ID', 'WNID', 'words', 'num_children', 'children'],
                 [(np.array([[7]], np.uint8), 'n01440764', 'tench', np.array([[0]], np.uint8),
                   np.zeros((1, 0), np.uint16))])
    assert read_devkit_synsets(path) == {'n01440764': (7, 'tench')}
    save_synsets(path, ['ILSVRC2014_ID', 'WNID', 'words'],
                 [(np.array([[2.0]]), 'n01443537', ''), (1.0, 'n01440764', 'tench')])
    assert read_devkit_synsets(path) == {'n01443537': (2, ''), 'n01440764': (1, 'tench')}
    save_synsets(path, ['id', 'synset', 'num_children', 'children'],
                 [(np.array([[1]], np.uint16), 'n01440764', np.array([[0]], np.uint8),
                   np.zeros((1, 0), np.uint16)),
                  (np.array([[1001]], np.uint16), 'n01439121', np.array([[1]], np.uint8),
                   np.array([[1]], np.uint16))])
    assert read_devkit_synsets(path) == {'n01440764': (1, '')}


def _bad_devkit(path, case):
    import scipy.io
    if case == 'no synsets':
        scipy.io.savemat(path, {'classes': np.arange(3)})
    elif case == 'not a struct':
        scipy.io.savemat(path, {'synsets': np.arange(3)})
    elif case == 'names and sizes':
        save_synsets(path, ['name', 'size'], [('kit fox', 1.5), ('tench', 2.5)])
    elif case == 'no wnids':
        save_synsets(path, ['ILSVRC2014_ID', 'words', 'gloss'],
                     [(np.array([[1]], np.uint16), 'kit fox', 'a fox')])
    return {'no synsets': ("no 'synsets' struct", 'classes'),
            'not a struct': ("'synsets' is not a struct (no fields)",),
            'names and sizes': ('fields name, size', "'name' of synset 1 is not an integer id"),
            'no wnids': ('fields ILSVRC2014_ID, words, gloss',
                         "'words' of synset 1 is not a WNID")}[case]


@pytest.mark.parametrize('case', ['no synsets', 'not a struct', 'names and sizes', 'no wnids'])
def test_a_file_that_is_no_devkit_is_named_with_the_fields_expected(small_tree, case):
    tree, tmp = small_tree
    meta = str(tmp / 'other.mat')
    found = _bad_devkit(meta, case)
    yaml_path = tree.write_paths_yaml(tmp / 'paths.yaml', tmp / 'out', meta_clsloc_mat=meta)
    line = error_line(run(['make_train_val_txt.py', '--paths', yaml_path], tmp))
    assert line.startswith(f'error: devkit file {meta}')
    for text in found + ('expected ILSVRC2014_ID, WNID', 'ILSVRC2014_devkit/data/meta_clsloc.mat',
                         'ILSVRC2012_ID, WNID', 'ILSVRC2012_devkit_t12/data/meta.mat',
                         'point meta_clsloc_mat at'):
        assert text in line, (text, line)
    with pytest.raises(PrepError):
        read_devkit_synsets(meta)
    if case == 'no wnids':  # and the whole run stops before any batch
        result = run(['generate_data.sh', yaml_path], tmp)
        assert result.returncode != 0 and 'not a WNID' in result.stderr
        assert not os.path.exists(tmp / 'out' / 'train_hkl_b256_b_256')


# ---------------------------------------------------------------- load_image_256 on its own

def test_load_image_256_converts_and_refuses(tmp_path):
    red = tmp_path / 'red.JPEG'
    Image.new('CMYK', (500, 375), (0, 255, 255, 0)).save(red, 'JPEG', quality=95)
    x = load_image_256(red)
    assert x.shape == (256, 256, 3) and x.dtype == np.uint8
    assert np.abs(x.astype(int) - (255, 0, 0)).max() <= 2
    assert x.flags.writeable

    png = tmp_path / 'n02105855_2933.JPEG'  # ImageNet's PNG named .JPEG
    Image.new('RGB', (40, 30), (1, 2, 3)).save(png, 'PNG')
    assert (load_image_256(png) == (1, 2, 3)).all()

    broken = tmp_path / 'broken.JPEG'
    Image.new('RGB', (500, 375), (9, 9, 9)).save(broken, 'JPEG')
    truncate(broken, 0.5)
    for path in (broken, tmp_path / 'missing.JPEG'):
        with pytest.raises(ImageDecodeError, match=os.path.basename(path)):
            load_image_256(path)


# ---------------------------------------------------------------- the embedded toy tree

@pytest.mark.slow
def test_toy_imagenet_tree_and_generate_toy_data(tmp_path):
    out = tmp_path / 'toy_imagenet'
    ok(run(['make_toy_imagenet.py', str(out)], tmp_path))
    wnids = sorted(os.listdir(out / 'train'))
    assert len(wnids) == 10 and all(len(w) == 9 and w[0] == 'n' for w in wnids)
    n_train = 0
    for wnid in wnids:
        names = os.listdir(out / 'train' / wnid)
        assert names and all(n.startswith(wnid + '_') and n.endswith('.JPEG') for n in names)
        n_train += len(names)
    val_names = sorted(os.listdir(out / 'val'))
    assert val_names[0] == 'ILSVRC2012_val_00000001.JPEG'
    assert n_train == 1400 and len(val_names) == 397
    with Image.open(out / 'train' / wnids[0] / os.listdir(out / 'train' / wnids[0])[0]) as img:
        assert img.format == 'JPEG' and img.size[0] >= 256 and img.size[1] >= 200

    import scipy.io  # the ILSVRC2014 devkit's layout: its fields, classes and internal nodes
    synsets = scipy.io.loadmat(out / 'devkit' / 'data' / 'meta_clsloc.mat')['synsets'][0]
    assert synsets.dtype.names == ('ILSVRC2014_ID', 'WNID', 'words', 'gloss', 'num_children',
                                   'children', 'wordnet_height', 'num_train_images')
    ids = [int(s['ILSVRC2014_ID'][0][0]) for s in synsets]
    meta_wnids = [str(s['WNID'][0]) for s in synsets]
    n_children = [int(s['num_children'][0][0]) for s in synsets]
    assert ids == list(range(1, 14)) and n_children[:10] == [0] * 10
    assert all(n > 0 for n in n_children[10:])
    for s, n in zip(synsets[10:], n_children[10:]):  # a node's children are classes or nodes
        assert s['children'].size == n and set(s['children'].ravel()) <= set(ids)
    assert sorted(meta_wnids[:10]) == wnids and not set(meta_wnids[10:]) & set(wnids)
    assert [int(s['num_train_images'][0][0]) for s in synsets[:10]] == \
        [len(os.listdir(out / 'train' / w)) for w in meta_wnids[:10]]
    id_of = dict(zip(meta_wnids[:10], ids[:10]))
    assert [id_of[w] for w in wnids] != sorted(id_of[w] for w in wnids)  # ids not in WNID order
    with open(out / 'devkit' / 'data' / 'ILSVRC2014_clsloc_validation_ground_truth.txt') as f:
        gt = [int(line) for line in f]
    assert len(gt) == 397 and set(gt) == set(range(1, 11))

    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    result = ok(run(['generate_toy_data.sh', str(out / 'paths.yaml')], elsewhere))
    paths = load_paths(out / 'paths.yaml')
    assert paths['train_batch_dir'] in result.stdout.splitlines()[-4]  # printed at the end
    train = read_batches(paths['train_batch_dir'])
    val = read_batches(paths['val_batch_dir'])
    assert [len(b) for b in train] == [256] * 5 and [len(b) for b in val] == [256, 141]
    val_labels = np.load(os.path.join(paths['labels_dir'], 'val_labels.npy'), allow_pickle=False)
    label_of_id = {id_of[w]: label for label, w in enumerate(wnids)}
    assert val_labels.tolist() == [label_of_id[i] for i in gt]
    assert len(np.load(os.path.join(paths['labels_dir'], 'train_labels.npy'))) == 1400
    # fewer than 2560 images: the toy subset is every image, the record says so
    assert_record_describes(paths, shuffled_order(paths), val_names)
    # colour matters: the images are not grey
    assert np.abs(train[0][..., 0].astype(int) - train[0][..., 1]).mean() > 10


def test_default_paths_yaml_points_at_the_quickstart_toy_data():
    paths = load_paths(os.path.join(PREP, 'paths.yaml'))
    data = os.path.join(REPO, 'data')
    assert paths['train_img_dir'] == os.path.join(data, 'toy_imagenet', 'train')
    assert paths['train_batch_dir'] == os.path.join(data, 'toy', 'train_hkl_b256_b_256')
    assert paths['val_batch_dir'] == os.path.join(data, 'toy', 'val_hkl_b256_b_256')
    assert paths['labels_dir'] == os.path.join(data, 'toy', 'labels')
    assert os.path.join(paths['misc_dir'], 'img_mean.npy') == \
        os.path.join(data, 'toy', 'misc', 'img_mean.npy')
    # and the toy builder's tree goes where it reads
    assert paths['meta_clsloc_mat'] == os.path.join(data, 'toy_imagenet', 'devkit', 'data',
                                                    'meta_clsloc.mat')


# ---------------------------------------------------------------- toy and full records

@pytest.mark.slow
def test_a_toy_run_records_and_labels_its_subset_and_a_mix_with_a_full_run_is_refused(tmp_path):
    """2600 training images: the toy run takes the first 2560 of the order (10 batches), the
    full run all 2600 (the same 10 batches, 40 dropped). Each run's four folders carry its own
    record; a toy run's labels and mean next to a full run's batches are refused."""
    tree = build_tree(tmp_path / 'imagenet', per_class=(900, 900, 800), n_val=20, quirks=False)
    yaml_path = tree.write_paths_yaml(tmp_path / 'paths.yaml', tmp_path / 'out')
    paths = load_paths(yaml_path)
    ok(run(['generate_toy_data.sh', yaml_path, '--workers', '2'], tmp_path))
    order = shuffled_order(paths)
    assert len(order) == 2600
    toy = assert_record_describes(paths, order[:2560], tree.val_names)
    assert toy['train_images'] == 2560 and toy['train_batches'] == 10
    train_labels = load(os.path.join(paths['labels_dir'], 'train_labels.npy'))
    assert train_labels.tolist() == [tree.train_label[n] for n in order[:2560]]  # no more
    toy_labels, toy_misc = tmp_path / 'toy_labels', tmp_path / 'toy_misc'
    shutil.copytree(paths['labels_dir'], toy_labels)
    shutil.copytree(paths['misc_dir'], toy_misc)

    result = ok(run(['generate_data.sh', yaml_path, '--workers', '2'], tmp_path))
    assert '(10 complete, 0 to make)' in result.stdout  # the toy batches serve the full run
    full = assert_record_describes(paths, order, tree.val_names)
    assert full['train_images'] == 2600 and full['train_batches'] == 10
    assert full['train_order_sha1'] != toy['train_order_sha1']
    train_labels = load(os.path.join(paths['labels_dir'], 'train_labels.npy'))
    assert train_labels.tolist() == [tree.train_label[n] for n in order]

    mixed = dict(record_folders(paths), label_folder=str(toy_labels), mean_file=str(toy_misc))
    with pytest.raises(ConfigError) as refused:
        provenance.check_together(mixed)
    message = str(refused.value)
    assert message.startswith('label_folder and mean_file come from another preprocessing '
                              'output (2560 training images')
    assert 'than train_folder and val_folder (2600 training images' in message

    # labels made from other lists than the batches' are refused, naming both
    report = os.path.join(paths['misc_dir'], 'skipped_train_images.txt')
    with open(report, 'w') as f:
        f.write(f'{order[3]}\tleft out by hand\n')
    line = error_line(run(['make_labels.py', '--paths', yaml_path], tmp_path))
    assert line.startswith(f"error: the training order of {paths['misc_dir']}/shuffled_train_"
                           f"filenames.npy less the images of {report} (2599 images, sha1 ")
    assert f"is not the order the training batches were cut from ({paths['train_batch_dir']}/" \
           f"preprocessing.json: 2600 images, sha1 {full['train_order_sha1'][:8]}): run " \
           f"make_hkl.py again" in line
    os.unlink(report)
    os.unlink(os.path.join(paths['misc_dir'], 'preprocessing.json'))
    line = error_line(run(['make_labels.py', '--paths', yaml_path], tmp_path))
    assert line == (f"error: {paths['misc_dir']}/preprocessing.json is missing: make_hkl.py did "
                    f"not finish, or the folders come from different runs: run make_hkl.py "
                    f"again, then make_labels.py")


# ---------------------------------------------------------------- what is an image, folders

def test_the_image_suffixes_are_formats_pil_reads(tmp_path):
    opens = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    assert set(IMAGE_SUFFIXES) <= opens
    assert {'.jpeg', '.jpg', '.png', '.bmp', '.webp'} <= set(IMAGE_SUFFIXES)
    assert all(s == s.lower() for s in IMAGE_SUFFIXES)
    assert is_image_name('a.JPEG') and is_image_name('b.WebP') and is_image_name('c.Bmp')
    assert not is_image_name('._a.JPEG') and not is_image_name('notes.txt')
    rgb = (np.arange(40 * 30 * 3) % 251).astype(np.uint8).reshape(30, 40, 3)
    for fmt, ext in (('BMP', '.bmp'), ('WEBP', '.webp'), ('PNG', '.PNG')):
        path = tmp_path / f'x{ext}'
        Image.fromarray(rgb).save(path, fmt, **({'lossless': True} if fmt == 'WEBP' else {}))
        expected = np.asarray(Image.fromarray(rgb).resize((256, 256),
                                                          Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(load_image_256(path), expected)


@pytest.mark.slow
def test_every_image_format_is_taken_and_a_folder_in_a_class_folder_stops(tmp_path):
    """.bmp, .webp and .Jpg images are preprocessed like the JPEGs; a folder inside a class
    folder or inside val_img_dir stops the run naming it; other files are counted in one
    notice line per folder tree."""
    tree = build_tree(tmp_path / 'imagenet', per_class=(170, 170, 169), n_val=30, quirks=False)
    rng = np.random.RandomState(5)
    extras = {'n01440764/n01440764_9001.bmp': 'BMP', 'n01443537/n01443537_9002.WEBP': 'WEBP',
              'n02102040/n02102040_9003.Jpg': 'JPEG'}
    for rel, fmt in extras.items():
        write_image(os.path.join(tree.train_dir, rel), 'rgb', rng)  # a JPEG ...
        with Image.open(os.path.join(tree.train_dir, rel)) as img:
            img.load()
        img.save(os.path.join(tree.train_dir, rel), fmt)              # ... in its own format
        tree.train_label[rel] = WNIDS.index(rel.split('/')[0])
        tree.kind[rel] = 'rgb'
    val_extras = {'ILSVRC2012_val_00000031.webp': 'WEBP', 'ILSVRC2012_val_00000032.bmp': 'BMP'}
    for name, fmt in val_extras.items():
        Image.fromarray(rng.randint(0, 256, (40, 50, 3)).astype(np.uint8)).save(
            os.path.join(tree.val_dir, name), fmt)
        tree.val_names.append(name)
        tree.val_label.append(2)
    with open(tree.gt, 'a') as f:
        f.write(f"{DEVKIT_IDS[WNIDS[2]]}\n" * 2)
    for path in (os.path.join(tree.train_dir, 'README.txt'),
                 os.path.join(tree.train_dir, WNIDS[1], 'Thumbs.db'),
                 os.path.join(tree.val_dir, 'LOC_val_solution.csv')):
        with open(path, 'w') as f:
            f.write('not an image\n')
    yaml_path = tree.write_paths_yaml(tmp_path / 'paths.yaml', tmp_path / 'out')
    paths = load_paths(yaml_path)

    nested = os.path.join(tree.train_dir, WNIDS[0], 'extra')
    os.makedirs(nested)
    write_image(os.path.join(nested, f'{WNIDS[0]}_9100.JPEG'), 'rgb', rng)
    for script in ('make_train_val_txt.py', 'make_hkl.py'):
        line = error_line(run([script, '--paths', yaml_path], tmp_path))
        assert f"the class folder {WNIDS[0]}/ holds a folder, {WNIDS[0]}/extra/;" in line
        assert tree.train_dir in line and 'move their images up' in line
    assert not os.path.exists(paths['train_batch_dir'])
    os.rename(nested, os.path.join(tree.val_dir, 'extra'))  # valprep.sh-style folders
    os.makedirs(os.path.join(tree.val_dir, WNIDS[1]))
    for script in ('make_train_val_txt.py', 'make_hkl.py'):
        line = error_line(run([script, '--paths', yaml_path], tmp_path))
        assert line.startswith(f'error: val_img_dir {tree.val_dir} holds a folder, extra/ '
                               f'(2 folders in all): the validation images must lie directly')
    shutil.rmtree(os.path.join(tree.val_dir, 'extra'))
    os.rmdir(os.path.join(tree.val_dir, WNIDS[1]))

    ok(run(['make_train_val_txt.py', '--paths', yaml_path], tmp_path))
    result = ok(run(['make_hkl.py', '--paths', yaml_path, '--workers', '2'], tmp_path))
    notices = [line for line in result.stderr.splitlines() if line.startswith('notice: ')]
    assert notices == [
        f"notice: train_img_dir {tree.train_dir}: 2 files not named as an image (.jpeg, .jpg, "
        f".png, .bmp, .webp, ... in any case) are left out, e.g. README.txt",
        f"notice: val_img_dir {tree.val_dir}: 1 file not named as an image (.jpeg, .jpg, "
        f".png, .bmp, .webp, ... in any case) is left out, e.g. LOC_val_solution.csv"]
    ok(run(['make_labels.py', '--paths', yaml_path], tmp_path))

    order = shuffled_order(paths)
    assert sorted(order) == tree.train_files() and len(order) == 512
    rows = np.concatenate(read_batches(paths['train_batch_dir']))
    for rel in extras:
        assert_row_is_image(rows[order.index(rel)], os.path.join(tree.train_dir, rel), 'rgb')
    val_rows = np.concatenate(read_batches(paths['val_batch_dir']))
    assert len(val_rows) == 32
    for name in val_extras:
        assert_row_is_image(val_rows[tree.val_names.index(name)],
                            os.path.join(tree.val_dir, name), 'rgb')
    assert load(os.path.join(paths['labels_dir'], 'train_labels.npy')).tolist() == \
        [tree.train_label[n] for n in order]
    assert load(os.path.join(paths['labels_dir'], 'val_labels.npy')).tolist() == tree.val_label
    assert_record_describes(paths, order, tree.val_names)


# ---------------------------------------------------------------- a devkit without words

def test_a_devkit_without_words_gives_the_wnids_alone_with_a_notice(small_tree):
    tree, tmp = small_tree
    rows = [(np.array([[class_id]], np.uint16), wnid, np.array([[0]], np.uint8),
             np.zeros((1, 0), np.uint16)) for wnid, class_id in sorted(DEVKIT_IDS.items())]
    save_synsets(tree.meta, ['ILSVRC2014_ID', 'WNID', 'num_children', 'children'], rows)
    yaml_path = tree.write_paths_yaml(tmp / 'paths.yaml', tmp / 'out')
    result = ok(run(['make_train_val_txt.py', '--paths', yaml_path], tmp))
    words_file = os.path.join(load_paths(yaml_path)['misc_dir'], 'synset_words.txt')
    notices = [line for line in result.stderr.splitlines() if line.startswith('notice: ')]
    assert notices == [f"notice: devkit file {tree.meta} has no 'words' (class names) for its "
                       f"classes: {words_file} names them by WNID alone"]
    with open(words_file) as f:
        assert f.read() == ''.join(f'{w}\n' for w in WNIDS)


# ---------------------------------------------------------------- a full disk, a size limit

def size_limited(limit, ignore_sigxfsz=True):
    """preexec_fn: the child may write files of at most ``limit`` bytes (ulimit -f). With
    SIGXFSZ ignored a longer write fails with EFBIG; at its default the script must ignore it
    itself, or the signal kills it."""
    def preexec():
        if ignore_sigxfsz:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.parametrize('script, limit, culprit, ignore_sigxfsz', [
    ('make_train_val_txt.py', 1000, 'misc/train.txt', True),
    ('make_hkl.py', 10_000, 'misc/shuffled_train_filenames.npy', True),
    ('make_hkl.py', 1 << 20, 'train_hkl_b256_b_256/0000.hkl', True),
    ('make_hkl.py', 1 << 20, 'train_hkl_b256_b_256/0000.hkl', False),
    ('make_labels.py', 1000, 'labels/train_labels.npy', True),
])
@pytest.mark.slow
def test_a_file_size_limit_is_one_line_naming_the_file(tmp_path, script, limit, culprit,
                                                        ignore_sigxfsz):
    tree = build_tree(tmp_path / 'imagenet', per_class=(100, 100, 100), n_val=10, quirks=False)
    yaml_path = tree.write_paths_yaml(tmp_path / 'paths.yaml', tmp_path / 'out')
    paths = load_paths(yaml_path)
    if script == 'make_labels.py':
        ok(run(['make_train_val_txt.py', '--paths', yaml_path], tmp_path))
        ok(run(['make_hkl.py', '--paths', yaml_path, '--workers', '2'], tmp_path))
    cmd = [sys.executable, os.path.join(PREP, script), '--paths', yaml_path]
    if script == 'make_hkl.py':
        cmd += ['--workers', '2']
    result = subprocess.run(cmd, cwd=str(tmp_path), env=ENV, capture_output=True, text=True,
                            timeout=300, preexec_fn=size_limited(limit, ignore_sigxfsz))
    line = error_line(result)
    path = str(tmp_path / 'out' / culprit)
    assert line.startswith(f"error: cannot write {'batch ' if path.endswith('.hkl') else ''}"
                           f"file {path} (File too large): over the file-size limit "
                           f"(ulimit -f); raise the limit (ulimit -f unlimited) and run the "
                           f"same command again"), line
    for noise in ('Traceback', 'Exception ignored', 'RuntimeError', 'HDF5'):
        assert noise not in result.stderr, result.stderr
    # nothing half-written under a complete file's name, nothing left over, no record
    assert not os.path.exists(path)
    left = [os.path.join(d, n) for d, _, names in os.walk(tmp_path / 'out') for n in names]
    assert not [p for p in left if '.tmp' in p], left
    folder = paths['labels_dir'] if script == 'make_labels.py' else paths['train_batch_dir']
    assert provenance.read_record(folder) is None
