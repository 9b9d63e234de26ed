"""Evaluate snapshot load_epoch of weights_dir on the validation set (centre crops, no mirror).

    python validate.py spec_toy.yaml load_epoch=5 gpu=cpu   # the quickstart's run
    python validate.py my_data.yaml load_epoch=20            # your data and weights_dir
    python validate.py pretrained/alexnet/config.yaml val_folder=VAL label_folder=LABELS

The validation data (val_folder, label_folder, mean_file) must come from one preprocessing
output, and from the one the run trained on when weights_dir says which (trained_on.json).
Prints the top-1 and top-5 error (top-5 only with more than 5 classes) and the loss (with a
notice when the snapshot was written in the middle of an epoch, by a stopped run), and as its
very last line one JSON object:
{"top1_error": ..., "top5_error": ... or null, "loss": ..., "images": ...}
"""
import json
import sys

from alexnet_lib.config import command_line
from alexnet_lib.errors import run_main
from alexnet_lib.provenance import check_trained_on
from alexnet_lib.snapshot import load_snapshot, progress_in
from alexnet_lib.loop import Replica


def evaluate(cfg):
    rep = Replica(cfg, for_training=False)
    check_trained_on(cfg['weights_dir'], rep.data.record,
                     ('val_folder', 'label_folder', 'mean_file'))
    load_snapshot(cfg['weights_dir'], cfg['load_epoch'], rep.net, with_momentum=False)
    progress = progress_in(cfg['weights_dir'], cfg['load_epoch'])
    if progress is not None:
        e = cfg['load_epoch']
        print(f"notice: snapshot {e} was written in the middle of epoch {e} (a run stopped "
              f"after {progress[0]} of its steps): these are weights part way through that "
              f"epoch; resuming the run (resume_train=True load_epoch={e}) finishes it",
              file=sys.stderr)
    with rep.make_loader() as loader:
        top1, top5, loss, n = rep.validate(loader)
    top5_text = (f"top-5 error {top5:.4f}, " if top5 is not None else
                 f"(no top-5 error with {cfg['n_classes']} classes), ")
    print(f"snapshot {cfg['load_epoch']} of {cfg['weights_dir']} on {n} validation images: "
          f"top-1 error {top1:.4f}, {top5_text}loss {loss:.4f}")
    print(json.dumps({"top1_error": top1, "top5_error": top5, "loss": loss, "images": n}))
    return top1, top5, loss, n


def main(argv):
    run_main(lambda: evaluate(command_line('spec_1gpu.yaml', argv, __doc__)))


if __name__ == '__main__':
    main(sys.argv[1:])
