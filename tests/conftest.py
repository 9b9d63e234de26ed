"""Shared fixtures: small real batch-file datasets written with the real writer."""
import os
import shutil
import signal
import tempfile
import time

import numpy as np
import pytest

from alexnet_lib.batch_files import write_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_dataset(root, n_train_files=2, file_rows=16, val_sizes=(16, 5), seed=0):
    """Train/val batch folders, labels and a mean file in the preprocessing layout, with seeded
    random images; returns the key=value overrides that point a config at it."""
    rng = np.random.RandomState(seed)
    train = os.path.join(root, 'train_hkl_b256_b_256')
    val = os.path.join(root, 'val_hkl_b256_b_256')
    labels = os.path.join(root, 'labels')
    misc = os.path.join(root, 'misc')
    for d in (train, val, labels, misc):
        os.makedirs(d, exist_ok=True)
    total = np.zeros((256, 256, 3))
    for i in range(n_train_files):
        x = rng.randint(0, 256, (file_rows, 256, 256, 3)).astype(np.uint8)
        total += x.sum(0)
        write_batch(os.path.join(train, f'{i:04d}.hkl'), x)
    for i, n in enumerate(val_sizes):
        write_batch(os.path.join(val, f'{i:04d}.hkl'),
                    rng.randint(0, 256, (n, 256, 256, 3)).astype(np.uint8))
    np.save(os.path.join(labels, 'train_labels.npy'),
            rng.randint(0, 10, n_train_files * file_rows).astype(np.int64))
    np.save(os.path.join(labels, 'val_labels.npy'), rng.randint(0, 10, sum(val_sizes)))
    mean = (total / (n_train_files * file_rows)).transpose(2, 0, 1).astype(np.float32)
    np.save(os.path.join(misc, 'img_mean.npy'), mean)
    return [f'train_folder={train}', f'val_folder={val}', f'label_folder={labels}',
            f'mean_file={os.path.join(misc, "img_mean.npy")}']


def assert_same_change(a, b, starts, tol):
    """Arrays a and b (the parameters in PARAMS order, then their momentum) made the same change
    from starts up to float noise: |change a - change b| <= tol x the largest change in each
    array + 4 float32 ulps of its values. Batches of 4 and of 8 sum in other orders, compiled
    and eager code too, and a parameter that moved little (a bias of 1e-6) has a large relative
    noise element by element; a replica that missed an exchange, or a wrong gradient, is off by
    tens of percent."""
    from alex_net import PARAMS
    for k, (x, y, x0) in enumerate(zip(a, b, starts)):
        dx, dy = x - x0, y - x0
        ulps = 4 * np.spacing(np.float32(np.abs(y).max()))    # float32 rounding of the values
        np.testing.assert_allclose(dx, dy, rtol=0, atol=tol * np.abs(dy).max() + ulps,
                                   err_msg=f'array {k} ({PARAMS[k % len(PARAMS)].name}'
                                           f'{" momentum" if k >= len(PARAMS) else ""})')


def call_main(main, argv, capsys):
    """A script's main(argv) in this process: (exit status, stdout, the non-empty stderr lines);
    a SystemExit's code is the status, and None (main returned nothing, sys.exit()) is 0."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return (0 if rc is None else rc), out, [x for x in err.splitlines() if x.strip()]


@pytest.fixture(scope='session')
def small_dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp('small_data')))


def default_sigint():
    """preexec_fn for a child that is sent Ctrl-C: a job started in the background (as CI may
    start the suite) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


PRIVATE_FOLDERS = ('proc_load-', 'rdv-')   # a loader's socket folder, a launcher's rendezvous


@pytest.fixture(scope='session', autouse=True)
def private_tmpdir(tmp_path_factory):
    """The whole session (and every process it starts: they inherit TMPDIR) makes its temporary
    files in a fresh private folder, so that what a run leaves behind is seen: at the session's
    end a loader's socket folder (proc_load-*) or a launcher's rendezvous folder (rdv-*) still
    there fails the run (an error at the teardown of the last test). The folder's path is short
    (a loader's unix socket in it must fit in ~100 bytes: a long TMPDIR gives way to /tmp) and
    it goes at the end; pytest's own tmp_path folders stay where they were."""
    tmp_path_factory.getbasetemp()          # pytest's folders: chosen before TMPDIR changes
    saved = os.environ.get('TMPDIR'), tempfile.tempdir
    parent = tempfile.gettempdir()
    if len(parent) > 40 and os.path.isdir('/tmp'):
        parent = '/tmp'
    base = tempfile.mkdtemp(prefix='alexnet-tests-', dir=parent)
    os.environ['TMPDIR'] = tempfile.tempdir = base
    try:
        yield base
    finally:
        if saved[0] is None:
            os.environ.pop('TMPDIR', None)
        else:
            os.environ['TMPDIR'] = saved[0]
        tempfile.tempdir = saved[1]
        end = time.monotonic() + 15        # the last run's survivors may still be exiting
        while True:
            left = sorted(n for n in os.listdir(base) if n.startswith(PRIVATE_FOLDERS))
            if not left or time.monotonic() > end:
                break
            time.sleep(0.1)
        shutil.rmtree(base, ignore_errors=True)
        if left:
            pytest.fail(f"the test session left {len(left)} private folder(s) of loaders or "
                        f"launchers behind in its TMPDIR {base}: {', '.join(left)}",
                        pytrace=False)


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped, saying why, where no CUDA GPU is visible: `python -m pytest -m
    "not slow"` (the fast tier) then runs on any machine, as the default does."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU (none is visible)')
    for item in items:
        if 'gpu' in item.keywords or 'multigpu' in item.keywords:
            item.add_marker(skip)
