"""What the ImageNet preprocessing scripts (preprocessing/) share: paths.yaml, file lists, the
devkit, reports, errors.

    from alexnet_lib.imagenet import load_paths, default_paths_file
    paths = load_paths(default_paths_file())
    paths['train_batch_dir']     # .../data/toy/train_hkl_b256_b_256

Every script turns a PrepError into one line ``error: ...`` on stderr and exit status 1
(``run_main``); anything else is a bug and keeps its traceback.
"""
import os

import numpy as np
import yaml

from alexnet_lib import errors
from alexnet_lib.errors import UserError
from alexnet_lib.files import atomic_write, save_npy

PREPROCESSING = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             'preprocessing')    # the scripts and their paths.yaml
BATCH_SIZE = 256
BATCH_SUFFIX = f'_b{BATCH_SIZE}_b_{BATCH_SIZE}'  # the original's name for one set of full batches
TOY_IMAGES = 2560  # `make_hkl.py toy`: the first 2560 train and 2560 validation images

PATH_KEYS = ('train_img_dir', 'val_img_dir', 'tar_root_dir', 'tar_train_dir', 'tar_val_dir',
             'misc_dir', 'meta_clsloc_mat', 'val_label_file', 'valtxt_filename',
             'traintxt_filename')
IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.png')  # compared in lower case; ImageNet uses .JPEG
SHUFFLED_TRAIN_FILE = 'shuffled_train_filenames.npy'
SHUFFLE_SEED = 1


