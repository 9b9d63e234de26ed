"""A small ImageNet-layout tree with the real world's quirks, for tests/test_preprocessing.py.

    tree = build_tree(tmp_path / 'imagenet', per_class=(200, 150, 250), n_val=300)
    tree.write_paths_yaml(tmp_path / 'cfg' / 'paths.yaml', tmp_path / 'out')
    tree = build_tree(tmp_path / 'imagenet12', devkit='2012')   # the ILSVRC2012 devkit's files

Written independently of preprocessing/ (its own devkit files, its own images), so that the
tests check the scripts against data they did not make. Quirks, as in ILSVRC2012: greyscale and
CMYK JPEGs (one pure red), a PNG named .JPEG, an RGBA PNG, a palette PNG, a grey+alpha PNG and a
16-bit greyscale PNG (all named .JPEG), and large JPEGs that libjpeg decodes at reduced scale.

The devkit has either real layout: devkit='2014' (ILSVRC2014_devkit/data/meta_clsloc.mat, field
ILSVRC2014_ID) or '2012' (ILSVRC2012_devkit_t12/data/meta.mat, field ILSVRC2012_ID), each with
its ground-truth file. Both hold internal nodes (synsets with children, not classes) with ids
after the classes', as the real ones do.
"""
import os

import numpy as np
import scipy.io
from PIL import Image

# sorted: labels 0, 1, 2. The devkit ids are in another order, with two extra classes.
WNIDS = ['n01440764', 'n01443537', 'n02102040']
DEVKIT_IDS = {'n01440764': 3, 'n01443537': 1, 'n02102040': 5, 'n09999999': 2, 'n00000042': 4}
# internal nodes: wnid -> (id, child ids); ids after the classes', as in the real devkits
NODES = {'n01439121': (6, [3, 1]), 'n00001740': (7, [6, 5, 2, 4])}
# devkit layout -> (devkit folder, synsets file, id field, validation ground-truth file)
DEVKITS = {
    '2014': ('ILSVRC2014_devkit', 'meta_clsloc.mat', 'ILSVRC2014_ID',
             'ILSVRC2014_clsloc_validation_ground_truth.txt'),
    '2012': ('ILSVRC2012_devkit_t12', 'meta.mat', 'ILSVRC2012_ID',
             'ILSVRC2012_validation_ground_truth.txt'),
}

# the quirky training files: name -> kind; every other file is a plain RGB JPEG
TRAIN_QUIRKS = {
    'n01440764/n01440764_1.JPEG': 'grey',
    'n01440764/n01440764_2.JPEG': 'cmyk_red',
    'n01440764/n01440764_3.JPEG': 'cmyk',
    'n01440764/n01440764_4.JPEG': 'rgba_png',
    'n01440764/n01440764_5.JPEG': 'palette_png',
    'n01443537/n01443537_1.JPEG': 'png',
    'n01443537/n01443537_2.JPEG': 'grey',
    'n01443537/n01443537_3.JPEG': 'la_png',
    'n01443537/n01443537_4.JPEG': 'grey16_png',
    'n01443537/n01443537_5.JPEG': 'big',
    'n02102040/n02102040_1.JPEG': 'big',
    'n02102040/n02102040_2.JPEG': 'cmyk',
    'n02102040/n02102040_3.JPEG': 'grey',
    'n02102040/n02102040_4.JPEG': 'palette_png',
}
VAL_QUIRKS = {1: 'grey', 2: 'cmyk_red', 3: 'png', 5: 'rgba_png', 8: 'big'}

SMALL_SIZES = [(64, 48), (48, 64), (80, 60), (100, 75), (37, 29), (300, 200)]
RED_CMYK = (0, 255, 255, 0)
RGBA_COLOUR = (10, 200, 30)      # the colour under a partly transparent alpha
PALETTE = [(255, 0, 0), (0, 0, 255), (250, 250, 0), (0, 128, 0)]


def smooth_rgb(rng, w, h):
    """Natural-ish content: a coarse random pattern, smoothly upscaled."""
    coarse = rng.randint(0, 256, size=(6, 8, 3)).astype(np.uint8)
    return Image.fromarray(coarse, 'RGB').resize((w, h), Image.Resampling.BICUBIC)


