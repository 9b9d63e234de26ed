"""What the ImageNet preprocessing scripts (preprocessing/) share: paths.yaml, file lists,
reports, errors (the devkit's synsets file: devkit.py).

    from alexnet_lib.imagenet import load_paths, default_paths_file
    paths = load_paths(default_paths_file())
    paths['train_batch_dir']     # .../data/toy/train_hkl_b256_b_256

Every script turns a PrepError into one line ``error: ...`` on stderr and exit status 1
(``run_main``); anything else is a bug and keeps its traceback. Every file preprocessing writes
goes through the writers here (write_file_atomic, save_npy, write_text_atomic, write_record;
make_hkl.py's batches too), so that a full disk or a file-size limit is one line naming it.
"""
import errno
import io
import os
import signal
import sys

import numpy as np
import yaml

from alexnet_lib import errors, provenance
from alexnet_lib.errors import UserError
from alexnet_lib.files import atomic_write
from alexnet_lib.images import IMAGE_SUFFIXES, is_image_name  # noqa: F401 (shared from here too)

PREPROCESSING = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))),
                             'preprocessing')    # the scripts and their paths.yaml
BATCH_SIZE = 256
BATCH_SUFFIX = f'_b{BATCH_SIZE}_b_{BATCH_SIZE}'  # the original's name for one set of full batches
TOY_IMAGES = 2560  # `make_hkl.py toy`: the first 2560 train and 2560 validation images

PATH_KEYS = ('train_img_dir', 'val_img_dir', 'tar_root_dir', 'tar_train_dir', 'tar_val_dir',
             'misc_dir', 'meta_clsloc_mat', 'val_label_file', 'valtxt_filename',
             'traintxt_filename')
SHUFFLED_TRAIN_FILE = 'shuffled_train_filenames.npy'
SHUFFLE_SEED = 1


def available_cores():
    """The cores this process may run on (a job's share of a node, not the node's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


class PrepError(UserError):
    """An expected problem (bad paths.yaml, missing folder, devkit mismatch, unreadable image).
    The message is one line that names the thing at fault."""


def run_main(main):
    """Run ``main()``: a PrepError is one line ``error: ...`` and exit status 1, Ctrl-C 130.
    A write over a file-size limit (ulimit -f) fails with EFBIG, like a full disk, instead of
    killing the process with SIGXFSZ (the decoding processes inherit this). SIGTERM (kill, a
    batch system's time limit) is a Ctrl-C: the decoding processes are stopped with it."""
    if hasattr(signal, 'SIGXFSZ'):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _interrupt)
    errors.run_main(main, interrupted="interrupted: complete batch files are kept; run the "
                                      "same command again to continue")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def notice(text):
    print(f"notice: {text}", file=sys.stderr)


def plural(n, word, words=None):
    """'1 file', '2 files'."""
    return f"{n} {word}" if n == 1 else f"{n} {words or word + 's'}"


# ---------------------------------------------------------------- writing files

# why a write fails, and what to do, for the causes a user can fix
_WRITE_CAUSES = {
    errno.ENOSPC: ("the disk is full", "free some space (or set another tar_root_dir / misc_dir)"),
    errno.EFBIG: ("over the file-size limit (ulimit -f)", "raise the limit (ulimit -f unlimited)"),
    errno.EDQUOT: ("the disk quota is used up", "free some space within the quota"),
}


def write_failure(path, e, what='file'):
    """The PrepError of an OSError ``e`` while writing ``path``: one line naming the file, the
    cause (a full disk, a file-size limit, ...) and what to do. The file itself is not kept:
    every write here goes to a temporary file that is renamed only when complete."""
    reason = e.strerror or str(e) or type(e).__name__
    cause = _WRITE_CAUSES.get(e.errno)
    if cause is None:
        return PrepError(f"cannot write {what} {path}: {reason}")
    return PrepError(f"cannot write {what} {path} ({reason}): {cause[0]}; {cause[1]} and run "
                     f"the same command again: complete files are kept")


def write_file_atomic(path, data, what='file'):
    """``data`` (bytes or a buffer) as the file ``path``, atomically, with plain writes: a
    failure is an OSError with its errno (numpy's own writes lose it), turned into a PrepError
    naming the file (write_failure)."""
    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(data)
    try:
        atomic_write(path, write)
    except OSError as e:
        raise write_failure(path, e, what) from None


def save_npy(path, array):
    """np.save, atomically, without pickles; a failed write is a PrepError naming the file."""
    memory = io.BytesIO()
    np.save(memory, np.asarray(array), allow_pickle=False)
    with memory.getbuffer() as data:
        write_file_atomic(path, data)


def write_text_atomic(path, text):
    write_file_atomic(path, text.encode())


def write_record(folder, record):
    """provenance.write_record; a failed write is a PrepError naming the file."""
    try:
        provenance.write_record(folder, record)
    except OSError as e:
        raise write_failure(provenance.record_path(folder), e) from None


def remove_records(*folders):
    """Before preprocessing changes these folders: a record must never describe a
    half-rewritten output."""
    for folder in folders:
        try:
            provenance.remove_record(folder)
        except OSError as e:
            raise PrepError(f"cannot remove {provenance.record_path(folder)}: "
                            f"{e.strerror or e}") from None


