"""Label files that line up with the batch files: batch i's labels are labels[i*256:(i+1)*256].

    python preprocessing/make_labels.py                    # paths from preprocessing/paths.yaml
    python preprocessing/make_labels.py --paths other.yaml

Works from any folder. Run after make_hkl.py (which fixes the training order) and
make_train_val_txt.py (which gives each image its label). Writes, as int64 arrays:

  {tar_root_dir}/labels/train_labels.npy   the labels of every training image in the shuffled
                                           order of misc/shuffled_train_filenames.npy -- all of
                                           them, also those of the dropped last partial batch
                                           (and beyond the toy subset), so the same file serves
                                           the toy and the full batches
  {tar_root_dir}/labels/val_labels.npy     the labels of the validation images in sorted order,
                                           one per image of the validation batches

Images that `make_hkl.py --skip-bad` left out (misc/skipped_{train,val}_images.txt) are left
out here too, so the labels stay aligned with the batches. Ends with a summary of the outputs.
"""
import argparse
import os

import numpy as np


from alexnet_lib.imagenet import (PrepError, add_paths_argument, load_paths,
                                  load_shuffled_train_list, read_skipped, require_file,
                                  run_main, save_npy, skipped_report_file)


def read_label_list(txt_file):
    """[(name, label), ...] of a caffe-style list written by make_train_val_txt.py."""
    pairs = []
    with open(txt_file) as f:
        for number, line in enumerate(f, 1):
            name, _, label = line.rstrip('\n').rpartition(' ')
            if not name or not label.isdigit():
                raise PrepError(f"{txt_file}, line {number}: {line.strip()!r} is not "
                                f"'file label': re-run make_train_val_txt.py")
            pairs.append((name, int(label)))
    return pairs


def count_batches(folder):
    if not os.path.isdir(folder):
        return 0
    return sum(1 for n in os.listdir(folder) if n.endswith('.hkl'))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_paths_argument(parser)
    args = parser.parse_args()

    paths = load_paths(args.paths)
    hint = ': run make_train_val_txt.py first'
    train_txt = require_file(paths, 'traintxt_filename', hint)
    val_txt = require_file(paths, 'valtxt_filename', hint)

    label_of = dict(read_label_list(train_txt))
    skipped = read_skipped(skipped_report_file(paths, 'train'))
    train_labels = []
    for name in load_shuffled_train_list(paths):
        if name in skipped:
            continue
        if name not in label_of:
            raise PrepError(f"{train_txt} has no line for {name} of "
                            f"misc/shuffled_train_filenames.npy: re-run make_train_val_txt.py "
                            f"on the same train_img_dir")
        train_labels.append(label_of[name])

    skipped = read_skipped(skipped_report_file(paths, 'val'))
    val_labels = [label for name, label in read_label_list(val_txt) if name not in skipped]

    train_file = os.path.join(paths['labels_dir'], 'train_labels.npy')
    val_file = os.path.join(paths['labels_dir'], 'val_labels.npy')
    save_npy(train_file, np.asarray(train_labels, np.int64))
    save_npy(val_file, np.asarray(val_labels, np.int64))
    print(f"make_labels.py: {len(train_labels)} train labels -> {train_file}; "
          f"{len(val_labels)} validation labels -> {val_file}")

    print("outputs:")
    for name, folder in (('train batches', paths['train_batch_dir']),
                         ('val batches', paths['val_batch_dir'])):
        print(f"  {name + ':':15s}{folder}  ({count_batches(folder)} files)")
    print(f"  {'labels:':15s}{paths['labels_dir']}")
    print(f"  {'mean image:':15s}{os.path.join(paths['misc_dir'], 'img_mean.npy')}")


if __name__ == '__main__':
    run_main(main)
