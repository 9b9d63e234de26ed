"""Fault injection with real processes on the CPU.

Every fault below is injected into a real run of train.py or train_2gpu.py (real loader
processes, real sockets, real snapshot files) at a point drawn from a seeded RNG: the session
seed is printed (FAULT_SEED=<n> replays it). Each run must end within a bounded time, with a
message that says what happened and a non-zero exit, leave no process behind (every descendant
the run ever had is tracked), and leave its last complete snapshot intact: byte for byte the
snapshot that the uninterrupted run wrote for that epoch, and leave none of its private folders
(a loader's socket folder, a launcher's rendezvous folder). Resuming from such a snapshot ends
with the uninterrupted run's weights and momentum, bit for bit: the SIGKILL, kill-mid-snapshot
and SIGTERM tests resume and compare; for the other faults the intact snapshot is the same
bytes as the uninterrupted run's, so the resume from it is the one already shown.

The process runner and its checks (Proc, alive, ...) live in processes.py; test_soak.py and
test_security.py take them, with assert_ended_cleanly, from here.
"""
import hashlib
import os
import random
import re
import resource
import shutil
import signal
import time

import numpy as np
import pytest

from alex_net import PARAMS
from conftest import make_dataset
from alexnet_lib.snapshot import latest_complete_snapshot
from processes import (Proc, assert_nothing_left, assert_sigkill_leaves_nothing, cmdline,
                       proc_stat, stop_runs)
from processes import alive, descendants  # noqa: F401 (test_soak/test_security import them here)

pytestmark = pytest.mark.slow   # real training runs: the full suite, not the fast tier

SEED = int(os.environ.get('FAULT_SEED') or random.SystemRandom().randrange(10 ** 6))


def rng_for(name):
    """A per-test RNG drawn from the session seed (printed, so a failure can be replayed)."""
    print(f"fault seed: FAULT_SEED={SEED} ({name})")
    return random.Random(f"{SEED}:{name}")


# ---------------------------------------------------------------------------------------------
# processes

@pytest.fixture(autouse=True)
def _stop_runs_and_free_the_disk(tmp_path):
    """After each test: kill what a failed test left running; delete the big snapshot files
    (233 MB an epoch) the test wrote (pytest keeps the folders of its last 3 sessions)."""
    yield
    stop_runs()
    for folder, _, files in os.walk(tmp_path):
        for f in files:
            path = os.path.join(folder, f)
            if os.path.getsize(path) > (1 << 20):
                os.unlink(path)


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith(('error:', 'preempted:',
                                                                  'launcher:'))]


def assert_ended_cleanly(run, rc, expect_rc, *words):
    """rc as expected, each word in the output, no traceback, no process left behind."""
    out = run.text
    print(f"{os.path.basename(run.p.args[1])} ended with {rc}:", *error_lines(out), sep='\n  ')
    assert rc == expect_rc, f"exit status {rc}, expected {expect_rc}; output:\n{out[-4000:]}"
    for w in words:
        assert w in out, f"{w!r} not in the output:\n{out[-4000:]}"
    assert 'Traceback' not in out, out[-6000:]
    assert_nothing_left(run)


# ---------------------------------------------------------------------------------------------
# snapshots

def snapshot_names(epoch):
    return ([f'{p.name}_{epoch}.npy' for p in PARAMS]
            + [f'mom_{k}_{epoch}.npy' for k in range(len(PARAMS))] + [f'lr_{epoch}.npy'])


def snapshot_digest(d, epoch):
    """{file name: sha256} of every file of snapshot `epoch` in folder d."""
    out = {}
    for name in snapshot_names(epoch):
        with open(os.path.join(d, name), 'rb') as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_same_snapshot(d, ref, epoch):
    got, want = snapshot_digest(d, epoch), snapshot_digest(ref, epoch)
    diff = [n for n in want if got[n] != want[n]]
    assert not diff, f"snapshot {epoch} in {d} differs from the uninterrupted run's: {diff}"


def temporaries(d):
    return [f for f in os.listdir(d) if '.tmp' in f] if os.path.isdir(d) else []


