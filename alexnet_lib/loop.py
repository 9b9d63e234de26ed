"""The training loop: one replica's training, shared by train.py (one replica) and
train_2gpu.py (one trainer process per GPU, exchanging weights after every minibatch).

    from alexnet_lib.loop import train
    train(cfg)                                      # one replica on cfg['gpu']
    train(cfg, rank, world, device, exchanger)      # replica `rank` of `world`

Each epoch visits every training batch file (in a new order per epoch when shuffle: True) as
if they were one sequence of images, in steps of world * batch_size images (several steps per
file, or one step over several files for a large global batch). Replica r reads its rows of each
step and uses its slice of the step's random draws, which are made for the whole global batch from
a generator seeded by (seed, epoch, step). After each epoch: validation over every validation
image, val_record.npy and metrics.csv, the learning-rate policy, and a snapshot.
"""
import contextlib
import csv
import math
import os
import signal
import sys
import threading
import time

import numpy as np
import torch

from alex_net import AlexNet
from alexnet_lib.config import resolve_device
from alexnet_lib.data import RunData, SerialLoader
from alexnet_lib.errors import UserError
from alexnet_lib.exchange_rules import make_rule
from alexnet_lib.files import atomic_write
from alexnet_lib.sgd import adjust_learning_rate, warmup_factor
from alexnet_lib.snapshot import (SnapshotError, exchange_file, latest_complete_snapshot,
                                  load_array, load_snapshot, lr_file, prune_snapshots,
                                  replica_file, save_array, save_snapshot, progress_in)
from alexnet_lib.step import (Averaging, TrainStep, UpdateRule, amp_dtype_of, compile_cache,
                              configure_device, eval_batch, precision_of)

METRICS_FIELDS = ['epoch', 'lr', 'train_loss', 'val_top1_error', 'val_top5_error', 'val_loss',
                  'images_per_s', 'wall_time_s']


class TrainingStopped(UserError):
    """Training cannot go on (a NaN loss, say); the message says where and what is left."""


class Preempted(UserError):
    """SIGTERM arrived: the current step was finished and a resumable snapshot written."""
    prefix = 'preempted'
    exit_status = 143    # 128 + SIGTERM, as a process ended by the signal


STOP_CHECK_EVERY = 10   # replicas agree on a SIGTERM at steps that are multiples of this,
                        # and at the end of every epoch


