"""A small ImageNet look-alike from scikit-learn's handwritten digits, laid out as ILSVRC2012.

    python preprocessing/make_toy_imagenet.py data/toy_imagenet        # the quickstart's tree
    preprocessing/generate_toy_data.sh                                 # default paths.yaml uses it
    # or, for a tree anywhere else:
    python preprocessing/make_toy_imagenet.py /tmp/toy
    preprocessing/generate_toy_data.sh /tmp/toy/paths.yaml

The 1,797 real 8x8 digit images of sklearn.datasets.load_digits (10 classes) are drawn as
ImageNet-like photographs: JPEGs of about 280-400 x 200-320 pixels, dark ink of its own colour
on a light tinted background (so RGB matters), a few greyscale and CMYK files as in ImageNet.
Deterministic: the same files every time. Writes into OUT_DIR:

  train/<wnid>/<wnid>_<n>.JPEG       1,400 images in 10 class folders (5 full batches of 256)
  val/ILSVRC2012_val_00000001.JPEG   397 images (one full batch and a short one of 141)
  devkit/data/meta_clsloc.mat        as the ILSVRC2014 devkit's: a `synsets` struct (ILSVRC2014_ID,
                                     WNID, words, gloss, num_children, children, wordnet_height,
                                     num_train_images) of the 10 classes (num_children 0, ids
                                     1..10, not in WNID order, as in the real devkit) and 3
                                     internal nodes above them (ids 11..13: digit, even digit,
                                     odd digit), which are not classes
  devkit/data/ILSVRC2014_clsloc_validation_ground_truth.txt   one class id per val image
  paths.yaml                         for generate_toy_data.sh / generate_data.sh; outputs go to
                                     OUT_DIR/preprocessed unless --tar-root DIR says otherwise
"""
import argparse
import os

import numpy as np
from PIL import Image


from alexnet_lib.imagenet import PrepError, default_paths_file, load_paths, run_main

N_TRAIN = 1400
DIGIT_NAMES = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine']
# WordNet-style ids for the ten classes; their sorted order is not the digit order
WNIDS = [f'n0{(7 * d + 3) % 10}{d:06d}' for d in range(10)]
# devkit ids 1..10, in neither digit nor WNID order (the real ids are not in WNID order either)
ILSVRC_IDS = [(3 * d + 5) % 10 + 1 for d in range(10)]
# the internal nodes of the toy's WordNet tree: (id, WNID, words, child ids). As in the real
# devkit (ids 1001..1860 above the 1000 classes) their ids follow the classes' ids.
NODES = [(11, 'n00020000', 'digit, figure', [12, 13]),
         (12, 'n00020002', 'even digit', [ILSVRC_IDS[d] for d in range(0, 10, 2)]),
         (13, 'n00020001', 'odd digit', [ILSVRC_IDS[d] for d in range(1, 10, 2)])]
OWN_ENTRIES = {'train', 'val', 'devkit', 'paths.yaml', 'preprocessed'}


def render(digit_image, rng):
    """One 8x8 digit (values 0..16) as a colour photograph-like PIL image."""
    w, h = int(rng.randint(280, 401)), int(rng.randint(200, 321))
    # background: a light, tinted vertical gradient (paper under uneven light)
    c0, c1 = rng.uniform(165, 255, size=(2, 3))
    ramp = np.linspace(0, 1, h)[:, None]
    column = (c0 * (1 - ramp) + c1 * ramp).astype(np.uint8)[:, None, :]   # (h, 1, 3)
    background = Image.fromarray(column, 'RGB').resize((w, h), Image.Resampling.NEAREST)
    # ink: a dark colour, so the strokes stand out in colour and in greyscale alike
    ink = rng.uniform(0, 100, size=3)
    # the digit fills most of the frame, a little off centre, smoothly upscaled
    dw, dh = int(w * rng.uniform(0.7, 0.9)), int(h * rng.uniform(0.75, 0.95))
    x0, y0 = int(rng.randint(0, w - dw + 1)), int(rng.randint(0, h - dh + 1))
    strokes = Image.fromarray((digit_image * (255 / 16)).astype(np.uint8), 'L')
    mask = Image.new('L', (w, h), 0)
    mask.paste(strokes.resize((dw, dh), Image.Resampling.BICUBIC), (x0, y0))
    return Image.composite(Image.new('RGB', (w, h), tuple(int(v) for v in ink)), background, mask)


def save_jpeg(img, path, kind):
    if kind == 'grey':
        img = img.convert('L')
    elif kind == 'cmyk':
        img = img.convert('CMYK')
    img.save(path, 'JPEG', quality=90)


