"""Label files that line up with the batch files: batch i's labels are labels[i*256:(i+1)*256].

    python preprocessing/make_labels.py                    # paths from preprocessing/paths.yaml
    python preprocessing/make_labels.py --paths other.yaml

Works from any folder. Run after make_train_val_txt.py (which gives each image its label) and
make_hkl.py (which fixes the training order, cuts the batches and records what it cut them
from in preprocessing.json). Writes, as int64 arrays, exactly as many labels as that record
allows:

  {tar_root_dir}/labels/train_labels.npy   one label per image of the training order the
                                           batches were cut from (misc/shuffled_train_filenames.npy;
                                           after a toy run its first 2560 images): those of the
                                           dropped last partial batch included (up to 255 past
                                           the last full batch), nothing beyond
  {tar_root_dir}/labels/val_labels.npy     one label per validation image of the validation
                                           batches, in sorted order
  {tar_root_dir}/labels/preprocessing.json the record of the batch folders, written last: the
                                           labels belong to that output

Images that `make_hkl.py --skip-bad` left out (misc/skipped_{train,val}_images.txt) are left
out here too, so the labels stay aligned with the batches. The image lists are checked against
the record (count and sha1 of the names); batches without a record (made by an older version,
or by a make_hkl.py that did not finish) are refused. Ends with a summary of the outputs.
"""
import argparse
import os

import numpy as np


from alexnet_lib.imagenet import (PrepError, add_paths_argument, load_paths,
                                  load_shuffled_train_list, plural, read_skipped, remove_records,
                                  require_file, run_main, save_npy, shuffled_train_file,
                                  skipped_report_file, write_record)
from alexnet_lib.provenance import RECORD_NAME, fingerprint, read_record, record_path


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


def batch_record(paths):
    """The record make_hkl.py left in the batch folders and misc_dir, the same in all three."""
    train_out = paths['train_batch_dir']
    record = read_record(train_out)
    if record is None:
        raise PrepError(f"{train_out} has no {RECORD_NAME}, the record make_hkl.py writes once "
                        f"its batches are complete (these were made by an older version, or "
                        f"make_hkl.py did not finish): run make_hkl.py first")
    for folder in (paths['val_batch_dir'], paths['misc_dir']):
        other = read_record(folder)
        if other != record:
            state = 'is missing' if other is None else f"differs from {record_path(train_out)}"
            raise PrepError(f"{record_path(folder)} {state}: make_hkl.py did not finish, or the "
                            f"folders come from different runs: run make_hkl.py again, then "
                            f"make_labels.py")
    return record


def check_list(names, record, split, source, folder, rerun):
    """``names`` (the first record[..._images] images that ``source`` gives) must be those the
    record fingerprints: one line naming both otherwise."""
    n, key, what = (('train_images', 'train_order_sha1', 'order the training batches') if
                    split == 'train' else
                    ('val_images', 'val_list_sha1', 'validation images the batches'))
    mine = fingerprint(names)
    if len(names) == record[n] and mine == record[key]:
        return
    verb = 'is' if split == 'train' else 'are'
    raise PrepError(f"{source} ({len(names)} images, sha1 {mine[:8]}) {verb} not the {what} "
                    f"were cut from ({record_path(folder)}: {record[n]} images, sha1 "
                    f"{record[key][:8]}): {rerun}")


def less_skipped(report):
    return f" less the images of {report}" if os.path.exists(report) else ''


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_paths_argument(parser)
    args = parser.parse_args()

    paths = load_paths(args.paths)
    hint = ': run make_train_val_txt.py first'
    train_txt = require_file(paths, 'traintxt_filename', hint)
    val_txt = require_file(paths, 'valtxt_filename', hint)
    record = batch_record(paths)

    # training: the order, less the images left out, as far as the record's count goes (a toy
    # run's subset is the first 2560 of the order, less those left out of it)
    report = skipped_report_file(paths, 'train')
    skipped = read_skipped(report)
    order = [name for name in load_shuffled_train_list(paths) if name not in skipped]
    train_names = order[:record['train_images']]
    check_list(train_names, record, 'train',
               f"the training order of {shuffled_train_file(paths)}{less_skipped(report)}",
               paths['train_batch_dir'],
               "run make_hkl.py again with the same paths and mode (if a skipped-images report "
               "was deleted since, delete the batch folders first), then make_labels.py")
    label_of = dict(read_label_list(train_txt))
    train_labels = []
    for name in train_names:
        if name not in label_of:
            raise PrepError(f"{train_txt} has no line for {name} of "
                            f"misc/shuffled_train_filenames.npy: re-run make_train_val_txt.py "
                            f"on the same train_img_dir")
        train_labels.append(label_of[name])

    report = skipped_report_file(paths, 'val')
    skipped = read_skipped(report)
    val_pairs = [(name, label) for name, label in read_label_list(val_txt)
                 if name not in skipped][:record['val_images']]
    check_list([name for name, _ in val_pairs], record, 'val',
               f"the validation images of {val_txt}{less_skipped(report)}",
               paths['val_batch_dir'],
               "run make_train_val_txt.py and make_hkl.py again with the same paths and mode "
               "(generate_data.sh or generate_toy_data.sh), then make_labels.py")
    val_labels = [label for _, label in val_pairs]

    labels_dir = paths['labels_dir']
    remove_records(labels_dir)
    train_file = os.path.join(labels_dir, 'train_labels.npy')
    val_file = os.path.join(labels_dir, 'val_labels.npy')
    save_npy(train_file, np.asarray(train_labels, np.int64))
    save_npy(val_file, np.asarray(val_labels, np.int64))
    write_record(labels_dir, record)
    print(f"make_labels.py: {len(train_labels)} train labels -> {train_file}; "
          f"{len(val_labels)} validation labels -> {val_file}; {RECORD_NAME} as the batches'")

    print("outputs:")
    for name, folder in (('train batches', paths['train_batch_dir']),
                         ('val batches', paths['val_batch_dir'])):
        print(f"  {name + ':':15s}{folder}  ({plural(count_batches(folder), 'file')})")
    print(f"  {'labels:':15s}{labels_dir}")
    print(f"  {'mean image:':15s}{os.path.join(paths['misc_dir'], 'img_mean.npy')}")


if __name__ == '__main__':
    run_main(main)
