"""ImageNet JPEGs -> batch files of 256 images (hickle, uint8 (256, 256, 256, 3) NHWC) + mean image.

    python preprocessing/make_hkl.py                      # full: every train and val image
    python preprocessing/make_hkl.py toy                  # the first 2560 train and 2560 val images
    python preprocessing/make_hkl.py --paths other.yaml --workers 8 --skip-bad

Works from any folder; paths come from preprocessing/paths.yaml unless --paths names another.

Writes, as the original preprocessing did:
  {misc_dir}/shuffled_train_filenames.npy   training order: sorted, shuffled once with seed 1;
                                            reused when present
  {tar_root_dir}/{tar_train_dir}_b256_b_256/0000.hkl, ...   full batches of 256 in that order;
                                            a last partial batch is dropped, as the original did
  {tar_root_dir}/{tar_val_dir}_b256_b_256/0000.hkl, ...     sorted validation images, all kept:
                                            the last batch may be short
  {misc_dir}/img_mean.npy                   float32 (3, 256, 256): the mean of the training
                                            batch images (channel first, as the original)
  batch_images.json in both batch folders:  the sha1 of each batch's image names, written before
                                            the batches: a re-run keeps a batch file only when
                                            it holds the images the run puts in it (after a new
                                            training order, or other images left out, the
                                            batches that changed are made again)
  preprocessing.json in both batch folders and misc_dir: the same record of this output
                                            (alexnet_lib/provenance.py), written last, when
                                            both splits and the mean are complete; removed
                                            first, before anything changes

Every core decodes (a process pool; --workers N for fewer). A batch file appears only when it is
complete, so the run can be stopped at any moment (Ctrl-C, or SIGTERM: the decoding processes are
killed with it); running the same command again skips the complete batches (and reads them back
for the mean).

Class folders hold images only: a folder inside one (or inside val_img_dir) stops the run
with an error naming it; files not named as images (.jpeg, .jpg, .png, .bmp, .webp, ... in any
case: IMAGE_SUFFIXES of alexnet_lib/images.py) are left out with one notice line.

A full disk or a file-size limit stops the run with an error naming the file; no half-written
file is kept under a batch's name.

An image that cannot be decoded stops the run with an error naming it. With --skip-bad such
images are left out instead and listed in {misc_dir}/skipped_train_images.txt or
skipped_val_images.txt; later batches move up to fill the gap, and make_labels.py leaves the
same images out of the label files. While a report exists, its images stay left out.
"""
import argparse
import io
import math
import os
from collections import deque

import numpy as np
from tqdm import tqdm

from alexnet_lib.batch_files import IMAGE_SHAPE, BatchFileError, batch_rows, read_rows
from alexnet_lib.imagenet import (
    BATCH_SIZE,
    TOY_IMAGES,
    PrepError,
    add_paths_argument,
    available_cores,
    list_train_images,
    list_val_images,
    load_paths,
    read_skipped,
    remove_records,
    require_dir,
    run_main,
    save_npy,
    save_train_order,
    shuffled_train_file,
    skipped_report_file,
    train_order,
    write_file_atomic,
    write_record,
    write_skipped,
    write_text_atomic,
)
from alexnet_lib.images import ImageDecodeError, load_image_256
from alexnet_lib.provenance import (
    BATCH_IMAGES,
    RECORD_NAME,
    batch_fingerprints,
    batch_images_text,
    fingerprint,
    make_record,
    read_batch_images,
    read_record,
    record_path,
)
from alexnet_lib.task_processes import ProcessDied, TaskProcesses


def n_batches_text(n):
    return f"{n} batch" if n == 1 else f"{n} batches"


def batch_path(folder, k):
    return os.path.join(folder, f'{k:04d}.hkl')


def existing_batches(folder):
    """{index: path} of the complete batch files NNNN.hkl in ``folder``."""
    out = {}
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        if ext == '.hkl' and stem.isdigit():
            out[int(stem)] = os.path.join(folder, name)
    return out


def remove_leftover_tmp_files(folder, quiet=False):
    """Half-written batches of an interrupted run (write_batch_file's NNNN.hkl.tmpPID files)."""
    leftovers = [n for n in os.listdir(folder) if '.hkl.tmp' in n]
    for name in leftovers:
        os.unlink(os.path.join(folder, name))
    if leftovers and not quiet:
        print(f"  removed {len(leftovers)} half-written file(s) of an interrupted run")


