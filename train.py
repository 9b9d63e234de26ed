"""Train AlexNet on one GPU (or the CPU), as the original train.py.

    python train.py                              # config.yaml + spec_1gpu.yaml
    python train.py n_epochs=2 gpu=cpu           # any key can be overridden: key=value
    python train.py spec_toy.yaml gpu=cpu        # extra yaml files are merged in order
    python train.py resume_train=True load_epoch=20
    python train.py my_data.yaml resume_train=auto  # resume if weights_dir has a snapshot, else
                                                    # start (restarted or requeued jobs)

The data keys (train_folder, val_folder, label_folder, mean_file) name your preprocessing
output; the quickstart's toy data is named by spec_toy.yaml. Before the first step the data
folders are checked to come from one preprocessing output, weights_dir to be writable and not
another run's, and a block says which config files were merged, where the run writes and how
much disk its snapshots take. Each epoch prints the iteration, cost, train error and images/s
every print_freq iterations, then the validation top-1/top-5 error and loss; weights_dir
receives val_record.npy, metrics.csv and a snapshot every snapshot_freq epochs (plot them with
plot.py).
"""
import sys

from alexnet_lib.config import command_line
from alexnet_lib.data import RunData
from alexnet_lib.errors import run_main
from alexnet_lib.loop import train
from alexnet_lib.run_folder import claim


def run(cfg):
    with claim(cfg, RunData(cfg)) as run_cfg:
        if run_cfg is not None:
            train(run_cfg)


def main(argv):
    run_main(lambda: run(command_line('spec_1gpu.yaml', argv, __doc__)))


if __name__ == '__main__':
    main(sys.argv[1:])
