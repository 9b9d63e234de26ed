"""Writing files atomically and reading .npy files safely: the one place for both.

    atomic_write(path, lambda tmp: hickle.dump(x, tmp, mode='w'))
    save_npy(path, array, fsync=True)
    a = load_npy(path, 'label file', 'run preprocessing or fix label_folder')

A file written with atomic_write holds either its old content or the complete new one, never a
part: it is written to ``path.tmp<pid>`` beside it and renamed. A temporary file left by a
process that was killed (SIGKILL leaves no chance to clean up) keeps that name, so that its
writer's pid tells whether it is stale (snapshot.py removes those).
"""
import os

import numpy as np

from alexnet_lib.errors import UserError


class DataError(UserError):
    """An input file (labels, mean image, ...) is missing or malformed; the message names it."""


def temporary_name(path):
    return f"{path}.tmp{os.getpid()}"


def atomic_write(path, write, fsync=False):
    """write(tmp) writes the file at the path it is given; then it replaces ``path``.
    fsync: the data is on the disk before the rename (snapshots)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_npy(path, array, fsync=False):
    """np.save, atomically, without pickles."""
    def write(tmp):
        with open(tmp, 'wb') as f:
            np.save(f, np.asarray(array), allow_pickle=False)
    atomic_write(path, write, fsync)


def load_npy(path, what, fix):
    """np.load without pickles; a missing or unreadable file is a DataError naming it."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{what} {path!r} not found: {fix}") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{what} {path!r} is not a .npy array: {e}") from None
