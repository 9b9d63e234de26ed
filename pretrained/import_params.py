r"""Import the original's released AlexNet parameters (parameters_releasing.zip) as snapshot 65.

    python pretrained/import_params.py parameters_releasing.zip pretrained/alexnet/weights
    python pretrained/import_params.py my_copy.zip WEIGHTS_DIR --skip-checksum   # not the release

Then, from the repository root:

    python validate.py weights_dir=pretrained/alexnet/weights load_epoch=65 mean_file=...
    python classify.py cat.jpg weights_dir=pretrained/alexnet/weights load_epoch=65 mean_file=...
    python train.py resume_train=True load_epoch=65 n_epochs=70 \
        weights_dir=pretrained/alexnet/weights mean_file=...
    # or with the released run's settings: python validate.py pretrained/alexnet/config.yaml

What it does (pretrained/alexnet/readme.md says more):
1. checks the sha1 of ZIP against the release's (58950804...); a mismatch is refused unless
   --skip-checksum is given;
2. refuses an archive with an unsafe member path (absolute, or with a '..' part);
3. finds W_{i}_65.npy / b_{i}_65.npy (W0_/W1_/b0_/b1_ for layers 1, 3, 4) anywhere in the zip
   (they may sit inside a folder), reads each with allow_pickle=False and checks its shape
   (alex_net.PARAMS, original layouts), dtype (floating point) and values (finite); every
   missing or malformed file is named;
4. writes them, atomically, into WEIGHTS_DIR under the snapshot names, plus:
   - mom_{k}_65.npy: from the zip when it has them, else zeros (resuming then starts without
     momentum);
   - lr_65.npy: from the zip when it has it, else the learning rate the released run used after
     epoch 65 (learning_rate 0.01 divided by 10 at epochs 25 and 45: 0.0001), computed from
     pretrained/alexnet/config.yaml with sgd.adjust_learning_rate;
   - val_record.npy: from the zip when it has one, else 65 rows [top-1 error, loss] of NaN
     (the released run's per-epoch validation was not published), except row 65's top-1 error,
     0.426, the published one (1 - 57.40%); resume_train needs one row per finished epoch;
   - img_mean.npy: the released mean image (3, 256, 256), when the zip has it.
   lr_65.npy is written last, so a snapshot with an lr file is complete.

WEIGHTS_DIR must be new, empty, or hold only files that this import writes (re-running it is
fine); a folder with anything else (another run's snapshots, metrics.csv) is refused.
Exit status 0 on success, 1 on a refused or broken archive (one line 'error: ...'), 2 on bad
arguments.
"""
import argparse
import hashlib
import io
import os
import re
import sys
import zipfile
import zlib

import numpy as np

from alex_net import PARAMS
from alexnet_lib.config import ConfigError, load_config
from alexnet_lib.sgd import adjust_learning_rate
from alexnet_lib.snapshot import lr_file, mom_file, param_file, save_array

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RELEASE_SHA1 = '58950804f50f8d1a76705e1b28d3546e12ea8a81'
EPOCH = 65
PUBLISHED_TOP1_ERROR = 1 - 0.5740   # top-1 accuracy 57.40% on ILSVRC2012 val, centre crop
RUN_CONFIG = os.path.join(REPO, 'pretrained', 'alexnet', 'config.yaml')
MEAN_NAME = 'img_mean.npy'
MEAN_SHAPE = (3, 256, 256)
RECORD_NAME = 'val_record.npy'
PARAM_FILES = [os.path.basename(param_file('', p.name, EPOCH)) for p in PARAMS]  # W_0_65.npy, ...
MOM_FILES = [os.path.basename(mom_file('', k, EPOCH)) for k in range(len(PARAMS))]
LR_NAME = os.path.basename(lr_file('', EPOCH))


class ReleaseError(Exception):
    """The archive or WEIGHTS_DIR cannot be imported; the message names the file at fault."""