def assert_last_complete_is_intact(d, ref, killed=False):
    """The latest complete snapshot in d (if any) is byte for byte the uninterrupted run's; no
    temporary file was left (unless the writer was SIGKILLed: the next snapshot of that epoch
    removes them); returns its epoch."""
    last = latest_complete_snapshot(str(d))
    if last is not None:
        assert_same_snapshot(d, ref, last)
        assert not os.path.exists(os.path.join(d, f'progress_{last}.npy'))
    if not killed:
        assert not temporaries(d), f"temporary files left in {d}: {temporaries(d)}"
    return last


def copy_snapshot(src, dst, epoch):
    os.makedirs(dst, exist_ok=True)
    for name in snapshot_names(epoch) + ['val_record.npy', 'metrics.csv']:
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))


# ---------------------------------------------------------------------------------------------
# runs

N_EPOCHS = 2


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """One training file of 8 images (2 steps of 4 per epoch), 4 validation images."""
    return make_dataset(str(tmp_path_factory.mktemp('fault_data')), n_train_files=1,
                        file_rows=8, val_sizes=(4,))


def one_args(data, wd, *extra):
    return [*data, 'gpu=cpu', 'batch_size=4', 'print_freq=1', 'para_load=True',
            f'n_epochs={N_EPOCHS}', f'weights_dir={wd}', *extra]


def two_args(data, wd, *extra):
    return [*data, 'gpu0=cpu', 'gpu1=cpu', 'exchange=host', 'batch_size=2', 'print_freq=1',
            'para_load=True', f'n_epochs={N_EPOCHS}', f'weights_dir={wd}', *extra]


def finished(script, args):
    run = Proc(script, args)
    rc = run.wait()
    assert_ended_cleanly(run, rc, 0)
    return run


@pytest.fixture(scope='module')
def ref1(data, tmp_path_factory):
    """The uninterrupted one-process run (every epoch's snapshot kept)."""
    d = tmp_path_factory.mktemp('ref1')
    finished('train.py', one_args(data, d))
    assert latest_complete_snapshot(str(d)) == N_EPOCHS
    yield str(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope='module')
def ref2(data, tmp_path_factory):
    """The uninterrupted two-process run (two CPU replicas, exchange through host memory)."""
    d = tmp_path_factory.mktemp('ref2')
    finished('train_2gpu.py', two_args(data, d))
    assert latest_complete_snapshot(str(d)) == N_EPOCHS
    yield str(d)
    shutil.rmtree(d, ignore_errors=True)


def resume_and_compare(script, args_fn, data, wd, ref, last):
    """Start the run again as a restarted job does, with resume_train=auto: from snapshot
    `last`, or afresh (replacing what the killed run left) when it wrote none (`last` None);
    check that the run ends with the uninterrupted run's final snapshot and validation
    record."""
    run = finished(script, args_fn(data, wd, 'resume_train=auto'))
    if last is not None:
        assert f'resumed from snapshot {last}' in run.text
    else:
        assert 'a new run (resume_train: auto found no snapshot)' in run.text
    assert_same_snapshot(wd, ref, N_EPOCHS)
    assert not temporaries(wd), f"temporary files left in {wd}: {temporaries(wd)}"
    assert np.array_equal(np.load(os.path.join(wd, 'val_record.npy')),
                          np.load(os.path.join(ref, 'val_record.npy')))