def write_batch_file(path, images):
    """One batch file, atomically (the file exists only when complete), as hickle writes it.

    HDF5 builds the file in memory and a plain write puts it on the disk, so that a full disk
    or a file-size limit is a PrepError naming the file. (When HDF5 itself meets a failed
    write, its flush and close fail again with RuntimeErrors, it prints more of them as its
    objects are freed and it may crash at exit.)"""
    import h5py
    import hickle
    images = np.ascontiguousarray(images, dtype=np.uint8)
    assert images.ndim == 4 and images.shape[1:] == IMAGE_SHAPE, images.shape
    memory = io.BytesIO()
    with h5py.File(memory, 'w') as h5:
        hickle.dump(images, h5)
    with memory.getbuffer() as data:
        write_file_atomic(path, data, 'batch file')


# ---------------------------------------------------------------- work of the decoding processes

def batch_sum(images):
    """The pixel-wise sum of a batch, exact: uint32 holds 256 * 255 with room to spare (and
    is twice as fast as float64); the main process adds the batches up in float64."""
    return images.sum(axis=0, dtype=np.uint32)


def run_task(task):
    """('make', k, out_path, image_paths, want_sum, skip_bad): decode and write batch k.
    ('read', k, out_path, n_rows): a complete batch k, read back for the mean.
    Returns ('ok', k, n_images, the sum over the images or None),
    ('bad', k, [(index in batch, message), ...]) without writing, or ('io_error', k, message)."""
    kind, k, out_path = task[:3]
    if kind == 'read':
        n_rows = task[3]
        try:
            images = read_rows(out_path, 0, n_rows)
        except BatchFileError as e:
            return 'io_error', k, str(e)
        return 'ok', k, n_rows, batch_sum(images)

    image_paths, want_sum, skip_bad = task[3:]
    images = np.empty((len(image_paths), 256, 256, 3), np.uint8)
    bad = []
    for i, path in enumerate(image_paths):
        try:
            images[i] = load_image_256(path)
        except ImageDecodeError as e:
            bad.append((i, str(e)))
            if not skip_bad:
                break
    if bad:
        return 'bad', k, bad
    try:
        write_batch_file(out_path, images)
    except PrepError as e:
        return 'io_error', k, str(e)
    return 'ok', k, len(image_paths), batch_sum(images) if want_sum else None


# ---------------------------------------------------------------- one split

class BatchSums:
    """The exact sum of the images of the finished training batches, for the mean image, in
    little memory: a batch's sum is added to the float64 total once every batch before it is
    finished too; until then it is held apart, since --skip-bad may still discard it."""

    def __init__(self):
        self.total = np.zeros((256, 256, 3), np.float64)
        self.n_images = 0
        self.n_batches = 0  # batches 0 .. n_batches-1 are in the total
        self.held = {}

    def add(self, k, n, batch_total):
        self.held[k] = (n, batch_total)
        while self.n_batches in self.held:
            n, batch_total = self.held.pop(self.n_batches)
            self.total += batch_total
            self.n_images += n
            self.n_batches += 1

    def discard_after(self, k):
        """Forget the batches after k (they will be made again)."""
        assert self.n_batches <= k, "a batch in the total cannot change"
        self.held = {j: v for j, v in self.held.items() if j <= k}

    def mean(self):
        """float32 (3, 256, 256), channel first as the original's img_mean.npy."""
        assert not self.held
        return (self.total / self.n_images).transpose(2, 0, 1).astype(np.float32)



def run_tasks(decoders, tasks, name, done, sums, skip_bad):
    """Run ``tasks`` in the decoding processes, keeping every one busy. Fills ``done``
    {k: n_images} and, for training batches, ``sums``.
    Returns the 'bad' results: without skip_bad the first one at once (other tasks may still
    be running: the caller stops the decoders); with skip_bad no further task starts after the
    first one (the running ones finish), since the batches after a left-out image change."""
    pending = deque(tasks)
    bad = []
    to_make = {t[1] for t in tasks if t[0] == 'make'}
    total = sum(len(t[3]) for t in tasks if t[0] == 'make')
    with tqdm(total=total, unit='img', desc=f'  {name}', smoothing=0.05, mininterval=0.5,
              dynamic_ncols=True, disable=total == 0) as bar:
        while True:
            while pending and decoders.idle() and not bad:
                decoders.submit(pending.popleft())
            if not decoders.busy():
                break
            try:
                result = decoders.result()
            except ProcessDied as e:
                raise PrepError(f"a decoding process (pid {e.pid}) died ({e.how}) with "
                                f"{e.task[2]} to {e.task[0]}: out of memory? (--workers N runs "
                                f"fewer); run the same command again to continue") from None
            status, k = result[:2]
            if status == 'io_error':
                raise PrepError(result[2])
            if status == 'bad':
                bad.append(result)
                if not skip_bad:
                    break
                continue
            n, batch_total = result[2:]
            done[k] = n
            if batch_total is not None:
                sums.add(k, n, batch_total)
            if k in to_make:
                bar.update(n)
    return bad