# ---------------------------------------------------------------- paths.yaml

def default_paths_file():
    return os.path.join(PREPROCESSING, 'paths.yaml')


def add_paths_argument(parser):
    parser.add_argument('--paths', default=default_paths_file(), metavar='FILE',
                        help='paths file (default: paths.yaml beside this script); relative '
                             'paths in it are relative to its own folder')


def load_paths(paths_file):
    """The paths of ``paths_file`` as absolute paths, plus the derived output locations
    ``train_batch_dir``, ``val_batch_dir``, ``labels_dir`` and ``paths_file``.

    Relative paths resolve against the folder of the yaml file; ``tar_train_dir`` and
    ``tar_val_dir`` resolve against ``tar_root_dir`` (an absolute path is kept as it is)."""
    paths_file = os.path.abspath(paths_file)
    if not os.path.isfile(paths_file):
        raise PrepError(f"paths file {paths_file} does not exist")
    try:
        with open(paths_file) as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise PrepError(f"cannot read paths file {paths_file}: "
                        f"{' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise PrepError(f"paths file {paths_file} is not a mapping of keys to paths")
    for key in PATH_KEYS:
        if key not in raw:
            raise PrepError(f"paths file {paths_file} has no key '{key}'")
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise PrepError(f"paths file {paths_file}: key '{key}' must be a non-empty path")

    base = os.path.dirname(paths_file)

    def resolve(value, against):
        return os.path.normpath(os.path.join(against, os.path.expanduser(value.strip())))

    paths = {key: resolve(raw[key], base) for key in PATH_KEYS}
    for key in ('tar_train_dir', 'tar_val_dir'):
        paths[key] = resolve(raw[key], paths['tar_root_dir'])
    paths['train_batch_dir'] = paths['tar_train_dir'] + BATCH_SUFFIX
    paths['val_batch_dir'] = paths['tar_val_dir'] + BATCH_SUFFIX
    if os.path.realpath(paths['train_batch_dir']) == os.path.realpath(paths['val_batch_dir']):
        raise PrepError(f"paths file {paths_file}: tar_train_dir and tar_val_dir give the same "
                        f"batch folder {paths['train_batch_dir']}; the training and validation "
                        f"batches need folders of their own: give tar_val_dir another name")
    paths['labels_dir'] = os.path.join(paths['tar_root_dir'], 'labels')
    paths['paths_file'] = paths_file
    return paths


def require_dir(paths, key):
    """The folder named by ``paths[key]``; a PrepError naming key and folder if it is absent."""
    if not os.path.isdir(paths[key]):
        raise PrepError(f"{key} folder {paths[key]} does not exist "
                        f"(set in {paths['paths_file']})")
    return paths[key]


def require_file(paths, key, hint=''):
    if not os.path.isfile(paths[key]):
        raise PrepError(f"{key} file {paths[key]} does not exist "
                        f"(set in {paths['paths_file']}){hint}")
    return paths[key]


# ---------------------------------------------------------------- file lists

def _scan(folder):
    """(image file names, sub-folder names, other names) of ``folder``, each sorted. Images are
    told by their names (IMAGE_SUFFIXES, in any case); os.scandir knows the folders without a
    stat per file on most file systems."""
    images, folders, others = [], [], []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir():
                    folders.append(entry.name)
                elif is_image_name(entry.name):
                    images.append(entry.name)
                else:
                    others.append(entry.name)
    except OSError as e:
        raise PrepError(f"cannot read folder {folder}: {e.strerror or e}") from None
    return sorted(images), sorted(folders), sorted(others)


def _notice_not_images(key, folder, names):
    """One line for the files of ``folder`` that are left out because they are not images."""
    suffixes = ', '.join(('.jpeg', '.jpg', '.png', '.bmp', '.webp'))
    notice(f"{key} {folder}: {plural(len(names), 'file')} not named as an image ({suffixes}, "
           f"... in any case) {'is' if len(names) == 1 else 'are'} left out, e.g. {names[0]}")


def _more(items, what):
    return f" ({len(items)} {what} in all)" if len(items) > 1 else ''


def list_class_folders(train_img_dir):
    """Sorted names of the class folders (WNIDs) of the training tree."""
    folders = _scan(train_img_dir)[1]
    if not folders:
        raise PrepError(f"train_img_dir {train_img_dir} holds no class folders "
                        f"(expected n01440764/, n01443537/, ...)")
    return folders


def list_train_images(train_img_dir):
    """All training images as sorted 'wnid/name' paths relative to train_img_dir.

    A class folder holds its images only, as ImageNet's do: a folder inside one is a PrepError
    naming it (its images would otherwise be lost without a word). Files that are not images by
    their names (not IMAGE_SUFFIXES), in the class folders or beside them, are left out with one
    notice line that counts them and names one."""
    _, wnids, others = _scan(train_img_dir)
    if not wnids:
        raise PrepError(f"train_img_dir {train_img_dir} holds no class folders "
                        f"(expected n01440764/, n01443537/, ...)")
    files, nested = [], []
    for wnid in wnids:
        images, folders, other = _scan(os.path.join(train_img_dir, wnid))
        files += [f'{wnid}/{name}' for name in images]
        nested += [f'{wnid}/{name}/' for name in folders]
        others += [f'{wnid}/{name}' for name in other]
    if nested:
        wnid = nested[0].split('/')[0]
        raise PrepError(f"train_img_dir {train_img_dir}: the class folder {wnid}/ holds a folder, "
                        f"{nested[0]}{_more(nested, 'such folders')}; a class folder holds only "
                        f"its images ({wnid}/{wnid}_10026.JPEG, ...) and folders in it are not "
                        f"read: move their images up into the class folder, or remove them")
    if not files:
        raise PrepError(f"train_img_dir {train_img_dir}: its class folders hold no images")
    if others:
        _notice_not_images('train_img_dir', train_img_dir, others)
    return sorted(files)


def list_val_images(val_img_dir):
    """The validation image names, sorted (ILSVRC2012_val_00000001.JPEG, ...). They lie directly
    in val_img_dir: a folder in it is a PrepError naming it; files that are not images by their
    names are left out with one notice line."""
    names, folders, others = _scan(val_img_dir)
    if folders:
        raise PrepError(f"val_img_dir {val_img_dir} holds a folder, {folders[0]}/"
                        f"{_more(folders, 'folders')}: the validation images must lie directly "
                        f"in it, as ILSVRC2012_img_val.tar unpacks (ILSVRC2012_val_00000001.JPEG, "
                        f"...), not in class folders or other folders: move them out, or point "
                        f"val_img_dir at the flat folder")
    if not names:
        raise PrepError(f"val_img_dir {val_img_dir} holds no images")
    if others:
        _notice_not_images('val_img_dir', val_img_dir, others)
    return names


def shuffled_train_file(paths):
    return os.path.join(paths['misc_dir'], SHUFFLED_TRAIN_FILE)


def load_shuffled_train_list(paths):
    """misc/shuffled_train_filenames.npy as a list of 'wnid/name' strings. The original's
    preprocessing saved full paths ('{train_img_dir}/wnid/name'): they are taken as their last
    two parts, the same order."""
    path = shuffled_train_file(paths)
    if not os.path.isfile(path):
        raise PrepError(f"{path} does not exist: run make_hkl.py first")
    try:
        names = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise PrepError(f"cannot read {path}: {e}; delete it to make a new one") from None
    if names.ndim != 1 or names.dtype.kind != 'U':
        raise PrepError(f"{path} is not a 1-D array of file names; delete it to make a new one")
    return [name if name.count('/') == 1 else '/'.join(name.rsplit('/', 2)[-2:])
            for name in names.tolist()]


def train_order(paths, files):
    """(training order, whether it is new): the order saved in misc_dir, checked against
    ``files`` (the sorted training images), or a new one: sorted, shuffled once with seed 1 (as
    the original: np.random.seed(1); np.random.shuffle). Writes nothing (save_train_order
    does). A saved order that does not match the training tree is an error, not reused."""
    path = shuffled_train_file(paths)
    if os.path.exists(path):
        shuffled = load_shuffled_train_list(paths)
        if sorted(shuffled) != files:
            missing = sorted(set(files) - set(shuffled))[:1]
            extra = sorted(set(shuffled) - set(files))[:1]
            example = (f"it lacks {missing[0]}" if missing else
                       f"{extra[0]} is not in the tree" if extra else "it repeats a file")
            raise PrepError(f"{path} is not an order of the images of train_img_dir "
                            f"{paths['train_img_dir']} ({len(shuffled)} listed, {len(files)} "
                            f"there; {example}): put the images back, or delete it to start "
                            f"over with a new order (every batch is made again)")
        return shuffled, False
    order = np.asarray(files)
    np.random.RandomState(SHUFFLE_SEED).shuffle(order)
    return order.tolist(), True


def save_train_order(paths, order):
    save_npy(shuffled_train_file(paths), np.asarray(order))


# ---------------------------------------------------------------- skipped-image reports

def skipped_report_file(paths, split):
    """Where `make_hkl.py --skip-bad` lists the images of ``split`` ('train'/'val') it left out."""
    return os.path.join(paths['misc_dir'], f'skipped_{split}_images.txt')


def read_skipped(report_file):
    """{relative path: reason} of a skipped-images report; {} when there is none."""
    if not os.path.exists(report_file):
        return {}
    skipped = {}
    with open(report_file) as f:
        for line in f:
            line = line.rstrip('\n')
            if line and not line.startswith('#'):
                name, _, reason = line.partition('\t')
                skipped[name] = reason
    return skipped


def write_skipped(report_file, skipped, split):
    lines = [f"# {split} images left out by make_hkl.py --skip-bad (they could not be decoded).\n",
             "# Batches and label files leave them out; make_hkl.py keeps leaving them out while\n",
             "# this file exists. To retry them: delete this file and the batch folder.\n"]
    lines += [f"{name}\t{' '.join(reason.split())}\n" for name, reason in sorted(skipped.items())]
    write_text_atomic(report_file, ''.join(lines))