class Replica:
    """One replica of a run: its data (data.RunData: the files and the epoch plan), its network
    and training step (step.TrainStep), and what a run does between steps: epochs, validation,
    the learning-rate schedule, snapshots, preemption."""

    def __init__(self, cfg, rank=0, world=1, device=None, exchanger=None, log=None,
                 for_training=True):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = resolve_device(device or cfg['gpu'])
        if self.device.type == 'cuda':
            torch.cuda.set_device(self.device)
        self.exchanger = exchanger
        self.lead = rank == 0
        self.log = log or (lambda *a: print(*a, flush=True) if self.lead else None)
        self.precision = precision_of(cfg['precision'], self.device)
        self.amp_dtype = amp_dtype_of(self.precision)
        configure_device(self.device, self.precision)
        self.data = RunData(cfg, world, self.device, for_training, rank)
        # a resumed run and validation load every parameter from a snapshot: no initial draw
        self.net = AlexNet(self.device, init=for_training and not cfg['resume_train'],
                           n_classes=cfg['n_classes'])
        self.compiled = (self.device.type == 'cuda' if cfg['compile'] == 'auto'
                         else cfg['compile'])
        graph = cfg['cuda_graph']
        # an exchange rule (elastic, gossip, outer) runs between steps; weights and gradients
        # are averaged by the step itself
        self.rule = None if exchanger is None else make_rule(
            cfg['average'], self.net, exchanger, seed=cfg['seed'], every=cfg['exchange_freq'],
            elastic_alpha=cfg['elastic_alpha'], gossip_p=cfg['gossip_p'],
            outer_lr=cfg['outer_lr'], outer_momentum=cfg['outer_momentum'])
        averaging = None if exchanger is None or self.rule is not None else Averaging(
            exchanger, cfg['average'], cfg['exchange_freq'],
            torch.bfloat16 if cfg['exchange_dtype'] == 'bf16' else torch.float32)
        self.step = TrainStep(
            self.net, self.data.mean,
            UpdateRule(cfg['momentum'], cfg['weight_decay'], cfg['use_momentum'],
                       cfg['use_nesterov_momentum']),
            precision=self.precision, compiled=self.compiled,
            graphed=graph is True or (graph == 'auto' and self.compiled), averaging=averaging)
        self.compile_started = time.time() if self.compiled else None
        self.warmup_steps = round(cfg['lr_warmup_epochs'] * self.data.steps_per_epoch) \
            if for_training else 0

    def make_loader(self):
        if not self.cfg['para_load']:
            return SerialLoader(self.device)
        from alexnet_lib.parallel import ParallelLoader
        return ParallelLoader(self.device, max_rows=self.data.batch,
                              prefetch=self.cfg['prefetch'])

    # -- training ---------------------------------------------------------------------------
    def train_epoch(self, epoch, lr, loader, progress=True, requests=None, start_step=0,
                    stop=None):
        """Train over the epoch's steps (or the given requests) at the epoch's rate lr (times
        the warm-up's factor in the run's first steps); returns the mean training loss, train
        error and images/s over all replicas."""
        cfg, data = self.cfg, self.data
        requests = data.train_requests(epoch) if requests is None else requests
        steps_in_epoch = len(requests)
        requests = requests[start_step:]
        if not requests:    # resumed after the last step of this epoch plan
            return math.nan, math.nan, math.nan
        loss_sum = torch.zeros((), device=self.device)
        err_sum = torch.zeros((), device=self.device)
        bar = None
        if progress and self.lead:
            from tqdm import tqdm
            bar = tqdm(total=len(requests), desc=f"epoch {epoch}", unit='it', leave=False,
                       mininterval=1.0, file=sys.stderr)
        n_prev = steps_in_epoch * (epoch - 1) + start_step
        t0 = t_print = time.time()
        since_print = 0
        try:
            with loader.feed([r[:3] for r in requests]) as feed:
                for step, request in enumerate(requests, start_step):
                    iteration = n_prev + step - start_step      # from the run's first step
                    self.step.set_lr(lr * warmup_factor(iteration, self.warmup_steps))
                    batch = data.train_batch(feed.take(), request, epoch, step)
                    loss, errors = self.step(batch, step)
                    feed.release()      # refilled once the step's GPU work, queued now, is done
                    if self.rule is not None:
                        self.rule.after_step(epoch, step)
                    if self.step.notice is not None:
                        self.log(self.step.notice)
                        self.step.notice = None
                    if self.compile_started is not None and self.step.ready:
                        self.log_compile_time()
                    loss_sum += loss
                    err_sum += errors
                    since_print += 1
                    # a stop at the epoch's last step waits for the epoch's end (train() checks
                    # there): the epoch is validated and its snapshot is an ordinary one
                    if stop is not None and step + 1 < steps_in_epoch and \
                            self.agreed_stop(stop, step):
                        self.preempt(epoch, step + 1, lr)
                    if bar is not None:
                        bar.update(1)
                    if (iteration + 1) % cfg['print_freq'] == 0:
                        self.print_progress(iteration + 1, epoch, loss, errors, since_print,
                                            time.time() - t_print, bar)
                        t_print, since_print = time.time(), 0
        finally:   # an error leaves no half-drawn progress bar before its message
            if bar is not None:
                bar.close()
        elapsed = time.time() - t0
        n = len(requests) * data.batch
        totals = [float(loss_sum) * data.batch, float(err_sum), float(n)]
        if self.exchanger:
            totals = self.exchanger.all_sum(totals)
        train_loss = totals[0] / totals[2]
        self.check_finite(train_loss, epoch, n_prev + len(requests))
        return train_loss, totals[1] / totals[2], len(requests) * data.global_batch / elapsed

    def print_progress(self, iteration, epoch, loss, errors, steps, seconds, bar):
        cost = float(loss)
        self.check_finite(cost, epoch, iteration)
        msg = (f"iter {iteration} | cost {cost:.4f}"
               + (f" | train error {float(errors) / self.data.batch:.4f}"
                  if self.cfg['print_train_error'] else '')
               + f" | {steps * self.data.global_batch / seconds:.0f} img/s"
               f" | {seconds / steps:.3f} s per iter | lr {float(self.step.lr):g}")
        if bar is not None:
            bar.write(msg)
        else:
            self.log(msg)

    def log_compile_time(self):
        """After the first compiled steps (and the graph's capture): how long it took (once)."""
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        self.log(f"compiled the training step in {time.time() - self.compile_started:.0f} s"
                 + (" and captured it as a CUDA graph" if self.step.graphed else ""))
        self.compile_started = None

    def agreed_stop(self, stop, step=None):
        """Whether to stop after this step: at once for one replica; for several, at the next
        step that is a multiple of STOP_CHECK_EVERY, once any of them was asked to. step None:
        at the end of an epoch, where every replica checks."""
        if not self.exchanger or self.world == 1:
            return stop.is_set()
        if step is not None and (step + 1) % STOP_CHECK_EVERY:
            return False
        return self.exchanger.all_sum([float(stop.is_set())])[0] > 0

    def preempt_after_epoch(self, epoch, lr_next):
        """SIGTERM seen at the end of an epoch: its snapshot (written now if snapshot_freq
        skipped it) is complete; resuming starts the next epoch."""
        wd = self.cfg['weights_dir']
        if epoch % self.cfg['snapshot_freq']:
            self.snapshot(epoch, lr_next)
        if self.exchanger:
            self.exchanger.barrier()
        raise Preempted(f"SIGTERM: stopped after epoch {epoch} and wrote a resumable snapshot "
                        f"to {wd}; resume with resume_train=True load_epoch={epoch}")

    def preempt(self, epoch, steps_done, lr):
        wd = self.cfg['weights_dir']
        self.snapshot(epoch, lr, (steps_done, self.data.global_batch))
        if self.exchanger:
            self.exchanger.barrier()   # every replica leaves after the snapshot is complete
        raise Preempted(f"SIGTERM: stopped after step {steps_done} of epoch {epoch} and wrote a "
                        f"resumable snapshot to {wd}; resume with resume_train=True "
                        f"load_epoch={epoch}")

    def check_finite(self, value, epoch, iteration, what='training loss'):
        """TrainingStopped unless value is finite; iteration None: after the epoch."""
        if math.isfinite(value):
            return
        wd = self.cfg['weights_dir']
        last = latest_complete_snapshot(wd)
        # a resumed run takes its learning rate from the snapshot's lr file, not the config
        where = (f"the last good snapshot is epoch {last} in {wd}; lower the learning rate it "
                 f"holds ({lr_file(wd, last)}) and resume with resume_train=True "
                 f"load_epoch={last}" if last is not None else
                 "no snapshot was written yet; start again with a lower learning_rate "
                 "(and overwrite=True)")
        when = (f"at iteration {iteration} (epoch {epoch})" if iteration is not None
                else f"after epoch {epoch}")
        raise TrainingStopped(f"the {what} became {value} {when}; stopped instead of training "
                              f"on garbage: {where}")

    def validate(self, loader):
        """(top-1 error, top-5 error, mean loss, images) over every validation image; top-5
        is None with 5 classes or fewer."""
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        requests = self.data.val_requests()
        with loader.feed([r[:3] for r in requests]) as feed:
            for _, a, b, off in requests:
                images = feed.take()
                labels = self.data.val_labels[off + a:off + b].to(self.device)
                totals += eval_batch(self.net.layer_params, images, labels, self.data.mean,
                                     self.amp_dtype)
                feed.release()
        n = sum(b - a for _, a, b, _ in requests)
        sums = totals.tolist() + [float(n)]
        if self.exchanger:
            sums = self.exchanger.all_sum(sums)
        loss, top1, top5, count = sums
        # top-5 says something only with more than 5 classes
        top5 = top5 / count if self.cfg['n_classes'] > 5 else None
        return top1 / count, top5, loss / count, int(count)

    # -- the run ----------------------------------------------------------------------------
    def resume_or_start(self):
        """(first epoch, its first step, lr, val_record rows) — from snapshot load_epoch when
        resuming; a mid-epoch snapshot (preempted run) continues its epoch."""
        cfg = self.cfg
        if not cfg['resume_train']:
            return 1, 0, cfg['learning_rate'], []
        e, wd = cfg['load_epoch'], cfg['weights_dir']
        lr = load_snapshot(wd, e, self.net)
        if self.rule is not None:
            self.load_rule_state(wd, e)
        progress = progress_in(wd, e)
        epochs_recorded = e if progress is None else e - 1
        path = os.path.join(wd, 'val_record.npy')
        record = []
        if epochs_recorded:
            record = load_array(path, what='val_record').reshape(-1, 2).tolist()
            if len(record) < epochs_recorded:
                raise SnapshotError(f"{path} has {len(record)} epochs; resuming after epoch "
                                    f"{epochs_recorded} needs {epochs_recorded}")
        if progress is None:
            self.log(f"resumed from snapshot {e} in {wd} (lr {lr:g})")
            return e + 1, 0, lr, record[:e]
        steps, per_step = progress
        self.log(f"resumed from snapshot {e} in {wd}, taken after step {steps} of epoch {e} "
                 f"(lr {lr:g})")
        return e, self.first_step_left(e, steps * (per_step or self.data.global_batch)), lr, \
            record[:e - 1]

    def first_step_left(self, epoch, images_done):
        """The step of this run's epoch plan that begins with the first image of ``epoch`` not
        trained yet: the steps run over the epoch's images in one order whatever the global
        batch, so a snapshot resumes with other replicas or another batch_size too."""
        size, steps = self.data.global_batch, self.data.steps_per_epoch
        step = min(images_done // size, steps)
        if step == steps:
            self.log(f"notice: the snapshot was taken after {images_done} images of epoch "
                     f"{epoch}: no step of {size} images is left in it")
        elif step * size != images_done:
            self.log(f"notice: the snapshot was taken after {images_done} images of epoch "
                     f"{epoch}, not a whole number of steps of {size}: images "
                     f"{step * size}..{images_done - 1} are trained again")
        return step

    def end_of_epoch(self, epoch, lr_next, record, row):
        """Every replica: val_record.npy, metrics.csv and the snapshot (the lead writes them)."""
        wd = self.cfg['weights_dir']
        if self.lead:
            os.makedirs(wd, exist_ok=True)
            save_array(os.path.join(wd, 'val_record.npy'), np.array(record, np.float32))
            write_metrics(os.path.join(wd, 'metrics.csv'), epoch, row)
        if epoch % self.cfg['snapshot_freq'] == 0:
            self.snapshot(epoch, lr_next)
            if self.lead and self.cfg['keep_snapshots'] != 'all':
                prune_snapshots(wd, self.cfg['keep_snapshots'], [r[0] for r in record])

    def result(self):
        """A context in which net.params hold the run's model: the exchange rule's (its centre,
        say) where replicas differ, else the replica's own weights."""
        return contextlib.nullcontext() if self.rule is None else self.rule.result()

    def snapshot(self, epoch, lr, progress=None):
        """Every replica: snapshot `epoch`, written by the lead; under an exchange rule each
        replica first writes its own weights and momentum, and the lead the rule's state."""
        wd = self.cfg['weights_dir']
        shared = {}
        if self.rule is not None:
            os.makedirs(wd, exist_ok=True)
            save_array(replica_file(wd, self.rank, epoch), self.net.state.cpu().numpy())
            if self.lead:       # the rule's state is the same on every replica
                shared = {k: t.cpu().numpy() for k, t in self.rule.shared_state().items()}
            self.exchanger.barrier()
        with self.result():
            if self.lead:
                save_snapshot(wd, epoch, self.net, lr, progress, shared)

    def load_rule_state(self, wd, epoch):
        """This replica's own weights and momentum and the rule's state from snapshot `epoch`."""
        path = replica_file(wd, self.rank, epoch)
        if not os.path.exists(path) or (self.lead and os.path.exists(
                replica_file(wd, self.world, epoch))):
            raise SnapshotError(
                f"snapshot {epoch} in {wd} was not written by {self.world} replicas under "
                f"average: {self.rule.name} ({os.path.basename(path)} and no replica_"
                f"{self.world}_{epoch}.npy expected); resume with the average and the number "
                f"of replicas it was trained with")
        state = self.net.state
        state.copy_(torch.from_numpy(load_array(path, tuple(state.shape), 'replica')))
        for name, t in self.rule.shared_state().items():
            t.copy_(torch.from_numpy(load_array(exchange_file(wd, name, epoch), tuple(t.shape),
                                                'exchange state')))


def write_metrics(path, epoch, row):
    """Append the epoch's row, dropping rows of this epoch or later (left by a resumed run)."""
    rows = []
    if os.path.exists(path):
        with open(path, newline='') as f:
            rows = [r for r in csv.DictReader(f) if r.get('epoch', '').isdigit()
                    and int(r['epoch']) < epoch]
    # the learning rate is float32: written as float32 prints it, 0.01 not 0.009999999776482582
    lr, *rest = row
    rows.append(dict(zip(METRICS_FIELDS, [epoch, str(np.float32(lr))] +
                         ['' if v is None else v for v in rest])))

    def write(tmp):
        with open(tmp, 'w', newline='') as f:
            w = csv.DictWriter(f, METRICS_FIELDS)
            w.writeheader()
            w.writerows(rows)
    try:
        atomic_write(path, write)
    except OSError as e:
        raise SnapshotError(f"cannot write {path} (disk full?): {e.strerror or e}") from None


def train(cfg, rank=0, world=1, device=None, exchanger=None, progress=True):
    """Train one replica for cfg['n_epochs'] epochs; returns the Replica."""
    rep = Replica(cfg, rank, world, device, exchanger)
    first, start_step, lr, record = rep.resume_or_start()
    stop = threading.Event()   # set by SIGTERM (what a cluster sends before it kills a job)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if exchanger and rep.rule is not None and cfg['resume_train']:
        for name, t in rep.rule.shared_state().items():     # the replicas differ
            exchanger.check_identical(t, f"the exchange rule's {name}")
    elif exchanger:
        exchanger.check_identical(rep.net.state, 'parameters and momentum')
    data = rep.data
    n_files = len(data.train_files)
    rep.log(f"training on {rep.device} x{world}: {n_files} batch file{'s' * (n_files != 1)}, "
            f"{data.steps_per_epoch} steps of {data.global_batch} images per "
            f"epoch, precision {rep.precision}"
            + (f", lr warm-up over {rep.warmup_steps} steps" if rep.warmup_steps else ''))
    if rep.compiled:
        rep.log(f"compiling the training step (torch.compile): about a minute on a first run, "
                f"seconds once PyTorch's cache ({compile_cache()}) has it")
    with rep.make_loader() as loader:
        for epoch in range(first, cfg['n_epochs'] + 1):
            t0 = time.time()
            train_loss, train_err, ips = rep.train_epoch(epoch, lr, loader, progress,
                                                         start_step=start_step, stop=stop)
            start_step = 0
            with rep.result():
                top1, top5, val_loss, n = rep.validate(loader)
            # weights spoilt by the epoch's last steps: no snapshot of them
            rep.check_finite(val_loss, epoch, None, 'validation loss')
            record.append([top1, val_loss])
            lr_next = float(np.float32(adjust_learning_rate(cfg, epoch, lr,
                                                            [r[0] for r in record])))
            top5_text = f" top-5 error {top5:.4f}" if top5 is not None else ''
            rep.log(f"epoch {epoch}: train loss {train_loss:.4f} | validation top-1 error "
                    f"{top1:.4f}{top5_text} loss {val_loss:.4f} ({n} images) | "
                    f"{ips:.0f} img/s | lr {lr:g}")
            rep.end_of_epoch(epoch, lr_next, record,
                             [lr, train_loss, top1, top5, val_loss, ips, time.time() - t0])
            lr = lr_next
            if epoch < cfg['n_epochs'] and rep.agreed_stop(stop):
                rep.preempt_after_epoch(epoch, lr_next)
    return rep
