"""A run's data: its batch files, labels and mean image, checked (RunData); the epoch plan
(which rows each step reads, in which order) and each step's Batch with its random draws (crop
offsets, mirrors, dropout masks); and serial loading.

    data = RunData(cfg, world, device, rank=r)
    for request in data.train_requests(epoch):          # (batch file, lo, hi, label offset)
        batch = data.train_batch(images, request, epoch, t)   # images: the request's rows

The training loop gives a loader the requests ``(batch_file, lo, hi)`` of a pass and takes,
for each, a uint8 tensor (hi-lo, 256, 256, 3) on the training device. ``SerialLoader`` (here,
``para_load: False``) reads in the trainer's own process when a batch is taken;
``alexnet_lib.parallel.ParallelLoader`` (``para_load: True``) has a loader process fill buffers
ahead of time. Both have the same interface:

    with SerialLoader(device) as loader:
        with loader.feed([(path, 0, 256), ...]) as feed:
            images = feed.take()      # valid until release()
            ...
            feed.release()
        for images in loader.iterate(requests):   # the same, each batch released when the
            ...                                   # next one is taken
"""
import os
from typing import NamedTuple

import numpy as np
import torch

import alex_net
from alexnet_lib.batch_files import (IMAGE_SHAPE, BatchFileError, batch_rows,
                                      list_batch_files, read_rows, replica_rows)
from alexnet_lib.config import DATA_KEYS, ConfigError, require_data
from alexnet_lib.files import DataError, load_npy


