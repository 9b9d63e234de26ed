r"""Classify images with a snapshot: top-5 classes (all of them with 5 or fewer, n_classes),
their probabilities and names.

    python classify.py IMAGE|FOLDER [...] [key=value ...] [extra.yaml ...]
    python classify.py cat.jpg dog.png gpu=cpu weights_dir=pretrained/alexnet/weights \
        load_epoch=65 mean_file=pretrained/alexnet/weights/img_mean.npy \
        meta_clsloc_mat=ILSVRC2014_devkit/data/meta_clsloc.mat
    python classify.py cat.jpg pretrained/alexnet/config.yaml gpu=cpu synset_words=synset_words.txt

The configuration is the usual one (config.yaml + spec_1gpu.yaml + yaml files + key=value):
weights_dir and load_epoch choose the snapshot, mean_file the mean image, gpu the device,
precision the arithmetic, batch_size how many images go through the network at once.

A folder stands for the images inside it (not in its subfolders), in sorted order: the files
whose names preprocessing takes for images (alexnet_lib.imagenet.is_image_name: .jpg, .jpeg,
.png, ... in any case, not hidden); the other files are listed as skipped. A folder without
any image is an error.

Each image is read with alexnet_lib.images.load_image_256 (any format preprocessing reads:
JPEG, PNG, greyscale, CMYK, alpha, ...; decided by content, not name), exactly as the batch
files hold it (RGB, 256x256), then goes through what validation does (step.test_logits):
minus the mean image, the centre 227x227 crop without mirror, the test-time network, then a
softmax.

Class names, for label i (the index of the WNID among the sorted training class folders, as
preprocessing gives labels), from the first of:
  meta_clsloc_mat=PATH   the devkit's meta_clsloc.mat (2014) or meta.mat (2012): its 1,000 leaf
                         classes (ids 1..1000 in either devkit), in sorted WNID order
  synset_words=PATH      a text file whose line i is 'WNID words' of label i (caffe's
                         synset_words.txt, or misc/synset_words.txt of make_train_val_txt.py)
  synset_words.txt beside mean_file (misc/ of the preprocessing output), when it exists
else only the label index is printed. These two keys are this script's own, not config keys.

Output (stdout): a block per image, then as its very last line one JSON object:
{"weights_dir": ..., "load_epoch": 65, "names": SOURCE or null,
 "results": [{"image": PATH, "top5": [{"label": 281, "probability": 0.93, "name": "n02123045
 tabby, tabby cat"}, ...]}, ...]}       ("name" is null where no name is known)
An unreadable image, snapshot, mean or names file is one line 'error: ...' on stderr naming
the file, exit status 1 (a configuration error: 2).
"""
import json
import os
import re
import sys

import numpy as np
import torch

from alex_net import AlexNet, N_CLASSES
from alexnet_lib.config import help_text, load_config, require_data, resolve_device
from alexnet_lib.data import mean_image_hwc
from alexnet_lib.errors import run_main
from alexnet_lib.provenance import check_trained_on, read_record
from alexnet_lib.step import amp_dtype_of, precision_of, test_logits
from alexnet_lib.snapshot import load_snapshot
from alexnet_lib.files import DataError
from alexnet_lib.images import load_image_256
from alexnet_lib.imagenet import is_image_name

OWN_KEYS = ('meta_clsloc_mat', 'synset_words')
TOP = 5
USAGE = ("usage: python classify.py IMAGE|FOLDER [...] [key=value ...] "
         "[meta_clsloc_mat=PATH | synset_words=PATH]")


def split_args(argv):
    """(images, this script's own settings, config words). A word ending in .yaml/.yml is a
    config file, an existing file or folder an image (or folder of them), 'key=value' a
    setting, anything else an image."""
    images, own, config_words = [], {}, []
    for a in argv:
        key = re.match(r'^([A-Za-z_]\w*)=', a)
        if a.endswith(('.yaml', '.yml')):
            config_words.append(a)
        elif os.path.exists(a) or not key:
            images.append(a)
        elif key.group(1) in OWN_KEYS:
            own[key.group(1)] = a.split('=', 1)[1]
        else:
            config_words.append(a)
    return images, own, config_words


def names_from_devkit(meta_file):
    """Label i -> 'WNID words', from the devkit's leaf synsets (ids 1..1000 are the classes)."""
    from alexnet_lib.devkit import read_devkit_synsets
    synsets = read_devkit_synsets(meta_file)
    classes = sorted(w for w, (cid, _) in synsets.items() if 1 <= cid <= N_CLASSES)
    if not classes:
        raise DataError(f"devkit file {meta_file} has no leaf classes with ids "
                         f"1..{N_CLASSES}")
    return [f"{w} {synsets[w][1]}".strip() for w in classes]


