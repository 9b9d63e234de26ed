"""Train AlexNet on one GPU (or the CPU), as the original train.py.

    python train.py                              # config.yaml + spec_1gpu.yaml
    python train.py n_epochs=2 gpu=cpu           # any key can be overridden: key=value
    python train.py spec_toy.yaml gpu=cpu        # extra yaml files are merged in order
    python train.py resume_train=True load_epoch=20

Each epoch prints the iteration, cost, train error and images/s every print_freq iterations,
then the validation top-1/top-5 error and loss; weights_dir receives val_record.npy,
metrics.csv and a snapshot every snapshot_freq epochs (plot them with plot.py).
"""
import sys

from alexnet_lib.config import command_line
from alexnet_lib.errors import run_main
from alexnet_lib.loop import train


def main(argv):
    run_main(lambda: train(command_line('spec_1gpu.yaml', argv, __doc__)))


if __name__ == '__main__':
    main(sys.argv[1:])