def available_cores():
    """The cores this process may run on (a job's share of a node, not the node's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


class PrepError(UserError):
    """An expected problem (bad paths.yaml, missing folder, devkit mismatch, unreadable image).
    The message is one line that names the thing at fault."""


def run_main(main):
    """Run ``main()``: a PrepError is one line ``error: ...`` and exit status 1, Ctrl-C 130."""
    errors.run_main(main, interrupted="interrupted: complete batch files are kept; run the "
                                      "same command again to continue")


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

def is_image_name(name):
    return not name.startswith('.') and name.lower().endswith(IMAGE_SUFFIXES)


def list_class_folders(train_img_dir):
    """Sorted names of the class folders (WNIDs) of the training tree."""
    folders = sorted(name for name in os.listdir(train_img_dir)
                     if os.path.isdir(os.path.join(train_img_dir, name)))
    if not folders:
        raise PrepError(f"train_img_dir {train_img_dir} holds no class folders "
                        f"(expected n01440764/, n01443537/, ...)")
    return folders


def list_train_images(train_img_dir):
    """All training images as sorted 'wnid/name' paths relative to train_img_dir."""
    files = []
    for wnid in list_class_folders(train_img_dir):
        folder = os.path.join(train_img_dir, wnid)
        files += [f'{wnid}/{name}' for name in os.listdir(folder) if is_image_name(name)]
    if not files:
        raise PrepError(f"train_img_dir {train_img_dir}: its class folders hold no images")
    return sorted(files)


def list_val_images(val_img_dir):
    """The validation image names, sorted (ILSVRC2012_val_00000001.JPEG, ...)."""
    names = sorted(name for name in os.listdir(val_img_dir)
                   if is_image_name(name) and os.path.isfile(os.path.join(val_img_dir, name)))
    if not names:
        hint = ''
        if any(os.path.isdir(os.path.join(val_img_dir, n)) for n in os.listdir(val_img_dir)):
            hint = ' (it holds folders: validation images must lie directly in it, not in ' \
                   'class folders)'
        raise PrepError(f"val_img_dir {val_img_dir} holds no images{hint}")
    return names


def shuffled_train_file(paths):
    return os.path.join(paths['misc_dir'], SHUFFLED_TRAIN_FILE)


def load_shuffled_train_list(paths):
    """misc/shuffled_train_filenames.npy as a list of 'wnid/name' strings."""
    path = shuffled_train_file(paths)
    if not os.path.isfile(path):
        raise PrepError(f"{path} does not exist: run make_hkl.py first")
    try:
        names = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise PrepError(f"cannot read {path}: {e}; delete it to make a new one") from None
    if names.ndim != 1 or names.dtype.kind != 'U':
        raise PrepError(f"{path} is not a 1-D array of file names; delete it to make a new one")
    return names.tolist()


def get_shuffled_train_list(paths):
    """The training images in training order: sorted, shuffled once with seed 1 (as the
    original: np.random.seed(1); np.random.shuffle), saved to misc_dir and reused from there.
    A saved list that does not match the training tree is an error, not silently reused."""
    train_dir = require_dir(paths, 'train_img_dir')
    files = list_train_images(train_dir)
    path = shuffled_train_file(paths)
    if os.path.exists(path):
        shuffled = load_shuffled_train_list(paths)
        if sorted(shuffled) != files:
            missing = sorted(set(files) - set(shuffled))[:1]
            extra = sorted(set(shuffled) - set(files))[:1]
            example = (f"it lacks {missing[0]}" if missing else
                       f"{extra[0]} is not in the tree" if extra else "it repeats a file")
            raise PrepError(f"{path} lists {len(shuffled)} images but train_img_dir {train_dir} "
                            f"holds {len(files)} ({example}): delete it and the batch folders "
                            f"to start over")
        print(f"training order: reusing {path}")
        return shuffled
    order = np.asarray(files)
    np.random.RandomState(SHUFFLE_SEED).shuffle(order)
    save_npy(path, order)
    print(f"training order: {len(files)} images shuffled with seed {SHUFFLE_SEED}, saved to {path}")
    return order.tolist()


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


# ---------------------------------------------------------------- devkit

# the id field of each devkit's synsets; a struct with neither is read by position (id first,
# WNID second), as the original read it
DEVKIT_ID_FIELDS = ('ILSVRC2014_ID', 'ILSVRC2012_ID')
DEVKIT_EXPECTED = ("expected ILSVRC2014_ID, WNID, words, ... (ILSVRC2014_devkit/data/"
                   "meta_clsloc.mat) or ILSVRC2012_ID, WNID, words, ... (ILSVRC2012_devkit_t12/"
                   "data/meta.mat): point meta_clsloc_mat at one of those")


def _mat_int(value):
    """A struct field's integer, or None. loadmat(squeeze_me=True) gives an int, a numpy
    scalar of any integer type, a float (MATLAB double) or a 1-element array."""
    value = np.asarray(value)
    if value.size != 1 or value.dtype.kind not in 'iuf':
        return None
    number = value.item()
    if isinstance(number, float) and not number.is_integer():
        return None
    return int(number)


def _mat_text(value):
    """A struct field's string ('' for MATLAB's empty char array), or None."""
    if isinstance(value, str):  # numpy str too
        return value
    value = np.asarray(value)
    if value.dtype.kind == 'U' and value.size <= 1:
        return str(value.item()) if value.size else ''
    return None


def read_devkit_synsets(meta_file):
    """{wnid: (id, words)} of the classes of a devkit's synsets file: meta_clsloc.mat of the
    ILSVRC2014 devkit (id field ILSVRC2014_ID) or meta.mat of ILSVRC2012_devkit_t12
    (ILSVRC2012_ID). Both hold 1,860 synsets: the 1,000 classes (num_children 0, ids 1..1000,
    the same classes in both) and 860 internal nodes of the WordNet tree above them (ids
    1001..1860), which are not classes and are left out. The ids are not in WNID order.
    A file that is neither is a PrepError naming the fields it has and those expected."""
    import scipy.io
    try:
        mat = scipy.io.loadmat(meta_file, squeeze_me=True)
    except Exception as e:  # scipy raises ValueError, MatReadError, OSError, ... for a bad file
        raise PrepError(f"cannot read devkit file {meta_file}: {' '.join(str(e).split())}; "
                        f"unpack it again from the devkit, or point meta_clsloc_mat at "
                        f"ILSVRC2014_devkit/data/meta_clsloc.mat or "
                        f"ILSVRC2012_devkit_t12/data/meta.mat") from None
    if 'synsets' not in mat:
        found = ', '.join(k for k in mat if not k.startswith('__')) or 'nothing'
        raise PrepError(f"devkit file {meta_file} has no 'synsets' struct (it holds {found}); "
                        f"{DEVKIT_EXPECTED}")
    synsets = np.atleast_1d(mat['synsets']).ravel()  # squeeze_me makes a 1-synset struct 0-d
    fields = synsets.dtype.names or ()
    if not fields:
        raise PrepError(f"devkit file {meta_file}: its 'synsets' is not a struct (no fields); "
                        f"{DEVKIT_EXPECTED}")

    def mismatch(why):  # the fields found, the fields expected
        return PrepError(f"devkit file {meta_file}: its 'synsets' struct has the fields "
                         f"{', '.join(fields)} ({why}); {DEVKIT_EXPECTED}")

    if len(fields) < 2:
        raise mismatch("not an id and a WNID")
    id_field = next((f for f in DEVKIT_ID_FIELDS if f in fields), fields[0])
    wnid_field = 'WNID' if 'WNID' in fields else fields[1]
    out = {}
    for number, s in enumerate(synsets, 1):
        class_id, wnid = _mat_int(s[id_field]), _mat_text(s[wnid_field])
        if class_id is None:
            raise mismatch(f"'{id_field}' of synset {number} is not an integer id")
        if wnid is None or wnid[:1] != 'n' or not wnid[1:].isdigit():
            raise mismatch(f"'{wnid_field}' of synset {number} is not a WNID like n01440764")
        if 'num_children' in fields:
            n_children = _mat_int(s['num_children'])
            if n_children is None:
                raise mismatch(f"'num_children' of synset {number} is not a number")
            if n_children > 0:
                continue  # an internal node of the WordNet tree, not a class
        words = _mat_text(s['words']) if 'words' in fields else ''
        out[wnid] = (class_id, words or '')
    return out


# ---------------------------------------------------------------- atomic writes

def write_text_atomic(path, text):
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(path, write)