def names_from_words_file(path, n_classes):
    """Label i -> line i ('WNID words') of a synset words file."""
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"synset words file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read synset words file {path}: {e}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) > n_classes:
        raise DataError(f"synset words file {path} has {len(lines)} lines; the network has "
                         f"{n_classes} classes (line i names label i; n_classes sets them)")
    return [line.strip() for line in lines]


def class_names(own, mean_file, n_classes):
    """(names list or None, where they came from)."""
    if 'meta_clsloc_mat' in own:
        return names_from_devkit(own['meta_clsloc_mat']), own['meta_clsloc_mat']
    if 'synset_words' in own:
        return names_from_words_file(own['synset_words'], n_classes), own['synset_words']
    beside = os.path.join(os.path.dirname(mean_file), 'synset_words.txt')
    if os.path.isfile(beside):
        return names_from_words_file(beside, n_classes), beside
    return None, None


@torch.no_grad()
def probabilities(net, images, mean_hwc, amp_dtype):
    """Softmax of the test-time network on the centre crops of uint8 (B, 256, 256, 3) images:
    the same forward as validation (step.test_logits)."""
    return torch.softmax(test_logits(net.layer_params, images, mean_hwc, amp_dtype), dim=1)


def image_files(args):
    """(the image files, notes on what was skipped): a folder stands for the images inside it,
    sorted. Raises DataError for a path that does not exist or a folder without images."""
    files, notes = [], []
    for path in args:
        if os.path.isdir(path):
            try:
                entries = sorted(os.listdir(path))
            except OSError as e:
                raise DataError(f"cannot list folder {path}: {e.strerror or e}") from None
            found = [n for n in entries
                     if is_image_name(n) and os.path.isfile(os.path.join(path, n))]
            if not found:
                why = (f"nothing in it is a file named .jpg, .jpeg, .png, ...: {_some(entries)}"
                       if entries else "it is empty")
                raise DataError(f"folder {path} holds no image ({why}): give image files or a "
                                "folder of them")
            skipped = [n for n in entries if n not in found]
            note = f"{path}: {len(found)} image{'s' if len(found) > 1 else ''}"
            if skipped:
                note += f" (skipped {len(skipped)}, not image files: {_some(skipped)})"
            notes.append(note)
            files.extend(os.path.join(path, n) for n in found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise DataError(f"image {path} not found")
    return files, notes


def _some(names, n=5):
    return ', '.join(names[:n]) + (', ...' if len(names) > n else '')


def classify(cfg, images, own):
    images, notes = image_files(images)
    require_data(cfg, ('mean_file',))
    # the mean must be the one the run trained with, when both are recorded
    check_trained_on(cfg['weights_dir'], read_record(os.path.dirname(cfg['mean_file'])),
                     ('mean_file',))
    names, source = class_names(own, cfg['mean_file'], cfg['n_classes'])
    device = resolve_device(cfg['gpu'])
    amp_dtype = amp_dtype_of(precision_of(cfg['precision'], device))
    mean = mean_image_hwc(cfg['mean_file'], device)
    net = AlexNet(device, init=False, n_classes=cfg['n_classes'])
    load_snapshot(cfg['weights_dir'], cfg['load_epoch'], net, with_momentum=False)
    print(f"snapshot {cfg['load_epoch']} of {cfg['weights_dir']}, mean {cfg['mean_file']}, "
          f"names {'from ' + source if source else 'unknown (labels only)'}")
    for note in notes:
        print(note)
    results = []
    for start in range(0, len(images), cfg['batch_size']):
        chunk = images[start:start + cfg['batch_size']]
        batch = torch.from_numpy(np.stack([load_image_256(p) for p in chunk])).to(device)
        probs = probabilities(net, batch, mean, amp_dtype).cpu()
        top_p, top_i = probs.topk(min(TOP, cfg['n_classes']), dim=1)
        for path, ps, ls in zip(chunk, top_p.tolist(), top_i.tolist()):
            top5 = [{"label": l, "probability": p,
                     "name": names[l] if names and l < len(names) else None}
                    for p, l in zip(ps, ls)]
            print(path)
            for rank, t in enumerate(top5, 1):
                print(f"  {rank}. {t['probability']:.4f}  label {t['label']:4d}"
                      f"{'  ' + t['name'] if t['name'] else ''}")
            results.append({"image": path, "top5": top5})
    print(json.dumps({"weights_dir": cfg['weights_dir'], "load_epoch": cfg['load_epoch'],
                      "names": source, "results": results}))
    return results


def main(argv):
    if '-h' in argv or '--help' in argv:
        print(help_text('spec_1gpu.yaml', __doc__))
        return
    images, own, config_words = split_args(argv)
    if not images:
        print(f"{USAGE}\nerror: no image given", file=sys.stderr)
        raise SystemExit(2)
    run_main(lambda: classify(load_config('spec_1gpu.yaml', config_words), images, own))


if __name__ == '__main__':
    main(sys.argv[1:])
