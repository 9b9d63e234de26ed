"""Snapshots in the original's file format (docs/design.md), every file written atomically.

After epoch e, weights_dir holds W_{i}_{e}.npy / b_{i}_{e}.npy (W0_/W1_/b0_/b1_ for the groups=2
layers) in the original layouts, mom_{k}_{e}.npy for the k-th parameter in param order, and
lr_{e}.npy, the learning rate the next epoch uses. lr_{e}.npy is written last: a snapshot whose
lr file exists is complete. val_record.npy holds one row [val_error, val_loss] per epoch.
A run stopped by SIGTERM (preemption) writes snapshot e in the middle of epoch e, with
progress_{e}.npy holding [steps of epoch e done, images per step]; resuming it finishes epoch
e, also with another number of replicas or batch_size (from the first image not yet trained).
Under an exchange rule whose replicas differ (exchange_rules.py), the W/b files hold the rule's
model, replica_{r}_{e}.npy replica r's own weights and momentum (flat, alex_net's buffer layout)
and exchange_{name}_{e}.npy the rule's shared state (its centre, mixing weights, outer momentum).

    save_snapshot('models', 3, net, lr=0.01)
    lr = load_snapshot('models', 3, net)     # parameters, momentum; returns lr
"""
import os
import re

import numpy as np

from alex_net import PARAMS
from alexnet_lib.errors import UserError
from alexnet_lib.files import save_npy


class SnapshotError(UserError):
    """A snapshot is missing or malformed; the message names the file."""


def save_array(path, array):
    """np.save that leaves either the old file or the complete new one, never a partial file.
    A failed write (disk full, a file-size limit, no permission) is a SnapshotError naming the
    file."""
    try:
        save_npy(path, array, fsync=True)
    except OSError as e:
        raise SnapshotError(f"cannot write {path} (disk full or over a file-size limit?): "
                            f"{e.strerror or e}") from None


