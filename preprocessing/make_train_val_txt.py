"""Caffe-style label lists of every train and validation image, from the ImageNet devkit.

    python preprocessing/make_train_val_txt.py             # paths from preprocessing/paths.yaml
    python preprocessing/make_train_val_txt.py --paths other.yaml

Works from any folder. Reads the devkit's synsets file (paths.yaml's meta_clsloc_mat) and its
validation ground truth (val_label_file), both from one devkit:

  ILSVRC2014 devkit        ILSVRC2014_devkit/data/meta_clsloc.mat
                           ILSVRC2014_devkit/data/ILSVRC2014_clsloc_validation_ground_truth.txt
  ILSVRC2012 devkit        ILSVRC2012_devkit_t12/data/meta.mat
                           ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt

The `synsets` struct gives each class its id (ILSVRC2014_ID or ILSVRC2012_ID: the same ids
1..1000) and WNID; its internal WordNet nodes (synsets with children) are not classes and are
left out. The ground truth holds one class id per line, for the validation images in sorted
order. A class's label is the index of its WNID among the sorted training folder names (0-999),
which is not the devkit's id order. Writes:

  traintxt_filename  (misc/train.txt)   lines 'n01440764/n01440764_10026.JPEG 0', sorted
  valtxt_filename    (misc/val.txt)     lines 'ILSVRC2012_val_00000001.JPEG 65', sorted
  {misc_dir}/synset_words.txt           line i: 'WNID words' of label i ('WNID' alone, with a
                                        notice, when the devkit has no words for the class)

Stops with a one-line error when the synsets file is not a devkit's, when a training folder is
not the WNID of a devkit class, when a class folder holds a folder (or val_img_dir does), when
the ground truth does not have one line per validation image, or when a line is not such a
class's id. Files that are not images by their names are left out with one notice line.
Use a meta file and a ground-truth file from the same devkit: their ids must agree.
"""
import argparse
import os


from alexnet_lib.devkit import read_devkit_synsets
from alexnet_lib.imagenet import (PrepError, add_paths_argument, list_class_folders,
                                  list_train_images, list_val_images, load_paths,
                                  notice, require_dir, require_file, run_main,
                                  write_text_atomic)


def read_ground_truth(gt_file, n_val, val_dir):
    """The ILSVRC ids of the ground-truth file, one per validation image."""
    with open(gt_file) as f:
        lines = f.read().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # a trailing empty line is not an image
    if len(lines) != n_val:
        raise PrepError(f"validation ground truth {gt_file} has {len(lines)} lines but val_img_dir "
                        f"{val_dir} holds {n_val} images: they must match one to one")
    ids = []
    for number, line in enumerate(lines, 1):
        try:
            ids.append(int(line.strip()))
        except ValueError:
            raise PrepError(f"validation ground truth {gt_file}, line {number}: {line!r} is not "
                            f"a class id") from None
    return ids


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_paths_argument(parser)
    args = parser.parse_args()

    paths = load_paths(args.paths)
    train_dir = require_dir(paths, 'train_img_dir')
    val_dir = require_dir(paths, 'val_img_dir')
    meta_file = require_file(paths, 'meta_clsloc_mat')
    gt_file = require_file(paths, 'val_label_file')

    synsets = read_devkit_synsets(meta_file)
    wnids = list_class_folders(train_dir)
    for wnid in wnids:
        if wnid not in synsets:
            raise PrepError(f"training class folder '{wnid}' ({train_dir}) is not the WNID of a "
                            f"class (a synset without children) in the devkit file {meta_file}")
    label_of_wnid = {wnid: label for label, wnid in enumerate(wnids)}
    label_of_id = {synsets[wnid][0]: label for label, wnid in enumerate(wnids)}

    train_lines = [f"{rel} {label_of_wnid[rel.split('/')[0]]}\n"
                   for rel in list_train_images(train_dir)]

    val_names = list_val_images(val_dir)
    gt_ids = read_ground_truth(gt_file, len(val_names), val_dir)
    val_lines = []
    for number, (name, class_id) in enumerate(zip(val_names, gt_ids), 1):
        if class_id not in label_of_id:
            raise PrepError(f"validation ground truth {gt_file}, line {number}: class id "
                            f"{class_id} is not the id of a training class folder in {meta_file}")
        val_lines.append(f"{name} {label_of_id[class_id]}\n")

    write_text_atomic(paths['traintxt_filename'], ''.join(train_lines))
    write_text_atomic(paths['valtxt_filename'], ''.join(val_lines))
    words_file = os.path.join(paths['misc_dir'], 'synset_words.txt')
    words = {w: ' '.join(synsets[w][1].split()) for w in wnids}
    nameless = [w for w in wnids if not words[w]]
    if nameless:  # the names only serve printing predictions: the WNID still names the class
        which = ('its classes' if len(nameless) == len(wnids) else
                 f"{len(nameless)} of its {len(wnids)} classes (e.g. {nameless[0]})")
        notice(f"devkit file {meta_file} has no 'words' (class names) for {which}: "
               f"{words_file} names them by WNID alone")
    write_text_atomic(words_file, ''.join(f"{w} {words[w]}\n" if words[w] else f"{w}\n"
                                          for w in wnids))
    print(f"make_train_val_txt.py: {len(wnids)} classes; {len(train_lines)} train images -> "
          f"{paths['traintxt_filename']}; {len(val_lines)} validation images -> "
          f"{paths['valtxt_filename']}; class names -> {words_file}")


if __name__ == '__main__':
    run_main(main)
