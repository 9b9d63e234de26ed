"""A run's weights_dir: checked before the first step, owned by one run, announced at the start.

    with claim(cfg, data, world) as cfg:      # None: nothing left to train (said why)
        if cfg is not None:
            train(cfg)

claim() checks that weights_dir can be written (created if missing, a probe file written and
removed), decides how the run starts (resume_train: True, False or auto), refuses a folder that
already holds another run unless told what to do with it, takes the folder's lock (a file with
the owner's pid: a second run into the folder of a live run is refused, the lock of a dead one
taken over) and prints the start block: the config files merged and why, the data folders,
weights_dir as an absolute path, and the disk its snapshots will take. The lock is released
when the block ends (also on errors and Ctrl-C).
"""
import contextlib
import os
import re
import socket
import sys

from alexnet_lib.errors import UserError
from alexnet_lib.provenance import TRAINED_ON, check_trained_on, write_record
from alexnet_lib.snapshot import complete_snapshots, progress_in

LOCK_NAME = '.run.lock'
# the files a run writes (snapshot.py, loop.py): what makes a folder another run's
RUN_FILE = re.compile(r'(metrics\.csv|val_record\.npy|'
                      r'(W|b|W0|W1|b0|b1)_\d+_\d+\.npy|(mom|lr|progress)_\d+\.npy)'
                      r'(\.tmp\d+)?')


class RunFolderError(UserError):
    """weights_dir cannot be used: not writable, another run's, or in use."""


def check_writable(weights_dir):
    """Create weights_dir if missing and write and remove a probe file in it: a path that is a
    file, a read-only mount or a folder without permission is found now, not at the first
    snapshot an epoch later."""
    try:
        os.makedirs(weights_dir, exist_ok=True)
        probe = os.path.join(weights_dir, f'.probe{os.getpid()}')
        with open(probe, 'wb') as f:
            f.write(b'probe')
        os.unlink(probe)
    except OSError as e:
        cause = e.strerror or str(e)
        if isinstance(e, FileExistsError) or (os.path.exists(weights_dir)
                                              and not os.path.isdir(weights_dir)):
            cause = 'it is a file, not a folder'
        raise RunFolderError(f"weights_dir {weights_dir} cannot be written: {cause}; choose "
                             f"another weights_dir") from None


def run_files(weights_dir):
    if not os.path.isdir(weights_dir):     # a new run's folder (the lead makes it)
        return []
    return sorted(f for f in os.listdir(weights_dir) if RUN_FILE.fullmatch(f))


def plan_start(weights_dir, resume_train, load_epoch, n_epochs, overwrite):
    """(resume, load_epoch, files to remove first, what the run does) for this folder; a
    RunFolderError when the folder holds another run and the settings do not say what to do."""
    files = run_files(weights_dir)
    epochs = complete_snapshots(weights_dir)
    if resume_train == 'auto':
        if epochs:
            resume_train, load_epoch = True, epochs[-1]
        else:
            return False, load_epoch, files, "a new run (resume_train: auto found no snapshot)"
    if resume_train:
        return True, load_epoch, [], f"resuming from snapshot {load_epoch}"
    if not files:
        return False, load_epoch, [], "a new run"
    if overwrite:
        return False, load_epoch, files, f"a new run, replacing the {len(files)} files of " \
                                         f"the run that was there (overwrite: True)"
    held = (f"snapshots {epochs[0]}..{epochs[-1]}" if len(epochs) > 1 else
            f"snapshot {epochs[0]}" if epochs else f"{len(files)} files of a run")
    resume = (f"resume it (resume_train=True load_epoch={epochs[-1]}, or resume_train=auto), "
              if epochs else "")
    raise RunFolderError(f"weights_dir {weights_dir} already holds another run ({held}): "
                         f"{resume}write to another weights_dir, or replace it with "
                         f"overwrite=True")


def finished_message(weights_dir, load_epoch, n_epochs):
    """Resuming a snapshot that already ends the run: nothing to train, and how to train more."""
    if load_epoch < n_epochs or load_epoch not in complete_snapshots(weights_dir) or \
            progress_in(weights_dir, load_epoch) is not None:
        return None         # more to train, or a snapshot that resuming will report
    return (f"nothing to train: snapshot {load_epoch} in {weights_dir} already ends this run "
            f"(n_epochs: {n_epochs}); to train more, raise n_epochs "
            f"(n_epochs={load_epoch + 10} resume_train=True load_epoch={load_epoch})")


