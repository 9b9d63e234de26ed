"""Soak: many epochs of a real two-replica run on the CPU with parallel loading
(train_2gpu.py: 2 trainers exchanging through host memory, each with its loader process), whose
memory (RSS), open file descriptors and threads are sampled after every training step. Once
warmed up (epochs 1-2) they must stay flat: a leak of a buffer, a socket or a file per epoch
or per step would show as growth over the remaining epochs."""
import os
import re
import shutil

import numpy as np
import pytest

from conftest import make_dataset
from test_faults import Proc, alive, assert_ended_cleanly, cmdline, proc_stat

pytestmark = pytest.mark.slow   # real training runs: the full suite, not the fast tier

EPOCHS = 8
STEPS = 2                 # per epoch: 4 images, 2 replicas x 1
WARM_UP = 2               # epochs not compared
RSS_MARGIN_MB = 48        # later epochs' RSS may exceed the first compared epoch's by this,
RSS_STEP_MB = 1.0         # ... and may rise by more than this from one epoch to the next at
MAX_RISES = 2             # most this often (an allocator's occasional step is no leak; a leak
                          # of a MB or more per epoch rises every epoch)


def status(pid):
    """(VmRSS in MB, open file descriptors, threads) of a live process."""
    with open(f'/proc/{pid}/status') as f:
        st = dict(line.split(':', 1) for line in f if ':' in line)
    rss = int(st['VmRSS'].split()[0]) / 1024
    return rss, len(os.listdir(f'/proc/{pid}/fd')), int(st['Threads'])


def check_flat(name, rows):
    """rows: (epoch, RSS MB, descriptors, threads) samples of one process. Fails unless, after
    the warm-up epochs, RSS, descriptors and threads stay flat; returns a report line."""
    a = np.array(rows, dtype=float)
    late = a[a[:, 0] > WARM_UP]
    # per epoch, the least RSS of its samples: what stays allocated (a sample taken while a
    # step or a snapshot briefly holds more is no leak; retained memory raises the least)
    base = {e: late[late[:, 0] == e, 1].min() for e in np.unique(late[:, 0])}
    es = np.array(sorted(base))
    first = base[es[0]]
    slope = np.polyfit(es, [base[e] for e in es], 1)[0]     # reported
    # descriptors and threads: the least count of the first two compared epochs against the
    # last two (a file being read or written at the moment of a sample is no leak)
    early, last = late[late[:, 0] <= es[1]], late[late[:, 0] >= es[-2]]
    report = (f"{name}: RSS {a[0, 1]:.0f} MB at step 1, {first:.0f} -> {base[es[-1]]:.0f} MB "
              f"over epochs {int(es[0])}-{int(es[-1])} (slope {slope:+.2f} MB/epoch, peak "
              f"{late[:, 1].max():.0f}); fds {int(a[0, 2])} at step 1, "
              f"{int(late[:, 2].min())}..{int(late[:, 2].max())} later; threads "
              f"{int(late[:, 3].min())}..{int(late[:, 3].max())}")
    assert max(base.values()) <= first + RSS_MARGIN_MB, f"RSS grew: {report}"
    rises = sum(base[e1] - base[e0] > RSS_STEP_MB for e0, e1 in zip(es, es[1:]))
    assert rises <= MAX_RISES, f"RSS grows epoch after epoch: {report}"
    for col, what in ((2, 'descriptors'), (3, 'threads')):
        assert last[:, col].min() <= early[:, col].min(), f"{what} grew: {report}"
        assert late[:, col].max() - late[:, col].min() <= 3, f"{what} vary: {report}"
    return report


def _series(rss, fds=lambda e, s: 27, threads=lambda e, s: 8):
    return [(e, rss(e, s), fds(e, s), threads(e, s)) for e in range(1, EPOCHS + 1)
            for s in range(STEPS)]


def test_the_flatness_check_catches_leaks():
    """check_flat on made-up samples: warm-up growth, an allocator's one-off step and brief
    peaks pass; a leak of memory, of a descriptor or of a thread per epoch fails."""
    warm = lambda e, s: 2400 if e == 1 else 3320                           # noqa: E731
    check_flat('flat', _series(warm))
    check_flat('one step', _series(lambda e, s: warm(e, s) + (15 if e >= 5 else 0)))
    check_flat('brief peaks', _series(lambda e, s: warm(e, s) + (50 if s == 1 else 0),
                                      fds=lambda e, s: 27 + (e % 2 and s)))
    for rows, what in ((_series(lambda e, s: warm(e, s) + 2 * e), 'RSS grows'),
                       (_series(lambda e, s: warm(e, s) + (60 if e == 8 else 0)), 'RSS grew'),
                       (_series(warm, fds=lambda e, s: 27 + e), 'descriptors'),
                       (_series(warm, threads=lambda e, s: 8 + e // 3), 'threads')):
        with pytest.raises(AssertionError, match=what):
            check_flat('leak', rows)


def test_memory_and_descriptors_stay_flat_over_many_epochs(tmp_path):
    data = make_dataset(str(tmp_path / 'data'), n_train_files=1, file_rows=4, val_sizes=(2,))
    wd = tmp_path / 'w'
    run = Proc('train_2gpu.py', [*data, 'gpu0=cpu', 'gpu1=cpu', 'exchange=host',
                                 'batch_size=1', 'para_load=True', 'print_freq=1',
                                 f'n_epochs={EPOCHS}', f'weights_dir={wd}'])
    samples = {}       # name -> list of (epoch, rss, fds, threads)
    try:
        names = None
        for it in range(1, EPOCHS * STEPS + 1):
            run.wait_for(rf'^iter {it} ')
            if names is None:   # the launcher, its 2 trainers and their 2 loaders
                trainers = sorted(p for p in run.members('multiprocessing')
                                  if 'resource_tracker' not in cmdline(p)
                                  and proc_stat(p)[1] == run.pid)
                loaders = {proc_stat(p)[1]: p for p in run.members('proc_load.py')}
                assert len(trainers) == 2 and sorted(loaders) == trainers, run.family
                names = {'launcher': run.pid}
                for r, t in enumerate(trainers):
                    names[f'trainer {r}'], names[f'loader {r}'] = t, loaders[t]
            epoch = (it - 1) // STEPS + 1
            for name, pid in names.items():
                assert alive(pid), f"{name} (pid {pid}) is gone"
                samples.setdefault(name, []).append((epoch, *status(pid)))
            # keep the disk small: only the latest snapshot is needed
            for f in os.listdir(wd) if os.path.isdir(wd) else []:
                m = re.fullmatch(r'.+_(\d+)\.npy', f)
                if m and int(m.group(1)) < epoch - 1:
                    os.unlink(wd / f)
        rc = run.wait()
        assert_ended_cleanly(run, rc, 0, f'epoch {EPOCHS}: train loss')
    finally:
        if run.p.poll() is None:
            run.kill_all()
        shutil.rmtree(wd, ignore_errors=True)
    # the host exchange's segments are named after rank 0's pid: this run's, not another's
    assert not [f for f in os.listdir('/dev/shm')
                if f.startswith(tuple(f'xchg-{p}-' for p in names.values()))]

    report = [check_flat(name, rows) for name, rows in samples.items()]
    print('\n'.join(report))
    assert len(samples) == 5 and all(len(v) == EPOCHS * STEPS for v in samples.values())
