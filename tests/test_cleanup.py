"""How a run ends when it is interrupted or killed, and what it leaves behind (real processes on
the CPU).

* Ctrl-C: a terminal sends SIGINT to the whole foreground process group. train.py ends with
  the same last line, ``interrupted``, and exit status 130 with and without parallel loading
  (the loader process is not a crashed part); train_2gpu.py with the launcher's one line; no
  traceback and no process of the run is left.
* Private folders: the loader's socket folder (``proc_load-<pid>-*``) and the launcher's
  rendezvous folder (``rdv-<pid>-*``) are gone once the surviving processes of a run have
  exited, however it ended (a SIGKILLed trainer, loader or launcher included), and a new run
  removes those of dead runs (pid in the name dead, this user's), never a live run's.

The session runs with TMPDIR pointed at a private folder (tests/conftest.py), so every folder
found there is the suite's own.
"""
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from conftest import PRIVATE_FOLDERS, default_sigint, make_dataset
from processes import Proc, assert_nothing_left, assert_sigkill_leaves_nothing, cmdline, stop_runs

pytestmark = pytest.mark.slow   # real training runs: the full suite, not the fast tier


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """Two training files of 16 images (8 steps of 4 an epoch: a Ctrl-C comes while loads are
    in flight), 4 validation images."""
    return make_dataset(str(tmp_path_factory.mktemp('cleanup_data')), n_train_files=2,
                        file_rows=16, val_sizes=(4,))


def train_args(data, wd, *extra):
    return [*data, 'gpu=cpu', 'batch_size=4', 'print_freq=1', 'n_epochs=50',
            'snapshot_freq=1000', f'weights_dir={wd}', *extra]


def two_args(data, wd, *extra):
    return [*data, 'gpu0=cpu', 'gpu1=cpu', 'exchange=host', 'batch_size=2', 'print_freq=1',
            'para_load=True', 'n_epochs=50', 'snapshot_freq=1000', f'weights_dir={wd}', *extra]