class Lock:
    """weights_dir/.run.lock holding 'pid host': one live run per folder. A lock whose pid is
    this process or its parent (train_2gpu.py's launcher) is ours; one of a dead process on
    this host is taken over."""

    def __init__(self, weights_dir):
        self.path = os.path.join(weights_dir, LOCK_NAME)
        self.held = False

    def acquire(self):
        # the lock appears with its owner written (a hard link to a finished file): one that
        # is empty for an instant would be taken for a dead run's by a second run
        mine = f"{self.path}.{os.getpid()}"
        with open(mine, 'w') as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        try:
            return self._take(mine)
        finally:
            os.unlink(mine)

    def _take(self, mine):
        for _ in range(3):
            try:
                os.link(mine, self.path)
            except FileExistsError:
                owner = self._owner()
                if owner is None:                       # dead, or unreadable: take it over
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
                    continue
                pid, host = owner
                if host == socket.gethostname() and pid in (os.getpid(), os.getppid()):
                    return self                         # our own launcher's: the same run
                raise RunFolderError(
                    f"weights_dir {os.path.dirname(self.path)} is in use by a live run (pid "
                    f"{pid} on {host}); wait for it to end or choose another weights_dir")
            self.held = True
            return self
        raise RunFolderError(f"cannot take the lock {self.path}; remove it if no run uses "
                             f"the folder")

    def _owner(self):
        """(pid, host) of a live owner, else None."""
        try:
            with open(self.path) as f:
                pid, host = f.read().split()
            pid = int(pid)
        except (OSError, ValueError):
            return None
        if host != socket.gethostname():
            return pid, host                 # another node's: cannot tell, assume alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid, host

    def release(self):
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.held = False


def start_block(cfg, data, world, what, keep):
    """The lines a training script prints before its first step."""
    def src(key):
        by = cfg.set_by.get(key)
        return 'set on the command line, relative to the current folder' \
            if by == 'the command line' else f"set in {by}, relative to its folder"
    lines = ["config: " + "; ".join(f"{path} ({why})" for path, why in cfg.sources)]
    for key in ('train_folder', 'val_folder', 'label_folder', 'mean_file'):
        lines.append(f"  {key + ':':14s}{cfg[key]}")
    if data.record is None:
        lines.append("  notice: these data folders carry no preprocessing record (the "
                     "original's preprocessing?): only their sizes were checked")
    else:
        lines.append(f"  one preprocessing output: {data.record['train_images']} training, "
                     f"{data.record['val_images']} validation images")
    size = snapshot_bytes(cfg['n_classes'])
    n_snapshots = cfg['n_epochs'] // cfg['snapshot_freq']
    kept = n_snapshots if keep == 'all' else min(n_snapshots, keep + 1)
    lines.append(f"weights_dir: {cfg['weights_dir']} ({src('weights_dir')}): {what}")
    lines.append(f"  a snapshot takes {size / 2**20:.0f} MiB; this run keeps up to {kept} "
                 f"({kept * size / 2**30:.1f} GiB; keep_snapshots: {keep}, the last ones and "
                 f"the best)")
    return lines


def snapshot_bytes(n_classes):
    from alex_net import architecture
    return architecture(n_classes).snapshot_bytes


@contextlib.contextmanager
def claim(cfg, data, world=1, log=print):
    """The run's weights_dir, checked, owned and announced: yields the config to train with
    (resume_train decided), or None when there is nothing left to train."""
    wd = cfg['weights_dir']
    check_writable(wd)
    lock = Lock(wd).acquire()
    try:
        resume, load_epoch, remove, what = plan_start(
            wd, cfg['resume_train'], cfg['load_epoch'], cfg['n_epochs'], cfg['overwrite'])
        done = finished_message(wd, load_epoch, cfg['n_epochs']) if resume else None
        if done is not None:
            log(done)
            yield None
            return
        for f in remove:
            os.unlink(os.path.join(wd, f))
        keys = ('train_folder', 'val_folder', 'label_folder', 'mean_file')
        if resume:
            check_trained_on(wd, data.record, keys)
        elif data.record is not None:
            write_record(wd, data.record, TRAINED_ON)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(wd, TRAINED_ON))
        run_cfg = type(cfg)(cfg, resume_train=resume, load_epoch=load_epoch)
        run_cfg.sources, run_cfg.set_by = cfg.sources, cfg.set_by
        for line in start_block(cfg, data, world, what, cfg['keep_snapshots']):
            log(line)
        sys.stdout.flush()
        yield run_cfg
    finally:
        lock.release()