def write_image(path, kind, rng):
    w, h = SMALL_SIZES[rng.randint(len(SMALL_SIZES))]
    if kind == 'rgb':
        smooth_rgb(rng, w, h).save(path, 'JPEG', quality=92)
    elif kind == 'big':
        smooth_rgb(rng, 1100, 800).save(path, 'JPEG', quality=92)
    elif kind == 'grey':
        smooth_rgb(rng, w, h).convert('L').save(path, 'JPEG', quality=92)
    elif kind == 'cmyk':
        smooth_rgb(rng, w, h).convert('CMYK').save(path, 'JPEG', quality=92)
    elif kind == 'cmyk_red':
        Image.new('CMYK', (w, h), RED_CMYK).save(path, 'JPEG', quality=95)
    elif kind == 'png':
        smooth_rgb(rng, w, h).save(path, 'PNG')
    elif kind == 'rgba_png':
        alpha = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))  # 0 at the left edge
        rgba = np.dstack([np.full((h, w, 3), RGBA_COLOUR, np.uint8), alpha])
        Image.fromarray(rgba, 'RGBA').save(path, 'PNG')
    elif kind == 'palette_png':
        index = np.zeros((h, w), np.uint8)
        index[:, w // 2:] = 1
        index[h // 2:, :] += 2
        img = Image.fromarray(index, 'P')
        img.putpalette([c for colour in PALETTE for c in colour])
        img.save(path, 'PNG', transparency=3)
    elif kind == 'la_png':
        grey = np.asarray(smooth_rgb(rng, w, h).convert('L'))
        alpha = np.full_like(grey, 128)
        Image.fromarray(np.dstack([grey, alpha]), 'LA').save(path, 'PNG')
    elif kind == 'grey16_png':
        grey16 = np.tile(np.linspace(0, 65535, w).astype(np.uint16), (h, 1))
        Image.fromarray(grey16).save(path, 'PNG')  # mode I;16
    else:
        raise ValueError(kind)


def write_meta(path, devkit_ids, devkit='2014', nodes=None):
    """A devkit synsets file (meta_clsloc.mat or meta.mat): a 1xN `synsets` struct, rows in id
    order; the classes ``devkit_ids`` {wnid: id} and the internal ``nodes`` {wnid: (id, child
    ids)}."""
    fields = [DEVKITS[devkit][2], 'WNID', 'words', 'gloss', 'num_children', 'children',
              'wordnet_height', 'num_train_images']
    rows = {class_id: (np.array([[class_id]], np.uint16), wnid, f'words of {wnid}',
                       f'gloss of {wnid}', np.array([[0]], np.uint8), np.zeros((1, 0), np.uint8),
                       np.array([[0]], np.uint8), np.array([[1300]], np.uint16))
            for wnid, class_id in devkit_ids.items()}
    for wnid, (node_id, children) in (nodes or {}).items():
        rows[node_id] = (np.array([[node_id]], np.uint16), wnid, f'node {wnid}',
                         f'gloss of node {wnid}', np.array([[len(children)]], np.uint8),
                         np.array([children], np.uint16), np.array([[1]], np.uint8),
                         np.array([[1300 * len(children)]], np.uint16))
    synsets = np.zeros((1, len(rows)), dtype=[(f, 'O') for f in fields])
    for j, class_id in enumerate(sorted(rows)):
        synsets[0, j] = rows[class_id]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scipy.io.savemat(path, {'synsets': synsets})


class Tree:
    def __init__(self, root, devkit='2014'):
        self.root = str(root)
        self.devkit = devkit
        self.train_dir = os.path.join(self.root, 'ILSVRC2012_img_train')
        self.val_dir = os.path.join(self.root, 'ILSVRC2012_img_val')
        folder, meta, _, gt = DEVKITS[devkit]
        self.meta = os.path.join(self.root, folder, 'data', meta)
        self.gt = os.path.join(self.root, folder, 'data', gt)
        self.train_label = {}  # 'wnid/name' -> label
        self.kind = {}         # 'wnid/name' or val name -> kind
        self.val_names = []
        self.val_label = []

    def train_files(self):
        return sorted(self.train_label)

    def write_paths_yaml(self, yaml_path, out_root, **override):
        """A paths.yaml with paths relative to its own folder (the scripts must resolve them)."""
        yaml_path = str(yaml_path)
        base = os.path.dirname(yaml_path)
        os.makedirs(base, exist_ok=True)
        rel = lambda p: os.path.relpath(str(p), base)  # noqa: E731
        out_root = str(out_root)
        keys = {
            'train_img_dir': rel(self.train_dir), 'val_img_dir': rel(self.val_dir),
            'tar_root_dir': rel(out_root), 'tar_train_dir': 'train_hkl', 'tar_val_dir': 'val_hkl',
            'misc_dir': rel(os.path.join(out_root, 'misc')),
            'meta_clsloc_mat': rel(self.meta), 'val_label_file': rel(self.gt),
            'valtxt_filename': rel(os.path.join(out_root, 'misc', 'val.txt')),
            'traintxt_filename': rel(os.path.join(out_root, 'misc', 'train.txt')),
        }
        keys.update(override)
        with open(yaml_path, 'w') as f:
            f.writelines(f"{k}: {v}\n" for k, v in keys.items() if v is not None)
        return yaml_path


def build_tree(root, per_class=(200, 150, 250), n_val=300, quirks=True, seed=0, devkit='2014'):
    rng = np.random.RandomState(seed)
    tree = Tree(root, devkit)
    for label, (wnid, n) in enumerate(zip(WNIDS, per_class)):
        os.makedirs(os.path.join(tree.train_dir, wnid))
        for i in range(1, n + 1):
            rel = f'{wnid}/{wnid}_{i}.JPEG'
            kind = TRAIN_QUIRKS.get(rel, 'rgb') if quirks else 'rgb'
            write_image(os.path.join(tree.train_dir, rel), kind, rng)
            tree.train_label[rel] = label
            tree.kind[rel] = kind
    os.makedirs(tree.val_dir)
    gt_lines = []
    for number in range(1, n_val + 1):
        name = f'ILSVRC2012_val_{number:08d}.JPEG'
        kind = VAL_QUIRKS.get(number, 'rgb') if quirks else 'rgb'
        label = int(rng.randint(len(WNIDS)))
        write_image(os.path.join(tree.val_dir, name), kind, rng)
        tree.val_names.append(name)
        tree.val_label.append(label)
        tree.kind[name] = kind
        gt_lines.append(f'{DEVKIT_IDS[WNIDS[label]]}\n')
    write_meta(tree.meta, DEVKIT_IDS, devkit, NODES)
    with open(tree.gt, 'w') as f:
        f.writelines(gt_lines)
    return tree


def truncate(path, keep=0.6):
    """Cut a file short, as an interrupted download does."""
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:int(len(data) * keep)])
