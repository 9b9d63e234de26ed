"""What preprocessing produced, recorded beside its outputs, so that a run can check that its
batch folders, labels and mean image belong together.

Preprocessing writes the same record, ``preprocessing.json``, into each folder it fills: the
training and validation batch folders and the folder of the mean image (make_hkl.py), and the
label folder (make_labels.py):

    {"format": 1, "batch_size": 256,
     "train_images": 1280, "train_batches": 5, "train_order_sha1": "9f0c...",
     "val_images": 500, "val_batches": 2, "val_list_sha1": "41d2..."}

``train_images`` counts the training images in the order the batches were cut from (those of the
dropped last partial batch included: their labels are in the label file), ``train_order_sha1``
fingerprints that order (the file names, one per line), ``val_list_sha1`` the validation images
of the validation batches in their order. Data written by the original's preprocessing has no
record; a run then checks only the sizes and says so.

    write_record(folder, make_record(train_names, n_train_batches, val_names, n_val_batches))
    record = check_together({'train_folder': ..., 'val_folder': ..., 'label_folder': ...,
                             'mean_file': os.path.dirname(mean_file)})
"""
import hashlib
import json
import os

from alexnet_lib.config import ConfigError
from alexnet_lib.files import DataError, atomic_write

RECORD_NAME = 'preprocessing.json'
FORMAT = 1
FIELDS = ('format', 'batch_size', 'train_images', 'train_batches', 'train_order_sha1',
          'val_images', 'val_batches', 'val_list_sha1')


def fingerprint(names):
    """sha1 of the names, one per line, in their order."""
    h = hashlib.sha1()
    for name in names:
        h.update(os.fsencode(name) + b'\n')
    return h.hexdigest()


def make_record(train_names, train_batches, val_names, val_batches, batch_size=256):
    """The record of one preprocessing output: the training image order its batches were cut
    from (the dropped last partial batch included), the validation images of its batches."""
    return {'format': FORMAT, 'batch_size': int(batch_size),
            'train_images': len(train_names), 'train_batches': int(train_batches),
            'train_order_sha1': fingerprint(train_names),
            'val_images': len(val_names), 'val_batches': int(val_batches),
            'val_list_sha1': fingerprint(val_names)}


TRAINED_ON = 'trained_on.json'   # a run's weights_dir: the record of the data it trains on

# A batch folder's record of the images each of its batch files holds, kept while the batches
# are being made (preprocessing.json comes only when all are complete): a batch is kept on a
# re-run only when it was cut from the images the run would put in it.
BATCH_IMAGES = 'batch_images.json'


def batch_fingerprints(names, n_batches, batch_size=256):
    """The fingerprint of each batch's image names: batch k holds names[k*B:(k+1)*B]."""
    return [fingerprint(names[k * batch_size:(k + 1) * batch_size]) for k in range(n_batches)]


def batch_images_text(fingerprints):
    return json.dumps({'format': FORMAT, 'batch_sha1': fingerprints}) + '\n'


def read_batch_images(folder):
    """The batch fingerprints (batch_fingerprints) the batch files of ``folder`` were cut
    from, or None when it has no BATCH_IMAGES; DataError when that file is malformed."""
    path = record_path(folder, BATCH_IMAGES)
    fix = "delete it and the batch files beside it, and run preprocessing again"
    record = _load_json(path, 'batch record', fix)
    if record is None:
        return None
    if not isinstance(record, dict) or record.get('format') != FORMAT or \
            not isinstance(record.get('batch_sha1'), list):
        raise DataError(f"batch record {path} is not one of this version's preprocessing: {fix}")
    return record['batch_sha1']


def _load_json(path, what, fix):
    """The JSON in ``path``, or None when there is no such file; a DataError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{what} {path} cannot be read ({e}): {fix}") from None


def record_path(folder, name=RECORD_NAME):
    return os.path.join(folder, name)


def write_record(folder, record, name=RECORD_NAME):
    """The record, atomically, into ``folder``."""
    text = json.dumps({k: record[k] for k in FIELDS}, indent=1) + '\n'

    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(record_path(folder, name), write)


def remove_record(folder):
    """Before preprocessing changes a folder's contents: a record must never describe a
    half-rewritten output."""
    try:
        os.unlink(record_path(folder))
    except FileNotFoundError:
        pass


def read_record(folder, name=RECORD_NAME):
    """The record of ``folder``, or None when it has none; DataError when it is malformed."""
    path = record_path(folder, name)
    record = _load_json(path, 'preprocessing record', 'delete it and run preprocessing again')
    if record is None:
        return None
    if not isinstance(record, dict) or any(k not in record for k in FIELDS) or \
            record['format'] != FORMAT:
        raise DataError(f"preprocessing record {path} is not a record of this version's "
                        f"preprocessing: delete it and run preprocessing again")
    return {k: record[k] for k in FIELDS}


def check_together(folders):
    """{config key: folder} -> the one record they share, or None when none of them has one.
    Folders whose records differ, or some with a record and some without, are a ConfigError
    naming the keys that differ from the most: they come from another preprocessing output.
    A folder that does not exist is left out: the reader of its files names it."""
    records = {key: read_record(folder) for key, folder in folders.items()
               if os.path.isdir(folder)}
    have = {key: r for key, r in records.items() if r is not None}
    if not have:
        return None
    groups = []           # [(record, [keys])], in the order of the keys
    for key, r in have.items():
        for rec, keys in groups:
            if rec == r:
                keys.append(key)
                break
        else:
            groups.append((r, [key]))
    without = [key for key, r in records.items() if r is None]
    if len(groups) > 1:
        groups.sort(key=lambda g: -len(g[1]))         # the most keys first: the odd ones out
        (rec, keys), others = groups[0], groups[1:]   # are named first in the message
        odd = [k for _, ks in others for k in ks]
        raise ConfigError(
            f"{_keys(odd)} {'comes' if len(odd) == 1 else 'come'} from another preprocessing "
            f"output ({'; '.join(_describe(r) for r, _ in others)}) than {_keys(keys)} "
            f"({_describe(rec)}): point them at the folders of one preprocessing run")
    if without:
        raise ConfigError(f"{_keys(without)} {'has' if len(without) == 1 else 'have'} no "
                          f"{RECORD_NAME}, but {_keys(have)} {'was' if len(have) == 1 else 'were'} "
                          f"written by preprocessing ({_describe(groups[0][0])}): they come "
                          f"from different preprocessing runs; point them at one run's folders")
    return groups[0][0]


def check_trained_on(weights_dir, record, keys):
    """The data of ``keys`` (their shared record) is the data the run in weights_dir trained
    on, when both are known."""
    trained = read_record(weights_dir, TRAINED_ON)
    if trained is not None and record is not None and trained != record:
        raise ConfigError(f"the run in {weights_dir} trained on another preprocessing output "
                          f"({_describe(trained)}) than {_keys(keys)} ({_describe(record)}); "
                          f"point them at the data it trained on")


def _keys(keys):
    keys = list(keys)
    return ', '.join(keys[:-1]) + f" and {keys[-1]}" if len(keys) > 1 else keys[0]


def _describe(record):
    return (f"{record['train_images']} training images, order {record['train_order_sha1'][:8]}, "
            f"{record['val_images']} validation images, list {record['val_list_sha1'][:8]}")