def load_array(path, shape=None, what='array'):
    try:
        a = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise SnapshotError(f"missing {what} file {path}") from None
    except (ValueError, OSError, EOFError) as e:
        raise SnapshotError(f"cannot read {what} file {path}: {e}") from None
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise SnapshotError(f"{path} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    return a


def param_file(weights_dir, name, epoch):
    return os.path.join(weights_dir, f"{name}_{epoch}.npy")


def mom_file(weights_dir, k, epoch):
    return os.path.join(weights_dir, f"mom_{k}_{epoch}.npy")


def lr_file(weights_dir, epoch):
    return os.path.join(weights_dir, f"lr_{epoch}.npy")


def progress_file(weights_dir, epoch):
    return os.path.join(weights_dir, f"progress_{epoch}.npy")


def replica_file(weights_dir, rank, epoch):
    return os.path.join(weights_dir, f"replica_{rank}_{epoch}.npy")


def exchange_file(weights_dir, name, epoch):
    return os.path.join(weights_dir, f"exchange_{name}_{epoch}.npy")


def save_snapshot(weights_dir, epoch, net, lr, progress=None, exchange_state=None):
    """Snapshot ``epoch``: after the epoch (progress None), or in the middle of it, after
    ``progress`` = (steps done, images per step) (a preempted run), in progress_{epoch}.npy;
    exchange_state:
    {name: array} of an exchange rule. The lr file goes first and comes back last, so a
    snapshot interrupted while being written is never taken for a complete one."""
    os.makedirs(weights_dir, exist_ok=True)
    _remove_stale_temporaries(weights_dir, epoch)
    for path in (lr_file(weights_dir, epoch), progress_file(weights_dir, epoch)):
        if os.path.exists(path):
            os.unlink(path)
    try:
        if progress is not None:
            save_array(progress_file(weights_dir, epoch), np.array(progress, np.int64))
        for name, a in net.to_original().items():
            save_array(param_file(weights_dir, name, epoch), a)
        for k, a in enumerate(net.momentum_to_original()):
            save_array(mom_file(weights_dir, k, epoch), a)
        for name, a in (exchange_state or {}).items():
            save_array(exchange_file(weights_dir, name, epoch), a)
        save_array(lr_file(weights_dir, epoch), np.float32(lr))
    except SnapshotError as e:
        last = latest_complete_snapshot(weights_dir)
        raise SnapshotError(f"snapshot {epoch} was not written, its files in {weights_dir} are "
                            f"incomplete: {e}; the last complete snapshot is "
                            f"{f'epoch {last}' if last is not None else 'none'}") from None


def _remove_stale_temporaries(weights_dir, epoch):
    """Temporary files of snapshot ``epoch`` left by a writer that was killed (SIGKILL leaves
    no chance to clean up): name_{epoch}.npy.tmp<pid> of a process that no longer runs."""
    for f in os.listdir(weights_dir):
        m = re.fullmatch(rf'.+_{epoch}\.npy\.tmp(\d+)', f)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue                       # its writer still runs
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        try:
            os.unlink(os.path.join(weights_dir, f))
        except OSError:
            pass


def load_params(weights_dir, epoch, params=PARAMS):
    """{name: array} of snapshot ``epoch``, every file checked for presence and shape (params:
    the network's, alex_net.PARAMS for the original's 1,000 classes)."""
    missing = [param_file(weights_dir, p.name, epoch) for p in params
               if not os.path.exists(param_file(weights_dir, p.name, epoch))]
    if len(missing) == len(params):
        raise SnapshotError(f"no snapshot {epoch} in {weights_dir} (no "
                            f"{os.path.basename(missing[0])} nor any other of its files): "
                            f"{_what_is_there(weights_dir)}")
    if missing:
        raise SnapshotError(f"snapshot {epoch} in {weights_dir} is incomplete: missing "
                            f"{', '.join(os.path.basename(m) for m in missing)}")
    _check_classes(weights_dir, epoch, params[-1])
    return {p.name: load_array(param_file(weights_dir, p.name, epoch), p.original_shape,
                               'parameter') for p in params}


def _check_classes(weights_dir, epoch, last_bias):
    """A snapshot of a network with another number of classes: say so, in the config's words."""
    path = param_file(weights_dir, last_bias.name, epoch)
    a = load_array(path, what='parameter')
    if a.ndim == 1 and a.shape != last_bias.original_shape:
        raise SnapshotError(f"snapshot {epoch} in {weights_dir} has {a.shape[0]} classes "
                            f"({os.path.basename(path)}), the network {last_bias.shape[0]}: set "
                            f"n_classes={a.shape[0]}")


def _what_is_there(weights_dir):
    if not os.path.isdir(weights_dir):
        return "the folder does not exist (fix weights_dir or load_epoch)"
    epochs = complete_snapshots(weights_dir)
    if not epochs:
        return "it holds no complete snapshot"
    return f"its complete snapshots are epochs {', '.join(map(str, epochs))} (fix load_epoch)"


def progress_in(weights_dir, epoch):
    """For a mid-epoch snapshot (a preempted run): (steps of ``epoch`` done, images per step;
    None in a file of an earlier version, which held the steps alone); else None."""
    path = progress_file(weights_dir, epoch)
    if not os.path.exists(path):
        return None
    a = load_array(path, what='progress')
    if a.shape == ():
        return int(a), None
    if a.shape != (2,):
        raise SnapshotError(f"{path} has shape {a.shape}, expected (2,): [steps, images per "
                            f"step]")
    return int(a[0]), int(a[1])


def load_snapshot(weights_dir, epoch, net, with_momentum=True):
    """Load parameters (and momentum) of snapshot ``epoch`` into ``net``; returns its lr, or
    None when only parameters were asked for."""
    params = net.arch.params
    if with_momentum and not os.path.exists(lr_file(weights_dir, epoch)) and \
            os.path.exists(param_file(weights_dir, params[0].name, epoch)):
        raise SnapshotError(
            f"snapshot {epoch} in {weights_dir} is incomplete: its lr file (written last) is "
            f"missing, so writing it was interrupted; {_what_is_there(weights_dir)}")
    arrays = load_params(weights_dir, epoch, params)
    momentum = None
    if with_momentum:
        momentum = [load_array(mom_file(weights_dir, k, epoch), p.original_shape, 'momentum')
                    for k, p in enumerate(params)]
    net.load_original(arrays, momentum)
    if not with_momentum:
        return None
    lr = load_array(lr_file(weights_dir, epoch), (), 'learning-rate')
    return float(lr)


def prune_snapshots(weights_dir, keep, val_errors):
    """Keep the last ``keep`` complete snapshots and the one with the best validation error
    (val_errors[e - 1] is epoch e's); delete the others, each lr file first so that a snapshot
    being deleted is never taken for a complete one."""
    epochs = complete_snapshots(weights_dir)
    scored = [e for e in epochs if e <= len(val_errors)]
    best = min(scored, key=lambda e: val_errors[e - 1]) if scored else None
    for e in epochs[:-keep]:
        if e == best:
            continue
        names = re.compile(rf'(((W|b|W0|W1|b0|b1)_\d+|mom_\d+|replica_\d+|exchange_[a-z_]+)_{e}'
                           rf'|progress_{e})\.npy')
        os.unlink(lr_file(weights_dir, e))
        for f in os.listdir(weights_dir):
            if names.fullmatch(f):
                os.unlink(os.path.join(weights_dir, f))


def complete_snapshots(weights_dir):
    """The epochs whose lr file (written last) exists, sorted."""
    if not os.path.isdir(weights_dir):
        return []
    return sorted(int(f[3:-4]) for f in os.listdir(weights_dir)
                  if f.startswith('lr_') and f.endswith('.npy') and f[3:-4].isdigit())


def latest_complete_snapshot(weights_dir):
    """The highest epoch whose lr file (written last) exists, or None."""
    epochs = complete_snapshots(weights_dir)
    return epochs[-1] if epochs else None