class BatchLoader:
    """What SerialLoader and parallel.ParallelLoader share."""

    def iterate(self, requests):
        """Each request's images in turn, each valid until the next one is taken."""
        with self.feed(requests) as feed:
            for _ in feed.requests:
                yield feed.take()
                feed.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SerialLoader(BatchLoader):
    """Reads each request in the trainer process when it is taken (the original's para_load:
    False). On a GPU the rows go through a pinned host buffer."""

    def __init__(self, device):
        self.device = torch.device(device)
        self._pinned = None

    def _host_buffer(self, n):
        if self.device.type != 'cuda':
            return np.empty((n,) + IMAGE_SHAPE, np.uint8)
        if self._pinned is None or self._pinned.shape[0] < n:
            self._pinned = torch.empty((n,) + IMAGE_SHAPE, dtype=torch.uint8).pin_memory()
        return self._pinned[:n].numpy()

    def feed(self, requests):
        return SerialFeed(self, requests)

    def read(self, path, lo, hi):
        t = torch.from_numpy(read_rows(path, lo, hi, self._host_buffer(hi - lo)))
        if self.device.type == 'cuda':
            # the pinned buffer is reused next step: the copy must finish before we read again
            t = t.to(self.device, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        return t

    def close(self):
        self._pinned = None


class ResidentLoader(SerialLoader):
    """Every request is the same `images`, already on the device: the step without loading
    (bench.py's "step alone")."""

    def __init__(self, device, images):
        super().__init__(device)
        self.images = images

    def read(self, path, lo, hi):
        return self.images


class SerialFeed:
    """SerialLoader's pass over requests: take() reads the next one."""

    def __init__(self, loader, requests):
        self.loader, self.requests, self._next = loader, list(requests), 0

    def take(self):
        self._next += 1
        return self.loader.read(*self.requests[self._next - 1])

    def release(self):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


CROP = 227
CENTRE = (256 - CROP) // 2   # 14
MAX_OFFSET = 256 - CROP      # offsets 0..29 on each axis


class Batch(NamedTuple):
    """One step's inputs on the training device: what a TrainStep takes."""
    images: torch.Tensor     # uint8 (B, 256, 256, 3)
    labels: torch.Tensor     # int64 (B,)
    offsets: torch.Tensor    # int64 (B, 2): crop offsets
    mirror: torch.Tensor     # bool (B,)
    masks: torch.Tensor      # float (dropout layers, B, units): dropout keep-masks


def step_draws(seed, epoch, step, n, rand_crop=True, batch_crop_mirror=False):
    """Every random draw of one step, for the whole global batch of n images, from a generator
    seeded by (seed, epoch, step): crop offsets (n, 2) in [0, 29], mirror flags (n,), and the
    seed of the dropout masks. Replica r of an N-replica run uses rows [r*n/N, (r+1)*n/N), so a
    run trains the same way on 1 or N devices."""
    rng = np.random.default_rng([seed, epoch, step])
    if not rand_crop:
        offsets, mirror = np.full((n, 2), CENTRE, np.int64), np.zeros(n, bool)
    elif batch_crop_mirror:
        offsets = np.repeat(rng.integers(0, MAX_OFFSET + 1, (1, 2)), n, axis=0)
        mirror = np.repeat(rng.random(1) < 0.5, n)
    else:
        offsets, mirror = rng.integers(0, MAX_OFFSET + 1, (n, 2)), rng.random(n) < 0.5
    mask_seed = int(rng.integers(0, 2 ** 62))
    return offsets, mirror, mask_seed


def dropout_masks(mask_seed, n, lo, hi, device, dtype=torch.float32):
    """Keep-masks (p=0.5) of the dropout layers (fc6 and fc7) for the global batch of n, rows
    [lo, hi) of it: a tensor (2, hi-lo, 4096) drawn on ``device`` from a generator seeded by
    mask_seed."""
    g = torch.Generator(device=device)
    g.manual_seed(mask_seed)
    units = alex_net.DROPOUT_UNITS
    assert len(set(units)) == 1, units      # one tensor holds every layer's masks
    keep = torch.rand((len(units), n, units[0]), generator=g, device=device) < 0.5
    return keep[:, lo:hi].to(dtype)


def centre_draws(n):
    """Validation: the centre crop without mirror."""
    return np.full((n, 2), CENTRE, np.int64), np.zeros(n, bool)


def mean_image_hwc(mean_file, device):
    """The mean image file (3, 256, 256) float32, as (256, 256, 3) on device."""
    m = load_npy(mean_file, 'mean file', 'run preprocessing or fix mean_file in config.yaml')
    if m.shape != (3, 256, 256):
        raise DataError(f"mean file {mean_file!r} has shape {m.shape}; expected (3, 256, 256)")
    if not np.isfinite(m).all():
        raise DataError(f"mean file {mean_file!r} holds NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(m.transpose(1, 2, 0), np.float32)).to(device)


PREPROCESSING_BATCH = 256   # images per batch file written by preprocessing


def spare_labels(rows):
    """How many labels a label file may hold beyond the images of batch files of these sizes:
    the original's preprocessing dropped the last partial batch of 256 but kept its labels, so
    when every file is full up to 255 more; when the last file is partial, nothing was dropped
    and none."""
    return PREPROCESSING_BATCH - 1 if all(r == PREPROCESSING_BATCH for r in rows) else 0


def load_labels(label_folder, name, need, spare, n_classes, what):
    """A label file for ``need`` images: at least one label per image, and at most ``spare``
    more (spare_labels)."""
    path = os.path.join(label_folder, name)
    labels = load_npy(path, 'label file', 'run preprocessing (make_labels.py) or fix label_folder')
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"label file {path!r} holds {labels.dtype} {labels.shape}; expected "
                         f"1-D integer labels")
    if not need <= len(labels) <= need + spare:
        raise DataError(f"label file {path!r} has {len(labels)} labels, but the {what} batch "
                         f"files hold {need} images (at most {spare} more labels, those of a "
                         f"last partial batch, may follow): label_folder and the {what} batch "
                         f"folder come from different preprocessing runs")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(f"label file {path!r} holds labels {labels.min()}..{labels.max()}, "
                         f"outside 0..{n_classes - 1} (n_classes: {n_classes}): set n_classes "
                         f"to the number of classes, or fix the labels")
    return torch.from_numpy(labels.astype(np.int64))


class RunData:
    """A run's batch files, labels and mean image, checked: every problem with them is found
    before the first step (train_2gpu.py's launcher makes one before it starts any trainer, so
    that a bad path is one line, as from train.py). When preprocessing recorded its outputs
    (provenance.py), the four folders must carry one record and the files must hold what it
    says; data without a record (the original's preprocessing) is checked by its sizes alone,
    and ``record`` is None."""

    def __init__(self, cfg, world=1, device='cpu', for_training=True, rank=0):
        from alexnet_lib.provenance import check_together, read_record
        self.cfg, self.world, self.rank = cfg, world, rank
        self.device = torch.device(device)
        keys = DATA_KEYS if for_training else ('val_folder', 'label_folder', 'mean_file')
        require_data(cfg, keys)
        folders = {k: os.path.dirname(cfg[k]) if k == 'mean_file' else cfg[k] for k in keys}
        if read_record(folders['mean_file']) is None:
            # a mean image from elsewhere (the original's released one) goes with any data;
            # only one of another preprocessing output is refused
            del folders['mean_file']
        self.record = check_together(folders)
        self.batch = cfg['batch_size']
        self.global_batch = self.batch * self.world
        self.val_files = list_batch_files(cfg['val_folder'], 'val_folder')
        self.val_rows = [batch_rows(f) for f in self.val_files]
        n_classes = cfg['n_classes']
        self.val_labels = load_labels(cfg['label_folder'], 'val_labels.npy', sum(self.val_rows),
                                      spare_labels(self.val_rows), n_classes, 'validation')
        self.mean = mean_image_hwc(cfg['mean_file'], device)
        if self.record is not None:
            self._check_record('val_folder', sum(self.val_rows), 'val_images',
                               len(self.val_labels))
        if not for_training:
            return
        self.train_files = list_batch_files(cfg['train_folder'], 'train_folder')
        self.file_rows = batch_rows(self.train_files[0])
        last = batch_rows(self.train_files[-1])     # a short last file, found now
        if last != self.file_rows:
            raise BatchFileError(
                f"training batch file {self.train_files[-1]!r} holds {last} images, the first "
                f"{self.file_rows}: every training batch file holds as many (preprocessing "
                f"leaves a last partial batch out); remove that file or fill it")
        if self.file_rows % self.batch:
            raise ConfigError(
                f"batch_size {self.batch} must divide the {self.file_rows} images of each "
                f"training batch file ({self.train_files[0]}): each replica reads its rows of a "
                f"step from one file")
        # steps run over the epoch's files as if concatenated: a global batch larger than a
        # file spans several files; a remainder of less than a step is left out
        self.train_images = len(self.train_files) * self.file_rows
        self.steps_per_epoch = self.train_images // self.global_batch
        if not self.steps_per_epoch:
            raise ConfigError(
                f"batch_size {self.batch} x {self.world} replica(s) = {self.global_batch} is more "
                f"than the {self.train_images} training images in {cfg['train_folder']}")
        self.train_labels = load_labels(cfg['label_folder'], 'train_labels.npy',
                                        self.train_images, spare_labels([self.file_rows]),
                                        n_classes, 'training')
        if self.record is not None:
            self._check_record('train_folder', self.train_images, 'train_images',
                               len(self.train_labels), self.record['train_batches'] *
                               self.record['batch_size'])

    def _check_record(self, key, images, field, n_labels, batched=None):
        """The files hold what their preprocessing record says."""
        want_batched = self.record[field] if batched is None else batched
        if images != want_batched or n_labels != self.record[field]:
            raise DataError(
                f"{key} {self.cfg[key]!r} and its labels hold {images} images and {n_labels} "
                f"labels, but their preprocessing record says {want_batched} and "
                f"{self.record[field]}: the folder was changed after preprocessing; run "
                f"preprocessing again")

    # -- the epoch plan: which rows each step reads, and its random draws ------------------------
    def file_order(self, epoch):
        n = len(self.train_files)
        if not self.cfg['shuffle']:
            return np.arange(n)
        return np.random.default_rng([self.cfg['seed'], epoch, 1 << 20]).permutation(n)

    def train_requests(self, epoch):
        """(file, lo, hi, label offset) of each step of an epoch, this replica's rows: step t
        is images [t * G, (t + 1) * G) of the epoch's files concatenated (G the global batch),
        and replica r reads the r-th batch_size of them, which lie in one file."""
        order = self.file_order(epoch)
        out = []
        for t in range(self.steps_per_epoch):
            first = t * self.global_batch + self.rank * self.batch
            fi = order[first // self.file_rows]
            lo = first % self.file_rows
            out.append((self.train_files[fi], lo, lo + self.batch, fi * self.file_rows))
        return out

    def val_requests(self):
        """(file, lo, hi, label offset) covering this replica's share of every validation
        image, in pieces of at most batch_size."""
        out, start = [], 0
        for path, n in zip(self.val_files, self.val_rows):
            lo, hi = replica_rows(n, self.rank, self.world)
            for a in range(lo, hi, self.batch):
                out.append((path, a, min(a + self.batch, hi), start))
            start += n
        return out

    def train_batch(self, images, request, epoch, step):
        """The Batch of a training step: its images (on the device), this replica's labels and
        its slice of the step's random draws, which are made for the whole global batch from a
        generator seeded by (seed, epoch, step): a run trains the same way on 1 or N devices."""
        cfg, dev = self.cfg, self.device
        _, a, b, label_off = request
        offsets, mirror, mask_seed = step_draws(cfg['seed'], epoch, step, self.global_batch,
                                                cfg['rand_crop'], cfg['batch_crop_mirror'])
        lo, hi = self.rank * self.batch, (self.rank + 1) * self.batch
        return Batch(images,
                     self.train_labels[label_off + a:label_off + b].to(dev, non_blocking=True),
                     torch.from_numpy(offsets[lo:hi]).to(dev, non_blocking=True),
                     torch.from_numpy(mirror[lo:hi]).to(dev, non_blocking=True),
                     dropout_masks(mask_seed, self.global_batch, lo, hi, dev))