def group_members(pgid):
    """Live processes whose process group is pgid."""
    out = []
    for d in os.listdir('/proc'):
        if d.isdigit():
            try:
                with open(f'/proc/{d}/stat') as f:
                    fields = f.read().rsplit(')', 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ('Z', 'X'):
                out.append(int(d))
    return out


def private_folders():
    """The proc_load-*/rdv-* folders in this session's temporary folder."""
    base = tempfile.gettempdir()
    return {os.path.join(base, n) for n in os.listdir(base) if n.startswith(PRIVATE_FOLDERS)}


class Session(Proc):
    """A script run in a session (and process group) of its own, as a terminal runs a job in
    the foreground, with Ctrl-C's default action; stdout and stderr collected apart (out, err),
    each line stripped; its processes are its descendants and its group's members; its folders
    are the private folders that appeared since it started."""

    SEPARATE_STDERR = True
    STRIP = True
    POLL = 0.05
    WAIT_TIMEOUT = 120

    def __init__(self, script, args):
        self.before = private_folders()
        super().__init__(script, args, preexec_fn=default_sigint, new_session=True)
        self.out, self.err = self.outputs

    @property
    def text(self):
        with self._cond:
            return '\n'.join(self.out + ['--- stderr:'] + self.err)

    def running(self):
        """Processes of the run (its group, or any descendant it had) alive now."""
        left = super().running()
        left.update({p: cmdline(p) for p in group_members(self.pid)})
        return left

    def kill_all(self):
        super().kill_all()
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass

    def folders_left(self):
        """The private folders that appeared since this run started and are still there."""
        return sorted(private_folders() - self.before)


@pytest.fixture(autouse=True)
def _stop_runs():
    """After each test: kill what a failed test left running."""
    yield
    stop_runs()


def ctrl_c(run, after=r'^iter 3 ', delay=0.0, presses=1):
    """Ctrl-C once the run has trained a few steps: SIGINT to its whole process group (pressed
    again 50 ms later: an impatient user)."""
    run.wait_for(after)
    time.sleep(delay)
    for i in range(presses):
        if i:
            time.sleep(0.05)
        try:
            os.killpg(run.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    return run.wait()


def assert_interrupted(run, rc, last_line):
    text = run.text
    assert rc == 130, f"exit status {rc}, expected 130:\n{text[-4000:]}"
    assert run.err and run.err[-1] == last_line, \
        f"stderr ends with {run.err[-1:]!r}, expected {last_line!r}:\n{text[-4000:]}"
    assert 'Traceback' not in text, text[-6000:]
    assert not [x for x in run.err if x.startswith(('error:', 'proc_load:'))], text[-4000:]
    assert_nothing_left(run)


# ---------------------------------------------------------------------------------------------
# Ctrl-C

@pytest.mark.parametrize('para_load,delay,presses', [(True, 0.0, 1), (True, 0.3, 2),
                                                     (False, 0.0, 1)])
def test_ctrl_c_of_train_is_interrupted_with_and_without_the_loader(data, tmp_path,
                                                                    para_load, delay, presses):
    """Ctrl-C (SIGINT to the process group: the trainer and, were it in the group, its loader)
    in the middle of training, once or twice: 'interrupted' and exit 130, as without parallel
    loading; nothing is left."""
    run = Session('train.py', train_args(data, tmp_path, f'para_load={para_load}'))
    if para_load:
        run.wait_for(r'^iter 1 ')
        assert run.members('proc_load.py'), 'no loader process: this tests nothing'
    rc = ctrl_c(run, delay=delay, presses=presses)
    assert_interrupted(run, rc, 'interrupted')


def test_sigint_to_trainer_and_loader_at_once_is_an_interruption(data, tmp_path):
    """SIGINT to the trainer's group and to its loader at once (as a tool that signals every
    process of a session would): the loader dying of it is no error, the run was interrupted."""
    run = Session('train.py', train_args(data, tmp_path, 'para_load=True'))
    run.wait_for(r'^iter 3 ')
    loaders = run.members('proc_load.py')
    assert len(loaders) == 1
    os.kill(loaders[0], signal.SIGINT)
    os.killpg(run.pid, signal.SIGINT)
    assert_interrupted(run, run.wait(), 'interrupted')


def test_ctrl_c_of_train_2gpu_is_one_line_and_130(data, tmp_path):
    """Ctrl-C to train_2gpu.py's process group (the launcher, its trainers and their loaders):
    the launcher's one line, exit 130, nothing left behind (rendezvous folder included)."""
    run = Session('train_2gpu.py', two_args(data, tmp_path))
    run.wait_for(r'^iter 1 ')
    assert len(run.members('proc_load.py')) == 2
    rc = ctrl_c(run, after=r'^iter 2 ', delay=0.2)
    assert_interrupted(run, rc, 'launcher: SIGINT received, workers stopped (rank 0: exit code '
                                '130, rank 1: exit code 130); rank 0: KeyboardInterrupt')


# ---------------------------------------------------------------------------------------------
# what a killed run leaves

def test_sigkill_of_train_leaves_no_folder(data, tmp_path):
    """SIGKILL of train.py mid-epoch: its loader, the survivor, exits and takes the trainer's
    socket folder with it."""
    run = Session('train.py', train_args(data, tmp_path, 'para_load=True'))
    run.wait_for(r'^iter 2 ')
    assert run.members('proc_load.py') and run.folders_left()
    assert_sigkill_leaves_nothing(run)


def test_sigkill_of_the_loader_leaves_no_folder(data, tmp_path):
    """SIGKILL of the loader: the trainer says so, exits 1 and removes its socket folder."""
    run = Session('train.py', train_args(data, tmp_path, 'para_load=True'))
    run.wait_for(r'^iter 2 ')
    loaders = run.members('proc_load.py')
    assert len(loaders) == 1
    os.kill(loaders[0], signal.SIGKILL)
    assert run.wait() == 1
    assert f'error: loader process (pid {loaders[0]}) was killed by signal SIGKILL' in \
        run.err[-1], run.text[-3000:]
    assert_nothing_left(run)


def test_sigkill_of_the_launcher_leaves_no_folder(data, tmp_path):
    """SIGKILL of train_2gpu.py: its trainers and their loaders follow it, and neither the
    rendezvous folder nor a loader's socket folder is left."""
    run = Session('train_2gpu.py', two_args(data, tmp_path))
    run.wait_for(r'^iter 2 ')
    assert len(run.members('proc_load.py')) == 2
    assert len(run.folders_left()) == 3, run.folders_left()     # 2 loaders, 1 rendezvous
    assert_sigkill_leaves_nothing(run)


# ---------------------------------------------------------------------------------------------
# stale folders of dead runs

def dead_pid():
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen(['true'])
    p.wait()
    return p.pid


def plant(base, name, uid=None, link_to=None):
    path = os.path.join(base, name)
    if link_to is not None:
        os.symlink(link_to, path)
        return path
    os.mkdir(path, 0o700)
    with open(os.path.join(path, 'loader'), 'w'):
        pass
    if uid is not None:
        os.chown(path, uid, -1)
    return path


@pytest.mark.parametrize('prefix', ['proc_load', 'rdv'])
def test_a_new_run_removes_only_stale_folders_of_this_user(tmp_path, prefix):
    """The folders of dead trainers (or launchers) of this user go when a new one starts; a
    live process's folder, another user's, a link, a name without a pid stay."""
    from alexnet_lib import launch
    from alexnet_lib.parallel import ParallelLoader
    base = tempfile.gettempdir()
    dead = dead_pid()
    assert not launch.pid_alive(dead)
    sleeper = subprocess.Popen(['sleep', '60'])
    try:
        stale = [plant(base, f'{prefix}-{dead}-abcdefgh'), plant(base, f'{prefix}-{dead}-x')]
        kept = [plant(base, f'{prefix}-{sleeper.pid}-abcdefgh'),
                plant(base, f'{prefix}-{os.getpid()}-abcdefgh'),
                plant(base, f'{prefix}-{dead}-link', link_to=str(tmp_path)),
                plant(base, f'{prefix}-nopid'), plant(base, f'{prefix}-0-abcdefgh')]
        if os.geteuid() == 0:
            kept.append(plant(base, f'{prefix}-{dead}-nobody', uid=65534))
        if prefix == 'proc_load':
            with ParallelLoader('cpu', max_rows=4) as loader:
                mine = os.path.dirname(loader.endpoint[len('ipc://'):])
                assert os.path.basename(mine).startswith(f'proc_load-{os.getpid()}-')
                assert os.path.dirname(mine) == base
        else:
            launch.spawn(_rendezvous_seen, 1, args=(str(tmp_path),), timeout=120)
            with open(tmp_path / 'rdv') as f:
                mine = f.read()
            assert os.path.basename(mine).startswith(f'rdv-{os.getpid()}-'), mine
        assert not os.path.exists(mine)
        assert [p for p in stale if os.path.lexists(p)] == []
        assert [p for p in kept if not os.path.lexists(p)] == []
        assert os.path.isdir(tmp_path)          # a link's target is not touched
    finally:
        sleeper.kill()
        sleeper.wait()
        for p in stale + kept:
            if os.path.islink(p):
                os.unlink(p)
            else:
                shutil.rmtree(p, ignore_errors=True)


def _rendezvous_seen(rank, world, out):
    from alexnet_lib.launch import RENDEZVOUS_ENV
    with open(os.path.join(out, 'rdv'), 'w') as f:
        f.write(os.environ[RENDEZVOUS_ENV])


def test_a_long_tmpdir_gives_way_to_tmp_for_the_socket(tmp_path, monkeypatch):
    """A TMPDIR too long for a unix socket's path (about 100 bytes): the loader's folder goes
    to /tmp instead, and still works and goes."""
    from alexnet_lib.parallel import ParallelLoader
    long = tmp_path / ('x' * 60) / ('y' * 60)
    long.mkdir(parents=True)
    monkeypatch.setattr(tempfile, 'tempdir', str(long))
    with ParallelLoader('cpu', max_rows=4) as loader:
        path = loader.endpoint[len('ipc://'):]
        assert len(path) <= 100 and os.path.dirname(os.path.dirname(path)) == '/tmp', path
        assert list(loader.iterate([])) == []
    assert not os.path.exists(os.path.dirname(path))
