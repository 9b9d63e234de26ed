"""Reading the preprocessed batch files: one place for the format and its checks.

A batch file is a hickle (HDF5) file whose dataset ``data`` holds one uint8 array of shape
(B, 256, 256, 3), NHWC (the original stored (3, 256, 256, B)). A trainer of an N-replica run
reads only its rows of each file, as an HDF5 hyperslab, straight into the memory it is given
(pinned or shared).

    from alexnet_lib.batch_files import list_batch_files, read_rows, replica_rows
    files = list_batch_files('data/toy/train_hkl_b256_b_256')
    lo, hi = replica_rows(n_rows=256, rank=0, world=2)      # (0, 128)
    x = read_rows(files[0], lo, hi)                          # uint8 (128, 256, 256, 3)
"""
import os
import re
import stat

import h5py
import numpy as np

from alexnet_lib.errors import UserError
from alexnet_lib.files import atomic_write

IMAGE_SHAPE = (256, 256, 3)
DATASET = 'data'  # where hickle.dump puts a single array


class BatchFileError(UserError):
    """A batch file is missing, unreadable or of the wrong shape/dtype; the message names it."""


def list_batch_files(folder, key='train_folder'):
    """The sorted ``*.hkl`` files of a batch folder (the config's `key`); a clear error if
    there are none."""
    if not os.path.isdir(folder):
        half = re.fullmatch(r'(.*_b\d+_b_)(\d+)', folder)
        if half and half.group(2) != '256':
            # the original wrote half batches for its two GPUs (..._b256_b_128/)
            raise BatchFileError(
                f"batch folder {folder!r} does not exist: {key} names the original's folder "
                f"of {half.group(2)}-image batches for several GPUs; here one set of full "
                f"batches serves any number of GPUs (each reads its rows of every batch): set "
                f"{key} to {half.group(1) + '256'!r}, which preprocessing writes")
        raise BatchFileError(f"batch folder {folder!r} does not exist: run preprocessing "
                             f"(preprocessing/generate_data.sh) or fix {key} in the config")
    # batch i's labels are labels[i*B:(i+1)*B]: numbered files in their numbers' order (10.hkl
    # after 2.hkl), as preprocessing numbers them (0000.hkl ... 9999.hkl, 10000.hkl)
    names = sorted((f for f in os.listdir(folder) if f.endswith('.hkl')),
                   key=lambda f: (0, int(f[:-4]), f) if f[:-4].isdigit() else (1, 0, f))
    files = [os.path.join(folder, f) for f in names]
    if not files:
        raise BatchFileError(f"batch folder {folder!r} holds no .hkl batch files")
    return files


def _open(path):
    """A batch file, for h5py: it must be a regular file, since h5py's open of a FIFO or a
    device waits for good holding the GIL (no other thread of the process runs)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise BatchFileError(f"batch file {path!r} is not a regular file (a FIFO or a device?): "
                             f"put the batch file itself there")
    return h5py.File(path, 'r')


def _dataset(h5, path):
    if not isinstance(h5.get(DATASET), h5py.Dataset):
        raise BatchFileError(f"batch file {path!r} has no '{DATASET}' array: not a batch file "
                             f"written by preprocessing/make_hkl.py")
    d = h5[DATASET]
    if d.dtype != np.uint8 or d.ndim != 4 or tuple(d.shape[1:]) != IMAGE_SHAPE:
        raise BatchFileError(f"batch file {path!r} holds {d.dtype} {tuple(d.shape)}; expected "
                             f"uint8 (B, 256, 256, 3) (NHWC): re-run preprocessing")
    return d


def batch_rows(path):
    """Number of images in a batch file."""
    try:
        with _open(path) as h5:
            return int(_dataset(h5, path).shape[0])
    except BatchFileError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise BatchFileError(f"cannot read batch file {path!r}: {e}") from e


# A contiguous, uncompressed dataset (what hickle writes) is read at its file offset with
# os.preadv on several threads: h5py reads on one thread only (~25k images/s from the page
# cache), four threads of preadv reach ~120k images/s on a 16-core host.
READ_THREADS = 4
_PARALLEL_MIN_BYTES = 8 << 20
_pool = None
_layout_cache = {}


def _layout(path):
    """(rows, file offset of the data) for a contiguous, unfiltered 'data' dataset, else
    (rows, None); checked once per file version (device, inode, size, mtime)."""
    st = os.stat(path)
    key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    got = _layout_cache.get(key)
    if got is None:
        with _open(path) as h5:
            d = _dataset(h5, path)
            off = None
            if d.chunks is None and d.id.get_create_plist().get_nfilters() == 0:
                off = d.id.get_offset()
                if off is not None and off + d.id.get_storage_size() > st.st_size:
                    raise BatchFileError(f"batch file {path!r} is truncated")
            got = (int(d.shape[0]), off)
        if len(_layout_cache) > 100000:
            _layout_cache.clear()
        _layout_cache[key] = got
    return got


def _pread_into(path, offset, buf):
    """Reads len(buf) bytes at ``offset`` of ``path`` into buf, READ_THREADS threads for big ones
    (os.preadv releases the GIL: one thread's memcpy from the page cache is ~4-6 GB/s)."""
    global _pool
    mv = memoryview(buf).cast('B')
    fd = os.open(path, os.O_RDONLY)
    try:
        def part(a, b):
            done = a
            while done < b:
                got = os.preadv(fd, [mv[done:b]], offset + done)
                if got <= 0:
                    raise BatchFileError(f"batch file {path!r} is truncated")
                done += got
        n = len(mv)
        k = max(1, min(READ_THREADS, n // _PARALLEL_MIN_BYTES))
        if k == 1:
            part(0, n)
            return
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor
            _pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix='read_rows')
        step = -(-n // k)
        for f in [_pool.submit(part, a, min(n, a + step)) for a in range(0, n, step)]:
            f.result()
    finally:
        os.close(fd)


def read_rows(path, lo, hi, out=None):
    """Rows [lo, hi) of a batch file, read straight into ``out`` (uint8 (hi-lo, 256, 256, 3),
    C-contiguous) when given. Raises BatchFileError naming the file on any problem."""
    n = hi - lo
    if out is None:
        out = np.empty((n,) + IMAGE_SHAPE, np.uint8)
    elif out.shape != (n,) + IMAGE_SHAPE or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"read_rows: out must be uint8 C-contiguous {(n,) + IMAGE_SHAPE}")
    try:
        rows, off = _layout(path)
        if hi > rows or lo < 0 or lo > hi:
            raise BatchFileError(f"batch file {path!r} has {rows} images; rows "
                                 f"[{lo}, {hi}) were asked for")
        if n and off is not None:
            _pread_into(path, off + lo * out[0].nbytes, out)
        elif n:
            with _open(path) as h5:
                _dataset(h5, path).read_direct(out, source_sel=np.s_[lo:hi])
    except BatchFileError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise BatchFileError(f"cannot read batch file {path!r} (truncated or corrupt?): {e}") from e
    return out


def replica_rows(n_rows, rank, world):
    """The rows [lo, hi) of an n_rows batch that replica ``rank`` of ``world`` handles: equal
    contiguous slices, the remainder spread over the first replicas (a short last validation
    batch still covers every image exactly once)."""
    base, extra = divmod(n_rows, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def write_batch(path, images):
    """Write one batch file atomically: the file exists only when complete."""
    import hickle
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"write_batch: expected (B, 256, 256, 3) uint8, got {images.shape}")
    atomic_write(path, lambda tmp: hickle.dump(images, tmp, mode='w'))