def plan_batches(name, files, skipped, out_dir, drop_last):
    """(the images of the batches in their order, the number of batches) of one split, less
    the ``skipped`` images. A PrepError when there is not one batch, or when ``out_dir`` holds
    batch files beyond them (a larger run's)."""
    plan = [f for f in files if f not in skipped]
    n_batches = len(plan) // BATCH_SIZE if drop_last else math.ceil(len(plan) / BATCH_SIZE)
    if n_batches == 0:
        raise PrepError(f"{name}: {len(plan)} images are fewer than one batch of {BATCH_SIZE}")
    existing = existing_batches(out_dir) if os.path.isdir(out_dir) else {}
    extra = sorted(k for k in existing if k >= n_batches)
    if extra:
        raise PrepError(f"{out_dir} holds {os.path.basename(existing[extra[0]])}, beyond the "
                        f"{n_batches} batches this run makes (left from a larger run?): "
                        f"delete the folder or choose another tar_root_dir")
    return plan, n_batches


def batches_made_from(name, plan, n_batches, out_dir):
    """The fingerprints of the images the batch files in ``out_dir`` were cut from
    (batch_images.json), to keep a batch only when it holds the images this run puts in it.
    Batches of an output made before that file existed are taken as this run's when the
    output's record (preprocessing.json) describes this run's images; other batches without
    it are a PrepError: what they hold cannot be known."""
    made_from = read_batch_images(out_dir) if os.path.isdir(out_dir) else []
    if made_from is None:
        if not existing_batches(out_dir):
            return []
        record = read_record(out_dir)
        sha1 = 'train_order_sha1' if name == 'train' else 'val_list_sha1'
        if (record is None or record[f'{name}_images'] != len(plan)
                or record[f'{name}_batches'] != n_batches or record[sha1] != fingerprint(plan)):
            raise PrepError(f"{out_dir} holds batch files but no {BATCH_IMAGES}, the record of "
                            f"the images they hold (an older or unfinished make_hkl.py made "
                            f"them, or they were copied in): delete them and run again")
        made_from = batch_fingerprints(plan, n_batches, BATCH_SIZE)
    return made_from


def make_split(decoders, name, files, src_dir, out_dir, report_file, drop_last, sums, skip_bad,
               made_from):
    """Write the batches of one split; return ({batch index: n_images}, the images the batches
    were cut from, in their order: those of a dropped last partial batch included). With a
    BatchSums ``sums``, add the sum of every batch's images to it (complete batches are read
    back). A batch file is kept only when ``made_from`` (batches_made_from) says it holds the
    images this run puts in it."""
    os.makedirs(out_dir, exist_ok=True)
    remove_leftover_tmp_files(out_dir)
    skipped = read_skipped(report_file)
    if skipped:
        print(f"  leaving out {len(skipped)} image(s) listed in {report_file}")
    done = {}
    while True:
        plan, n_batches = plan_batches(name, files, skipped, out_dir, drop_last)
        fingerprints = batch_fingerprints(plan, n_batches, BATCH_SIZE)
        existing = existing_batches(out_dir)
        stale = sorted(k for k in existing
                       if k >= len(made_from) or made_from[k] != fingerprints[k])
        if stale:
            print(f"  {n_batches_text(len(stale))} in {out_dir} were cut from other images "
                  f"(another training order, or other images left out): making them again")
        for k in stale:
            os.unlink(existing.pop(k))
        # what the batches hold is on the disk before any batch is made
        write_text_atomic(record_path(out_dir, BATCH_IMAGES), batch_images_text(fingerprints))
        made_from = fingerprints
        tasks = []
        for k in range(n_batches):
            if k in done:
                continue
            rows = plan[k * BATCH_SIZE:(k + 1) * BATCH_SIZE]
            path = batch_path(out_dir, k)
            if k in existing:
                try:
                    n_rows = batch_rows(path)
                except BatchFileError:
                    n_rows = None
                if n_rows == len(rows):
                    if sums is not None:  # read back for the mean
                        tasks.append(('read', k, path, n_rows))
                    else:
                        done[k] = n_rows
                    continue
                problem = 'cannot be read' if n_rows is None else f'holds {n_rows} images'
                print(f"  {path} {problem}, not {len(rows)} images: making it again")
                os.unlink(path)
            tasks.append(('make', k, path, [os.path.join(src_dir, f) for f in rows],
                          sums is not None, skip_bad))
        n_make = sum(t[0] == 'make' for t in tasks)
        print(f"{name}: {len(plan)} images -> {n_batches_text(n_batches)} in {out_dir} "
              f"({n_batches - n_make} complete, {n_make} to make)")
        try:
            bad_results = run_tasks(decoders, tasks, name, done, sums, skip_bad)
        except BaseException:
            # a failed write or Ctrl-C: stop the other writers and take away their
            # half-written files (the complete batches stay)
            decoders.stop()
            remove_leftover_tmp_files(out_dir, quiet=True)
            raise
        if not bad_results:
            return done, plan
        newly_bad = {}
        for _, k, items in bad_results:
            for i, message in items:
                newly_bad[plan[k * BATCH_SIZE + i]] = message
        if not skip_bad:
            decoders.stop()  # the batches still being made are not wanted
            remove_leftover_tmp_files(out_dir, quiet=True)
            # deleting the file is no way out: the validation ground truth goes by position,
            # and the training order must list every training image
            message = next(iter(newly_bad.values()))
            raise PrepError(f"{message} -- replace the file with a readable image of the same "
                            f"name, or run with --skip-bad to leave such images out (listed in "
                            f"{report_file})")
        # The batches after the first left-out image now hold other images: delete them first,
        # then record the images, so that an interruption never leaves a batch made under the
        # old list next to a report that already leaves the images out.
        first = min(k for _, k, _ in bad_results)
        for k, path in existing_batches(out_dir).items():
            if k > first:
                os.unlink(path)
        done = {k: n for k, n in done.items() if k < first}
        if sums is not None:
            sums.discard_after(first)
        for file, message in sorted(newly_bad.items()):
            print(f"  leaving out {file}: {message}")
        skipped.update(newly_bad)
        write_skipped(report_file, skipped, name)