def kill_point(rng, first_iter, last_iter):
    """After which printed iteration, and how long after it, to strike."""
    return rng.randint(first_iter, last_iter), rng.uniform(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# SIGKILL

def test_sigkill_of_train_at_a_random_point_then_resume_matches(data, ref1, tmp_path):
    """SIGKILL of train.py at a random moment from epoch 1's last step to epoch 2's snapshot
    write (a step, validation, a snapshot being written): nothing is left running, the last
    complete snapshot is intact, and resuming from it (or starting again when there is none)
    ends with the uninterrupted run's weights and momentum."""
    it, delay = kill_point(rng_for('sigkill-train'), 1, 3)
    run = Proc('train.py', one_args(data, tmp_path))
    run.wait_for(rf'^iter {it} ')
    time.sleep(delay)
    assert_sigkill_leaves_nothing(run)
    last = assert_last_complete_is_intact(tmp_path, ref1, killed=True)
    resume_and_compare('train.py', one_args, data, tmp_path, ref1, last)


def test_sigkill_while_the_snapshot_is_written_then_resume_matches(data, ref1, tmp_path):
    """The worst moment: SIGKILL after some files of snapshot 2 were written, before its lr
    file (written last). Snapshot 2 must not pass for complete; resuming from 1 matches."""
    run = Proc('train.py', one_args(data, tmp_path))
    run.wait_for(r'^epoch 2: ')
    first, lr2 = tmp_path / f'{PARAMS[0].name}_2.npy', tmp_path / 'lr_2.npy'
    end = time.monotonic() + 60
    while not first.exists() and time.monotonic() < end:
        time.sleep(0.002)
    run.p.send_signal(signal.SIGKILL)
    assert first.exists()
    assert run.wait() == -signal.SIGKILL
    assert not lr2.exists(), 'the snapshot was complete before the kill: no test'
    assert_nothing_left(run)
    assert assert_last_complete_is_intact(tmp_path, ref1, killed=True) == 1
    resume_and_compare('train.py', one_args, data, tmp_path, ref1, 1)


def test_sigkill_of_the_loader(data, ref1, tmp_path):
    """SIGKILL of the loader process while it is still needed (epoch 2 is ahead): the trainer
    says so (pid, signal, what it was loading) within seconds, exits 1, and the last complete
    snapshot is intact. (A loader killed after the last validation is not missed: the run
    ends normally.)"""
    it, delay = kill_point(rng_for('sigkill-loader'), 1, 2)
    run = Proc('train.py', one_args(data, tmp_path))
    run.wait_for(rf'^iter {it} ')
    time.sleep(delay)
    loaders = run.members('proc_load.py')
    assert len(loaders) == 1, run.family
    os.kill(loaders[0], signal.SIGKILL)
    t0 = time.monotonic()
    rc = run.wait()
    assert time.monotonic() - t0 < 30
    assert_ended_cleanly(run, rc, 1, f'error: loader process (pid {loaders[0]}) was killed by '
                                     f'signal SIGKILL')
    assert_last_complete_is_intact(tmp_path, ref1)


def trainers(run):
    """The two trainer processes of a train_2gpu.py run, sorted."""
    found = [p for p in run.members('multiprocessing')
             if 'resource_tracker' not in cmdline(p) and proc_stat(p)[1] == run.pid]
    assert len(found) == 2, {p: cmdline(p) for p in run.family}
    return sorted(found)


def test_sigkill_of_one_trainer_of_two(data, ref2, tmp_path):
    """SIGKILL of one trainer (drawn at random) of a two-process run: the launcher names its
    rank, pid and the signal, stops the other trainer and exits 1; both loaders go too; the
    last complete snapshot is intact."""
    rng = rng_for('sigkill-trainer')
    it, delay = kill_point(rng, 1, 2)
    run = Proc('train_2gpu.py', two_args(data, tmp_path))
    run.wait_for(rf'^iter {it} ')
    time.sleep(delay)
    victim = rng.choice(trainers(run))
    os.kill(victim, signal.SIGKILL)
    rc = run.wait()
    assert_ended_cleanly(run, rc, 1)
    # (after the killed rank's half-drawn progress bar: no line start to anchor to)
    assert re.search(rf'error: worker rank [01] \(pid {victim}\) failed: signal SIGKILL',
                     run.text), run.text[-3000:]
    assert_last_complete_is_intact(tmp_path, ref2, killed=True)   # rank 0 writes snapshots


def test_sigkill_of_the_launcher(data, ref2, tmp_path):
    """SIGKILL of train_2gpu.py itself: its trainers notice that their parent is gone and
    exit, their loaders follow; nothing is left and the snapshot is intact."""
    it, delay = kill_point(rng_for('sigkill-launcher'), 1, 2)
    run = Proc('train_2gpu.py', two_args(data, tmp_path))
    run.wait_for(rf'^iter {it} ')
    time.sleep(delay)
    family = dict(run.family)
    assert len([p for p in family if 'proc_load.py' in cmdline(p)]) == 2
    assert_sigkill_leaves_nothing(run)
    assert f'the launcher (pid {run.pid}) has gone, exiting' in run.text
    assert_last_complete_is_intact(tmp_path, ref2, killed=True)


# ---------------------------------------------------------------------------------------------
# SIGINT, SIGTERM

def test_sigint_to_the_launcher(data, ref2, tmp_path):
    """Ctrl-C (SIGINT to the launcher): the trainers are interrupted, the launcher says so and
    exits 130; nothing is left; the snapshot is intact."""
    it, delay = kill_point(rng_for('sigint-launcher'), 1, 2)
    run = Proc('train_2gpu.py', two_args(data, tmp_path))
    run.wait_for(rf'^iter {it} ')
    time.sleep(delay)
    run.p.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    rc = run.wait()
    assert time.monotonic() - t0 < 60
    assert_ended_cleanly(run, rc, 130, 'launcher: SIGINT received, workers stopped')
    assert_last_complete_is_intact(tmp_path, ref2)


def test_sigterm_to_the_launcher_preempts_and_resume_matches(data, ref2, tmp_path):
    """Preemption of a two-process run: SIGTERM to train_2gpu.py (what a cluster sends before
    it kills a job) during epoch 1. The replicas agree to stop (at a step that is a multiple
    of STOP_CHECK_EVERY or at the epoch's end: here the end, epochs being 2 steps), write a
    complete snapshot, and exit 143 saying how to resume; resuming ends with the uninterrupted
    run's weights and momentum."""
    it, delay = kill_point(rng_for('sigterm-launcher'), 1, 1)
    run = Proc('train_2gpu.py', two_args(data, tmp_path))
    run.wait_for(rf'^iter {it} ')
    time.sleep(delay)
    run.p.send_signal(signal.SIGTERM)
    rc = run.wait()
    assert_ended_cleanly(run, rc, 143, 'launcher: SIGTERM received',
                         'stopped after epoch 1 and wrote a resumable snapshot',
                         'resume with resume_train=True load_epoch=1')
    assert not re.search(r'^epoch 2: ', run.text, re.M)
    assert not os.path.exists(tmp_path / 'lr_2.npy')
    assert assert_last_complete_is_intact(tmp_path, ref2) == 1
    resume_and_compare('train_2gpu.py', two_args, data, tmp_path, ref2, 1)


def test_sigterm_to_one_trainer_preempts_the_run(data, ref2, tmp_path):
    """SIGTERM that reaches one trainer alone (a scheduler or an admin signalling one process)
    preempts the run as one sent to the launcher does: the replicas agree to stop, the snapshot
    is complete, and the run exits 143 saying how to resume (not 1, as a failure)."""
    rng = rng_for('sigterm-trainer')
    it, delay = kill_point(rng, 1, 1)
    run = Proc('train_2gpu.py', two_args(data, tmp_path))
    run.wait_for(rf'^iter {it} ')
    time.sleep(delay)
    victim = rng.choice(trainers(run))
    os.kill(victim, signal.SIGTERM)
    rc = run.wait()
    assert_ended_cleanly(run, rc, 143, 'stopped by SIGTERM, workers stopped',
                         'stopped after epoch 1 and wrote a resumable snapshot',
                         'resume with resume_train=True load_epoch=1')
    assert assert_last_complete_is_intact(tmp_path, ref2) == 1


def test_sigterm_in_the_last_step_of_an_epoch(data, ref1, tmp_path):
    """SIGTERM while the last step of an epoch runs: the epoch is finished and validated and
    its snapshot is an ordinary complete one (a mid-epoch snapshot holding every step of the
    epoch could not be resumed)."""
    delay = rng_for('sigterm-last-step').uniform(0.05, 0.5)
    run = Proc('train.py', one_args(data, tmp_path))
    run.wait_for(r'^iter 1 ')       # step 2 of 2 of epoch 1 runs now
    time.sleep(delay)
    run.p.send_signal(signal.SIGTERM)
    rc = run.wait()
    assert_ended_cleanly(run, rc, 143, 'preempted: SIGTERM',
                         'resume with resume_train=True load_epoch=1')
    assert not os.path.exists(tmp_path / 'progress_1.npy')
    assert assert_last_complete_is_intact(tmp_path, ref1) == 1


# ---------------------------------------------------------------------------------------------
# disk full, truncated batch file, NaN

def _file_size_limit(nbytes):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of death by signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return preexec


def test_disk_fills_during_a_snapshot_write(data, ref1, tmp_path):
    """A write of snapshot 2 fails half-way (RLIMIT_FSIZE 64 MB; fc6's W is 151 MB): one line
    naming the file and the last complete snapshot, exit 1; snapshot 1 is untouched, snapshot 2
    is not taken for complete (no lr_2.npy), no temporary file is left."""
    copy_snapshot(ref1, tmp_path, 1)
    before = {f: (tmp_path / f).read_bytes() for f in snapshot_names(1)}
    run = Proc('train.py', one_args(data, tmp_path, 'resume_train=True', 'load_epoch=1'),
               preexec_fn=_file_size_limit(64 << 20))
    rc = run.wait()
    assert_ended_cleanly(run, rc, 1, 'error: snapshot 2 was not written',
                         f'cannot write {tmp_path / "W_5_2.npy"}',
                         'the last complete snapshot is epoch 1')
    assert [line for line in run.text.splitlines() if 'error:' in line][-1].startswith('error:')
    assert all((tmp_path / f).read_bytes() == b for f, b in before.items())
    assert not (tmp_path / 'lr_2.npy').exists()
    assert assert_last_complete_is_intact(tmp_path, ref1) == 1


def test_batch_file_truncated_during_the_run(tmp_path):
    """A batch file cut short while the run goes on (a failing copy, a full disk), after epoch 1
    read it: epoch 2 stops when it reaches the file, naming it; exit 1; snapshot 1 is
    complete and loads."""
    d = make_dataset(str(tmp_path / 'data'), n_train_files=2, file_rows=4, val_sizes=(4,))
    victim = tmp_path / 'data' / 'train_hkl_b256_b_256' / '0001.hkl'
    wd = tmp_path / 'w'
    run = Proc('train.py', one_args(d, wd))
    run.wait_for(r'^iter 1 ')          # the loader has read both files of epoch 1 by now
    with open(victim, 'r+b') as f:      # the same file, cut to a third
        f.truncate(os.path.getsize(victim) // 3)
    rc = run.wait()
    assert_ended_cleanly(run, rc, 1, 'error:', str(victim))
    line = [x for x in run.text.splitlines() if x.startswith('error:')][-1]
    assert 'truncated' in line or 'cannot read' in line, line
    assert re.search(r'^iter 3 ', run.text, re.M) and not re.search(r'^iter 4 ', run.text, re.M)
    assert latest_complete_snapshot(str(wd)) == 1
    from alexnet_lib.snapshot import load_params
    assert all(np.isfinite(a).all() for a in load_params(str(wd), 1).values())


def test_nan_loss_names_the_iteration_and_the_last_good_snapshot(data, ref1, tmp_path):
    """A learning rate far too high (1000, put in the lr file of snapshot 1 that the run
    resumes from): the loss becomes NaN in epoch 2; the run stops at that iteration naming
    snapshot 1 (untouched) and how to go on, instead of training on garbage."""
    copy_snapshot(ref1, tmp_path, 1)
    np.save(tmp_path / 'lr_1.npy', np.float32(1000.0))
    before = snapshot_digest(tmp_path, 1)
    run = Proc('train.py', [*data, 'gpu=cpu', 'batch_size=2', 'print_freq=1', 'para_load=True',
                            'n_epochs=3', f'weights_dir={tmp_path}', 'resume_train=True',
                            'load_epoch=1'])
    rc = run.wait()
    assert_ended_cleanly(run, rc, 1, 'the last good snapshot is epoch 1',
                         f'{tmp_path / "lr_1.npy"}', 'resume_train=True load_epoch=1')
    m = re.search(r'error: the training loss became (nan|inf) at iteration (\d+) \(epoch 2\)',
                  run.text)
    assert m, run.text[-3000:]
    printed = [int(x) for x in re.findall(r'^iter (\d+) ', run.text, re.M)]
    assert printed and int(m.group(2)) == printed[-1] + 1      # the iteration after the last
    assert snapshot_digest(tmp_path, 1) == before and latest_complete_snapshot(str(tmp_path)) == 1


def test_nan_weights_after_the_last_step_are_not_snapshotted(data, tmp_path):
    """lr 1000 from the start, 2 steps an epoch: the last step's loss is still finite but its
    update spoils the weights; the validation loss is NaN and no snapshot of them is written."""
    run = Proc('train.py', one_args(data, tmp_path, 'learning_rate=1000.0'))
    rc = run.wait()
    assert_ended_cleanly(run, rc, 1, 'error: the validation loss became nan after epoch 1',
                         'no snapshot was written yet')
    assert re.search(r'^iter 2 \| cost [0-9.e+]+ ', run.text, re.M), run.text[-2000:]
    assert latest_complete_snapshot(str(tmp_path)) is None
