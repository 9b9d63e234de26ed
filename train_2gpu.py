r"""Train AlexNet data-parallel on several GPUs (or CPU processes), as the original
train_2gpu.py: one trainer process per GPU, each with its own loader process, exchanging and
averaging weights and momentum after every minibatch (docs/design.md).

    python train_2gpu.py                               # config.yaml + spec_2gpu.yaml: gpu0, gpu1
    python train_2gpu.py gpus=[0,1,2,3] exchange=nccl  # any number of GPUs
    python train_2gpu.py gpu0=cpu gpu1=cpu exchange=host batch_size=8   # two CPU processes

Several nodes, through torchrun (one process per GPU; exchange nccl, or gloo on CPUs):

    torchrun --nproc_per_node=8 train_2gpu.py my_run.yaml exchange=nccl gpus=[0,1,2,3,4,5,6,7]
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \
        train_2gpu.py my_run.yaml exchange=nccl gpus=[0,1,2,3,4,5,6,7]  # node 0; node_rank=1: 1

batch_size is per GPU: the replicas together take batch_size x replicas images of each batch
file, replica r its own slice. How the replicas average: exchange, average, exchange_freq and
exchange_dtype below, and the exchange backends after them (what each needs and takes).
"""
import os
import sys

from alexnet_lib import exchange_backends, launch
from alexnet_lib.config import ConfigError, command_line, devices_of, resolve_device
from alexnet_lib.data import RunData
from alexnet_lib.errors import run_main
from alexnet_lib.run_folder import claim, finished_message, plan_start


CPU_HINT = 'gpus=[cpu,cpu] exchange=host (processes on the CPU)'


def trainer(rank, world, cfg, device):
    """One replica: its exchanger, then the shared training loop."""
    import torch
    from alexnet_lib.exchange import make_exchanger
    from alexnet_lib.loop import train
    if device == 'cpu':  # CPU replicas share the cores instead of each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    with make_exchanger(cfg['exchange'], rank, world, device, port=cfg['sock_gpu']) as ex:
        train(cfg, rank, world, device, ex)


def spawned_trainer(rank, world, cfg):
    trainer(rank, world, cfg, devices_of(cfg)[rank])


def run(cfg):
    devices = devices_of(cfg)
    if launch.under_torchrun():
        rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        local = int(os.environ.get('LOCAL_RANK', rank))
        problem = exchange_backends.node_problem(
            cfg['exchange'], os.environ.get('LOCAL_WORLD_SIZE', world), world) or \
            exchange_backends.replicas_problem(cfg['average'], cfg['elastic_alpha'], world)
        if problem:
            raise ConfigError(problem)
        device = devices[local] if local < len(devices) else devices[0]
        if device != 'cpu' and local >= len(devices):
            raise ConfigError(f"local rank {local} has no GPU in {devices}")
        resolve_device(device, 'gpus', cpu_hint=CPU_HINT)
        if rank == 0:      # rank 0 owns weights_dir; the others read how the run starts
            with claim(cfg, RunData(cfg, world)) as run_cfg:
                return run_cfg and trainer(rank, world, run_cfg, device)
        resume, load_epoch, _, _ = plan_start(cfg['weights_dir'], cfg['resume_train'],
                                              cfg['load_epoch'], cfg['n_epochs'],
                                              cfg['overwrite'])
        if resume and finished_message(cfg['weights_dir'], load_epoch, cfg['n_epochs']):
            return None
        run_cfg = type(cfg)(cfg, resume_train=resume, load_epoch=load_epoch)
        return trainer(rank, world, run_cfg, device)
    # a bad path, device or weights_dir is one line here, before any trainer starts
    data = RunData(cfg, len(devices))
    for device in devices:
        resolve_device(device, 'gpus', cpu_hint=CPU_HINT)
    with claim(cfg, data, len(devices)) as run_cfg:
        if run_cfg is None:
            return
        print(f"train_2gpu: {len(devices)} trainers on {devices}, exchange {cfg['exchange']}, "
              f"average {cfg['average']} every {cfg['exchange_freq']} step(s)", flush=True)
        # grace: on SIGTERM the trainers finish a few steps and write a snapshot before they
        # exit
        launch.spawn(spawned_trainer, len(devices), (run_cfg,), grace=300.0)


def main(argv):
    run_main(lambda: run(command_line('spec_2gpu.yaml', argv, __doc__)))


if __name__ == '__main__':
    main(sys.argv[1:])
