"""Evaluate snapshot load_epoch of weights_dir on the validation set (centre crops, no mirror).

    python validate.py load_epoch=4                 # config.yaml + spec_1gpu.yaml + overrides
    python validate.py spec_toy.yaml load_epoch=4 gpu=cpu
    python validate.py weights_dir=pretrained/alexnet/weights load_epoch=65

Prints the top-1 and top-5 error and the loss, and as its very last line one JSON object:
{"top1_error": ..., "top5_error": ..., "loss": ..., "images": ...}
"""
import json
import sys

from alexnet_lib.config import command_line
from alexnet_lib.errors import run_main
from alexnet_lib.snapshot import load_snapshot
from alexnet_lib.loop import Replica


def evaluate(cfg):
    rep = Replica(cfg, for_training=False)
    load_snapshot(cfg['weights_dir'], cfg['load_epoch'], rep.net, with_momentum=False)
    with rep.make_loader() as loader:
        top1, top5, loss, n = rep.validate(loader)
    print(f"snapshot {cfg['load_epoch']} of {cfg['weights_dir']} on {n} validation images: "
          f"top-1 error {top1:.4f}, top-5 error {top5:.4f}, loss {loss:.4f}")
    print(json.dumps({"top1_error": top1, "top5_error": top5, "loss": loss, "images": n}))
    return top1, top5, loss, n


def main(argv):
    run_main(lambda: evaluate(command_line('spec_1gpu.yaml', argv, __doc__)))


if __name__ == '__main__':
    main(sys.argv[1:])