def sha1_of(path):
    h = hashlib.sha1()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def is_unsafe(member):
    """An absolute path, a drive letter or a '..' part: it could write outside the target."""
    name = member.replace('\\', '/')
    return (name.startswith('/') or re.match(r'^[A-Za-z]:', name) is not None
            or '..' in name.split('/'))


def expected_names():
    """{file name: (what, shape)} of every file the import looks for in the zip."""
    names = {f: ('parameter', p.original_shape) for f, p in zip(PARAM_FILES, PARAMS)}
    names.update({f: ('momentum', p.original_shape) for f, p in zip(MOM_FILES, PARAMS)})
    names[LR_NAME] = ('learning rate', ())
    names[MEAN_NAME] = ('mean image', MEAN_SHAPE)
    names[RECORD_NAME] = ('val_record', None)
    return names


def find_members(zf, zip_path):
    """{file name: member} of the files the import knows, wherever they sit in the zip."""
    wanted = expected_names()
    found = {}
    for info in zf.infolist():
        if is_unsafe(info.filename):
            raise ReleaseError(f"{zip_path}: member {info.filename!r} has an unsafe path "
                               f"(absolute or with '..'): refusing this archive")
        if info.is_dir():
            continue
        base = info.filename.replace('\\', '/').rsplit('/', 1)[-1]
        if base in wanted:
            if base in found:
                raise ReleaseError(f"{zip_path} holds {base} twice ({found[base]} and "
                                   f"{info.filename}): cannot tell which one to use")
            found[base] = info.filename
    return found


def read_member(zf, zip_path, member):
    """The .npy array of a zip member, read without unpickling."""
    try:
        data = zf.read(member)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError,
            NotImplementedError) as e:
        raise ReleaseError(f"{zip_path}: cannot extract {member}: {e}") from None
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        if 'pickle' in str(e).lower():
            return ("holds pickled Python objects, not a numeric array "
                    "(refused, never unpickled)")
        return f"is not a .npy array ({e})"
    except (OSError, EOFError) as e:
        return f"is not a .npy array ({e})"


def check_array(a, what, shape):
    """None if ``a`` is a finite floating-point array of ``shape``, else what is wrong."""
    if isinstance(a, str):
        return a
    if not np.issubdtype(a.dtype, np.floating):
        return f"has dtype {a.dtype}, expected float32"
    if shape is not None and tuple(a.shape) != tuple(shape):
        return f"has shape {tuple(a.shape)}, expected {tuple(shape)} ({what})"
    if not np.isfinite(a).all():
        return "holds NaN or infinite values"
    return None


def check_weights_dir(weights_dir):
    """Refuse a WEIGHTS_DIR that holds files other than those this import writes."""
    if os.path.exists(weights_dir) and not os.path.isdir(weights_dir):
        raise ReleaseError(f"WEIGHTS_DIR {weights_dir} exists and is not a folder")
    if not os.path.isdir(weights_dir):
        return
    ours = set(expected_names()) | {'plot.png'}   # plot.py's default output there
    foreign = sorted(f for f in os.listdir(weights_dir) if f not in ours)
    if foreign:
        more = f" and {len(foreign) - 1} other file(s)" if len(foreign) > 1 else ""
        raise ReleaseError(f"WEIGHTS_DIR {weights_dir} already holds {foreign[0]}{more}, which "
                           f"this import does not write: choose a new or empty folder")


def release_lr():
    """The lr the released run used after epoch 65: its config's schedule, replayed."""
    try:
        cfg = load_config('spec_1gpu.yaml', [RUN_CONFIG])
    except ConfigError as e:
        raise ReleaseError(f"cannot read the released run's configuration: {e}") from None
    lr = cfg['learning_rate']
    for epoch in range(1, EPOCH + 1):
        lr = adjust_learning_rate(cfg, epoch, lr, [])
    return float(np.float32(lr))