# ---------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('mode', nargs='?', default='full', choices=['full', 'toy'],
                        help=f"full (default) or toy: only the first {TOY_IMAGES} train and "
                             f"{TOY_IMAGES} validation images")
    add_paths_argument(parser)
    parser.add_argument('--workers', type=int, default=available_cores(),
                        help='decoding processes (default: every core, %(default)s here)')
    parser.add_argument('--skip-bad', action='store_true',
                        help='leave out images that cannot be decoded and list them in '
                             'misc_dir/skipped_{train,val}_images.txt, instead of stopping')
    args = parser.parse_args()
    if args.workers < 1:
        parser.error('--workers must be at least 1')

    paths = load_paths(args.paths)
    train_dir = require_dir(paths, 'train_img_dir')
    val_dir = require_dir(paths, 'val_img_dir')
    print(f"make_hkl.py {args.mode}: paths from {paths['paths_file']}, {args.workers} worker(s)")

    # everything that can be refused is refused before anything changes
    order, new_order = train_order(paths, list_train_images(train_dir))
    train_files, val_files = order, list_val_images(val_dir)
    if args.mode == 'toy':
        train_files, val_files = train_files[:TOY_IMAGES], val_files[:TOY_IMAGES]
    train_out, val_out, misc_dir = paths['train_batch_dir'], paths['val_batch_dir'], \
        paths['misc_dir']
    splits = (('train', train_files, train_out, True), ('val', val_files, val_out, False))
    made_from = {}
    for name, files, out_dir, drop_last in splits:
        plan, n_batches = plan_batches(name, files, read_skipped(skipped_report_file(paths, name)),
                                       out_dir, drop_last)
        made_from[name] = batches_made_from(name, plan, n_batches, out_dir)

    # from here on the outputs change: their record goes first, and comes back at the end
    remove_records(train_out, val_out, misc_dir)
    order_file = shuffled_train_file(paths)
    if new_order:
        save_train_order(paths, order)
        print(f"training order: {len(order)} images shuffled with seed 1, saved to {order_file}")
    else:
        print(f"training order: reusing {order_file}")

    with TaskProcesses(args.workers, run_task) as decoders:
        sums = BatchSums()
        _, train_plan = make_split(decoders, 'train', train_files, train_dir, train_out,
                                   skipped_report_file(paths, 'train'), drop_last=True,
                                   sums=sums, skip_bad=args.skip_bad,
                                   made_from=made_from['train'])
        mean_file = os.path.join(misc_dir, 'img_mean.npy')
        save_npy(mean_file, sums.mean())
        print(f"train: {n_batches_text(sums.n_batches)}; mean of their {sums.n_images} images -> "
              f"{mean_file}")

        done, val_plan = make_split(decoders, 'val', val_files, val_dir, val_out,
                                    skipped_report_file(paths, 'val'), drop_last=False,
                                    sums=None, skip_bad=args.skip_bad,
                                    made_from=made_from['val'])
        print(f"val: {n_batches_text(len(done))}, {sum(done.values())} images")

    record = make_record(train_plan, sums.n_batches, val_plan, len(done), BATCH_SIZE)
    for folder in (train_out, val_out, misc_dir):
        write_record(folder, record)
    print(f"record of this output ({record['train_images']} training images in the order the "
          f"batches were cut from, {record['val_images']} validation images) -> {RECORD_NAME} "
          f"in both batch folders and {misc_dir}")


if __name__ == '__main__':
    run_main(main)