def write_meta(path, n_train):
    """The ILSVRC2014 devkit's meta_clsloc.mat for the toy classes; n_train[d]: the number of
    training images of digit d."""
    import scipy.io
    fields = ['ILSVRC2014_ID', 'WNID', 'words', 'gloss', 'num_children', 'children',
              'wordnet_height', 'num_train_images']
    rows = {}  # id -> the synset's values: MATLAB-shaped 1x1 / 1xK integer arrays, strings
    for d in range(10):
        rows[ILSVRC_IDS[d]] = (np.array([[ILSVRC_IDS[d]]], np.uint16), WNIDS[d],
                               f'digit {d}, {DIGIT_NAMES[d]}',
                               f'the handwritten digit {DIGIT_NAMES[d]} (scikit-learn digits)',
                               np.array([[0]], np.uint8), np.zeros((1, 0), np.uint16),
                               np.array([[0]], np.uint8), np.array([[n_train[d]]], np.uint16))
    height, images = {}, {ILSVRC_IDS[d]: n_train[d] for d in range(10)}
    for node_id, wnid, words, children in reversed(NODES):  # children before their parents
        height[node_id] = 1 + max(height.get(c, 0) for c in children)
        images[node_id] = sum(images[c] for c in children)
        rows[node_id] = (np.array([[node_id]], np.uint16), wnid, words,
                         f'a node above the toy classes: {words}',
                         np.array([[len(children)]], np.uint8), np.array([children], np.uint16),
                         np.array([[height[node_id]]], np.uint8),
                         np.array([[images[node_id]]], np.uint16))
    # rows in id order, as in the real file: then the classes are in neither digit nor WNID order
    synsets = np.zeros((1, len(rows)), dtype=[(f, 'O') for f in fields])
    for j, synset_id in enumerate(sorted(rows)):
        synsets[0, j] = rows[synset_id]
    scipy.io.savemat(path, {'synsets': synsets})


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out_dir', help='folder to write the tree into (created)')
    parser.add_argument('--tar-root', help='tar_root_dir of the written paths.yaml '
                                           '(default: OUT_DIR/preprocessed)')
    args = parser.parse_args()
    out = os.path.abspath(args.out_dir)
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise PrepError(f"{out} exists and is not a folder")
        foreign = sorted(set(os.listdir(out)) - OWN_ENTRIES)
        if foreign:
            raise PrepError(f"{out} already holds {foreign[0]}, which is not part of a toy "
                            f"tree: choose an empty or new folder")

    from sklearn.datasets import load_digits
    digits = load_digits()
    images, targets = digits.images, digits.target
    rng = np.random.RandomState(1412)  # arXiv:1412.2302
    order = rng.permutation(len(images))
    train_idx, val_idx = order[:N_TRAIN], order[N_TRAIN:]
    # ImageNet holds greyscale and a few CMYK JPEGs; so does this tree
    kinds = rng.choice(['rgb', 'grey', 'cmyk'], size=len(images), p=[0.93, 0.05, 0.02])

    for wnid in WNIDS:
        os.makedirs(os.path.join(out, 'train', wnid), exist_ok=True)
    for i in sorted(train_idx):
        wnid = WNIDS[targets[i]]
        save_jpeg(render(images[i], rng), os.path.join(out, 'train', wnid, f'{wnid}_{i}.JPEG'),
                  kinds[i])

    os.makedirs(os.path.join(out, 'val'), exist_ok=True)
    devkit = os.path.join(out, 'devkit', 'data')
    os.makedirs(devkit, exist_ok=True)
    gt_lines = []
    for number, i in enumerate(val_idx, 1):
        save_jpeg(render(images[i], rng),
                  os.path.join(out, 'val', f'ILSVRC2012_val_{number:08d}.JPEG'), kinds[i])
        gt_lines.append(f'{ILSVRC_IDS[targets[i]]}\n')
    gt_file = os.path.join(devkit, 'ILSVRC2014_clsloc_validation_ground_truth.txt')
    with open(gt_file, 'w') as f:
        f.writelines(gt_lines)
    write_meta(os.path.join(devkit, 'meta_clsloc.mat'), np.bincount(targets[train_idx],
                                                                    minlength=10))

    tar_root = os.path.abspath(args.tar_root) if args.tar_root else 'preprocessed'
    with open(os.path.join(out, 'paths.yaml'), 'w') as f:
        f.write(f"""# The toy ImageNet tree written by preprocessing/make_toy_imagenet.py.
# Relative paths are relative to this file's folder.
train_img_dir: train
val_img_dir: val
tar_root_dir: {tar_root}
tar_train_dir: train_hkl
tar_val_dir: val_hkl
misc_dir: {os.path.join(tar_root, 'misc')}
meta_clsloc_mat: devkit/data/meta_clsloc.mat
val_label_file: devkit/data/ILSVRC2014_clsloc_validation_ground_truth.txt
valtxt_filename: {os.path.join(tar_root, 'misc', 'val.txt')}
traintxt_filename: {os.path.join(tar_root, 'misc', 'train.txt')}
""")
    print(f"make_toy_imagenet.py: {len(train_idx)} train images in 10 class folders and "
          f"{len(val_idx)} validation images -> {out}")
    print(f"preprocess with: preprocessing/generate_toy_data.sh {os.path.join(out, 'paths.yaml')}")
    default = load_paths(default_paths_file())
    if default['train_img_dir'] == os.path.join(out, 'train'):
        print(f"or with: preprocessing/generate_toy_data.sh  (the default paths.yaml: outputs in "
              f"{default['tar_root_dir']})")


if __name__ == '__main__':
    run_main(main)
