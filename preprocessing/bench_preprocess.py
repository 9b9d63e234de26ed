"""Benchmark of make_hkl.py on ImageNet-sized JPEGs: prints images/s and the cores used.

    python preprocessing/bench_preprocess.py                      # 2560 train + 512 val images
    python preprocessing/bench_preprocess.py --images 10240 --workers 16
    python preprocessing/bench_preprocess.py --keep /tmp/bench    # keep (and later reuse) the tree

Writes a temporary ImageNet-layout tree of real-photograph JPEGs (random crops of scikit-learn's
two sample photos, colour-shifted, quality 85-96; mostly 500x375 and 375x500, some 500x333, a
tenth larger, as in ImageNet), then times `make_hkl.py full` on it end to end in a
subprocess (listing, shuffling, decoding, resizing, writing the hickle batches, the mean).
Also reports the single-core decode rate of load_image_256 with and without libjpeg's
reduced-scale decoding (PIL Image.draft).
"""
import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool

import numpy as np
from PIL import Image


from alexnet_lib.images import RESAMPLE, SIZE, load_image_256
from alexnet_lib.imagenet import available_cores

# (width, height) and their share: ImageNet's common shapes, plus some large photographs
SHAPES = [((500, 375), 0.55), ((375, 500), 0.2), ((500, 333), 0.15), ((1024, 768), 0.07),
          ((1600, 1200), 0.03)]
_PHOTOS = []


def photo_like(seed):
    """A photograph: a random crop of one of scikit-learn's two sample photos (china.jpg,
    flower.jpg, 640x427), mirrored at random, colour-shifted, resized to an ImageNet shape.
    Returns the image and the JPEG quality to save it with (85-96, as Flickr photos)."""
    if not _PHOTOS:
        from sklearn.datasets import load_sample_images
        _PHOTOS.extend(Image.fromarray(a) for a in load_sample_images().images)
    rng = np.random.RandomState(seed)
    photo = _PHOTOS[rng.randint(len(_PHOTOS))]
    w, h = SHAPES[rng.choice(len(SHAPES), p=[share for _, share in SHAPES])][0]
    pw, ph = photo.size
    cw, ch = int(pw * rng.uniform(0.4, 1.0)), int(ph * rng.uniform(0.4, 1.0))
    x0, y0 = rng.randint(0, pw - cw + 1), rng.randint(0, ph - ch + 1)
    img = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BICUBIC)
    if rng.rand() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gains = rng.uniform(0.8, 1.2, size=3)
    img = Image.fromarray(np.clip(np.asarray(img) * gains, 0, 255).astype(np.uint8), 'RGB')
    return img, int(rng.randint(85, 97))


def write_one(job):
    path, seed = job
    img, quality = photo_like(seed)
    img.save(path, 'JPEG', quality=quality)
    return os.path.getsize(path)


def make_tree(root, n_train, n_val, workers):
    jobs = []
    for i in range(n_train):
        wnid = f'n{1000000 + i % 10:08d}'
        os.makedirs(os.path.join(root, 'train', wnid), exist_ok=True)
        jobs.append((os.path.join(root, 'train', wnid, f'{wnid}_{i}.JPEG'), i))
    os.makedirs(os.path.join(root, 'val'), exist_ok=True)
    for i in range(n_val):
        jobs.append((os.path.join(root, 'val', f'ILSVRC2012_val_{i + 1:08d}.JPEG'), 10**6 + i))
    with Pool(workers) as pool:
        pool.map(write_one, jobs, chunksize=16)
    with open(os.path.join(root, 'paths.yaml'), 'w') as f:
        f.write("train_img_dir: train\nval_img_dir: val\ntar_root_dir: out\n"
                "tar_train_dir: train_hkl\ntar_val_dir: val_hkl\nmisc_dir: out/misc\n"
                "meta_clsloc_mat: none.mat\nval_label_file: none.txt\n"
                "valtxt_filename: out/misc/val.txt\ntraintxt_filename: out/misc/train.txt\n")
    return [p for p, _ in jobs]


def existing_tree(root, n_train, n_val):
    """The files of a tree generated earlier into --keep DIR with the same sizes, else None."""
    if not os.path.isfile(os.path.join(root, 'paths.yaml')):
        return None
    train = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(root, 'train'))
                   for f in fs)
    val_dir = os.path.join(root, 'val')
    val = sorted(os.path.join(val_dir, f) for f in os.listdir(val_dir))
    return train + val if (len(train), len(val)) == (n_train, n_val) else None


def decode_without_draft(path):
    with Image.open(path) as img:
        return np.asarray(img.convert('RGB').resize((SIZE, SIZE), RESAMPLE))


def single_core_rate(files, decode, seconds=5.0):
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds and n < len(files):
        decode(files[n])
        n += 1
    return n / (time.perf_counter() - start)


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=2560,
                        help='training images (default 2560 = 10 batches)')
    parser.add_argument('--val-images', type=int, default=None,
                        help='validation images (default: a fifth of --images)')
    parser.add_argument('--workers', type=int, default=available_cores(),
                        help='make_hkl.py workers (default: every core)')
    parser.add_argument('--keep', metavar='DIR', help='generate into DIR and keep it')
    args = parser.parse_args()
    n_val = args.images // 5 if args.val_images is None else args.val_images

    root = args.keep or tempfile.mkdtemp(prefix='bench_preprocess_')
    if os.path.exists(os.path.join(root, 'out')):
        shutil.rmtree(os.path.join(root, 'out'))  # time a fresh run, not a resumed one
    try:
        t0 = time.perf_counter()
        files = existing_tree(root, args.images, n_val)
        if files:
            print(f"reusing the {len(files)} JPEGs in {root}")
        else:
            files = make_tree(root, args.images, n_val, available_cores())
            print(f"generated {len(files)} JPEGs in {time.perf_counter() - t0:.0f} s")
        sizes = [os.path.getsize(f) for f in files]
        print(f"JPEG files: mean {np.mean(sizes) / 1024:.0f} KiB (ImageNet: about 110 KiB)")

        sample = files[:200]
        with_draft = single_core_rate(sample, load_image_256)
        without = single_core_rate(sample, decode_without_draft)
        print(f"one core: load_image_256 {with_draft:.0f} images/s "
              f"(without reduced-scale JPEG decoding: {without:.0f} images/s)")

        cmd = [sys.executable,
               os.path.join(os.path.dirname(os.path.abspath(__file__)), 'make_hkl.py'), 'full',
               '--paths', os.path.join(root, 'paths.yaml'), '--workers', str(args.workers)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        n_done = (args.images // 256) * 256 + n_val
        print(f"make_hkl.py: {n_done} images in {seconds:.1f} s = {n_done / seconds:.0f} images/s "
              f"end to end, {args.workers} workers on {available_cores()} cores ({cpu_name()})")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