def load_release(zip_path):
    """{file name: array} of every usable file in the zip, all of them checked."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as e:
        raise ReleaseError(f"{zip_path} is not a zip archive ({e})") from None
    with zf:
        members = find_members(zf, zip_path)
        wanted = expected_names()
        missing = [n for n in PARAM_FILES if n not in members]
        if missing:
            hint = ''
            if len(missing) == len(PARAM_FILES):  # say what the zip does hold
                npys = sorted(m for m in zf.namelist() if m.endswith('.npy'))
                hint = (f" (its .npy files: {', '.join(npys[:6])}"
                        f"{', ...' if len(npys) > 6 else ''})" if npys
                        else " (it holds no .npy files)")
            raise ReleaseError(f"{zip_path} lacks {len(missing)} of the {len(PARAM_FILES)} "
                               f"parameter files of epoch {EPOCH}: {', '.join(missing)}{hint}")
        absent = [n for n in MOM_FILES if n not in members]
        if 0 < len(absent) < len(MOM_FILES):
            raise ReleaseError(f"{zip_path} holds momentum for some parameters only: missing "
                               f"{', '.join(absent)}")
        arrays, problems = {}, []
        for name, member in members.items():
            what, shape = wanted[name]
            a = read_member(zf, zip_path, member)
            if name == RECORD_NAME and not isinstance(a, str):
                problem = check_record(a)
            elif name == LR_NAME and not isinstance(a, str):
                problem = check_array(a, what, (a.shape if a.size == 1 else ()))
                if problem is None and not a.reshape(()) > 0:
                    problem = f"holds {a.reshape(())}, not a positive learning rate"
            else:
                problem = check_array(a, what, shape)
            if problem:
                problems.append(f"{member} {problem}")
            else:
                arrays[name] = a
        if problems:
            raise ReleaseError(f"{zip_path}: {len(problems)} malformed file(s): "
                               f"{'; '.join(problems)}")
    return arrays


def check_record(a):
    if not np.issubdtype(a.dtype, np.floating) or a.ndim != 2 or a.shape[1] != 2:
        return (f"has dtype {a.dtype} and shape {a.shape}, expected float rows "
                f"[val_error, val_loss]")
    if a.shape[0] < EPOCH:
        return f"has {a.shape[0]} rows; epoch {EPOCH} needs at least {EPOCH}"
    return None


def write_weights_dir(weights_dir, arrays, lr_default):
    """Write the snapshot; returns the lines that say where each non-parameter file came from."""
    os.makedirs(weights_dir, exist_ok=True)
    f32 = lambda a: a.astype(np.float32, copy=False)  # noqa: E731
    for p, name in zip(PARAMS, PARAM_FILES):
        save_array(param_file(weights_dir, p.name, EPOCH), f32(arrays[name]))
    last = len(PARAMS) - 1
    if MOM_FILES[0] in arrays:
        for k, name in enumerate(MOM_FILES):
            save_array(mom_file(weights_dir, k, EPOCH), f32(arrays[name]))
        notes = [f"momentum: from the zip (mom_0_{EPOCH}.npy .. mom_{last}_{EPOCH}.npy)"]
    else:
        for k, p in enumerate(PARAMS):
            save_array(mom_file(weights_dir, k, EPOCH), np.zeros(p.original_shape, np.float32))
        notes = [f"momentum: not in the zip; wrote zeros (mom_0_{EPOCH}.npy .. "
                 f"mom_{last}_{EPOCH}.npy), so a resumed run starts without momentum"]
    mean_path = os.path.join(weights_dir, MEAN_NAME)
    if MEAN_NAME in arrays:
        save_array(mean_path, f32(arrays[MEAN_NAME]))
        notes.append(f"mean image: extracted to {mean_path}; give mean_file={mean_path} to "
                     f"validate.py, classify.py and train.py")
    else:
        notes.append("mean image: not in the zip; use the img_mean.npy of your own ImageNet "
                     "preprocessing (mean_file=...)")
    if RECORD_NAME in arrays:
        record = f32(arrays[RECORD_NAME])
        notes.append(f"val_record.npy: from the zip ({len(record)} rows)")
    else:
        record = np.full((EPOCH, 2), np.nan, np.float32)
        record[EPOCH - 1, 0] = PUBLISHED_TOP1_ERROR
        notes.append(f"val_record.npy: not in the zip; wrote {EPOCH} rows of NaN (the released "
                     f"run's per-epoch validation is not published) except epoch {EPOCH}'s top-1 "
                     f"error, {PUBLISHED_TOP1_ERROR:.3f} (the published 57.40% accuracy)")
    save_array(os.path.join(weights_dir, RECORD_NAME), record)
    if LR_NAME in arrays:
        lr = float(arrays[LR_NAME].reshape(()))
        notes.append(f"{LR_NAME}: from the zip ({lr:g})")
    else:
        lr = lr_default
        notes.append(f"{LR_NAME}: not in the zip; wrote {lr:g}, the learning rate the released "
                     f"run used after epoch {EPOCH} (pretrained/alexnet/config.yaml)")
    save_array(lr_file(weights_dir, EPOCH), np.float32(lr))  # last: the snapshot is complete
    return notes


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See also pretrained/alexnet/readme.md.")
    ap.add_argument('zip', metavar='ZIP', help='parameters_releasing.zip')
    ap.add_argument('weights_dir', metavar='WEIGHTS_DIR',
                    help='folder to write the snapshot into (e.g. pretrained/alexnet/weights)')
    ap.add_argument('--skip-checksum', action='store_true',
                    help="import even if ZIP's sha1 is not the release's")
    args = ap.parse_args(argv)
    try:
        if os.path.isdir(args.zip):
            raise ReleaseError(f"ZIP {args.zip} is a folder: give the zip file itself "
                               f"(parameters_releasing.zip, as downloaded; no need to unzip it)")
        if not os.path.isfile(args.zip):
            raise ReleaseError(f"ZIP {args.zip} not found")
        check_weights_dir(args.weights_dir)
        lr_default = release_lr()
        sha1 = sha1_of(args.zip)
        if sha1 == RELEASE_SHA1:
            print(f"sha1 {sha1} of {args.zip}: the release")
        elif args.skip_checksum:
            print(f"warning: sha1 of {args.zip} is {sha1}, not the release's {RELEASE_SHA1}; "
                  f"importing anyway (--skip-checksum)")
        else:
            raise ReleaseError(f"sha1 of {args.zip} is {sha1}, expected {RELEASE_SHA1} (the "
                               f"release parameters_releasing.zip): the download is damaged or "
                               f"another file; download it again, or pass --skip-checksum to "
                               f"import it anyway")
        arrays = load_release(args.zip)
        notes = write_weights_dir(args.weights_dir, arrays, lr_default)
    except ReleaseError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except OSError as e:  # disk full, permissions, ...
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print("interrupted: run the same command again (files are written whole or not at all)",
              file=sys.stderr)
        raise SystemExit(130)
    wd = args.weights_dir
    print(f"imported epoch {EPOCH} ({len(PARAMS)} parameter files, shapes checked) into {wd}")
    for line in notes:
        print(f"  {line}")
    mean = (f"mean_file={os.path.join(wd, MEAN_NAME)}" if MEAN_NAME in arrays
            else "mean_file=YOUR/misc/img_mean.npy")
    print("use it:")
    print(f"  python validate.py weights_dir={wd} load_epoch={EPOCH} {mean}")
    print(f"  python classify.py IMAGE weights_dir={wd} load_epoch={EPOCH} {mean}")
    print(f"  python train.py resume_train=True load_epoch={EPOCH} n_epochs=N weights_dir={wd} "
          f"{mean}")


if __name__ == '__main__':
    main(sys.argv[1:])
