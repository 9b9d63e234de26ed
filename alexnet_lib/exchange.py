"""Averaging a flat float32 buffer across replicas: the weight exchange of data-parallel training.

    ex = make_exchanger('p2p', rank, world, device, port=5000, timeout=120.0)
    ex.average_(state)        # in place: every replica ends with the elementwise mean
    p = ex.start_average_(grad); ...; p.wait()   # the same, overlapped with other work
    ex.all_sum([loss, errors, n])
    ex.check_identical(state, 'parameters')
    ex.close()

The backends, with what each needs and takes and its fallback, are one table:
exchange_backends.BACKENDS (`python train_2gpu.py --help` prints it). Their data planes: nccl and
gloo here (torch.distributed all_reduce; gloo stages CUDA buffers through pinned host memory),
p2p in exchange_p2p.py (CUDA IPC, the original), host in exchange_rank_order.py (shared memory).

p2p and host share one average (exchange_rank_order.RankOrderAverage): double-buffered (one
barrier per exchange) and summed in rank order, so all replicas end bitwise identical. world ==
1 gives a no-op exchanger. A peer that dies or stops answering makes the next call raise
ExchangeError naming it, within the timeout (for nccl, the NCCL watchdog ends the process at the
timeout). Every rank must call average_ with buffers of the same size in the same order.

The interface of a data plane, what the Exchanger calls (exchange_control.Plane has defaults):

    Plane(ctl, device)          made on every rank; ctl: the control group (exchange_control:
                                rank, world, timeout, group, nccl_group, guard(what), barrier,
                                gather_i64, all_gather_bytes, all_min); device: the buffers'
    plane.average_(flat)        flat (1-D contiguous, float32 or a wire dtype the registry
                                lists for the backend) replaced in place by its mean over the
                                replicas, when it returns
    plane.start_average_(flat)  the same, returning an object whose wait() finishes it; flat
                                is not touched before then (Pending() when already done)
    plane.send_recv_(sends, recvs)   optional (the gossip rule): sends: [(peer, flat)],
                                recvs: [(peer, flat)] filled from that peer; every rank
                                passes the pairs that match the others', returns when all
                                arrived; the registry says which backends have it
    plane.close()               frees what it holds; called once on every rank, also after a
                                failure
    Plane.unavailable(ctl, device) -> str   optional, static: why it cannot run between these
                                replicas ('' when it can; the same answer on every rank);
                                make_exchanger then uses the registry's fallback

Failures are ExchangeError: a plane runs its collective calls inside ctl.guard(what). Adding a
backend: docs/design.md, "Adding an exchange backend".
"""
import os
import sys

import torch
import torch.distributed as dist

from alexnet_lib import exchange_backends, launch
from alexnet_lib.config import resolve_device
from alexnet_lib.exchange_control import Control, ExchangeError, Pending, Plane, stream_sync

KINDS = exchange_backends.NAMES
WIRES = {torch.float32: 'fp32', torch.bfloat16: 'bf16'}   # exchange_backends.WIRE_DTYPES


def make_exchanger(kind, rank, world, device, *, port, timeout=120.0):
    """An Exchanger for replica `rank` of `world`, averaging buffers that live on `device`.

    kind: a backend of exchange_backends.BACKENDS. port: names this group's rendezvous (see
    launch.init_distributed). timeout: seconds any wait on a peer may take."""
    backend = exchange_backends.get(kind)
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f'bad rank/world: rank {rank!r} of world {world!r}')
    device = resolve_device(device)
    if world == 1:
        return Exchanger(kind, rank, world, device)
    if backend.needs_gpus and device.type != 'cuda':
        if not backend.fallback:
            raise ValueError(f'the {kind} exchange needs CUDA buffers; device is {device} (use '
                             f"{' or '.join(exchange_backends.cpu_alternatives(kind))})")
        _warn(rank, f'{kind} needs GPUs, device is {device}: using {backend.fallback} instead')
        backend = exchange_backends.get(backend.fallback)
    if launch.under_torchrun():
        local = os.environ.get('LOCAL_WORLD_SIZE')
        problem = local and exchange_backends.node_problem(
            backend.name, local, os.environ['WORLD_SIZE'], lambda n: f'the {n} exchange')
        if problem:
            raise ValueError(problem)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    ctl = Control(rank, world, port, timeout, nccl=backend.nccl_group)
    try:
        unavailable = getattr(backend.plane_class(), 'unavailable', None)
        why_not = unavailable(ctl, device) if unavailable else ''
        if why_not and not backend.fallback:
            raise ExchangeError(f'the {backend.name} exchange cannot run here ({why_not})')
        if why_not:
            _warn(rank, f'{backend.name} cannot run here ({why_not}): using {backend.fallback}')
            backend = exchange_backends.get(backend.fallback)
        plane = backend.plane(ctl, device)
    except BaseException:
        ctl.close()
        raise
    return Exchanger(backend.name, rank, world, device, ctl, plane)


def _warn(rank, text):
    if rank == 0:
        print(f'exchange: {text}', file=sys.stderr, flush=True)


class Exchanger:
    """See make_exchanger. `kind` is the data plane actually in use ('host' after a p2p
    fallback)."""

    def __init__(self, kind, rank, world, device, ctl=None, plane=None):
        self.kind, self.rank, self.world, self.device = kind, rank, world, device
        self._ctl, self._plane = ctl, plane

    def average_(self, flat, wire_dtype=torch.float32):
        """Replace `flat` (1-D contiguous float32 on this exchanger's device) by its mean over
        the replicas. Every replica must call it, with corresponding buffers in the same order.
        wire_dtype bfloat16 (nccl, gloo): the average is taken of flat rounded to bfloat16,
        half the bytes on the wire, and written back as float32."""
        self.start_average_(flat, wire_dtype).wait()

    def start_average_(self, flat, wire_dtype=torch.float32):
        """average_, started: returns a Pending whose wait() finishes it. With nccl (and gloo on
        CPU buffers) the bytes move while the caller goes on computing, e.g. the rest of the
        backward pass; `flat` must not be touched before wait(). Other planes average at once."""
        self._check(flat)
        if self._plane is None:
            return Pending()
        wire = WIRES.get(wire_dtype)
        if wire is None:
            raise ValueError(f"average_: wire dtype {wire_dtype} is not one of "
                             f"{', '.join(map(str, WIRES))}")
        problem = exchange_backends.wire_problem(self.kind, wire)
        if problem:
            raise ValueError(problem)
        if wire_dtype == torch.float32:
            return self._plane.start_average_(flat)
        on_wire = flat.to(wire_dtype)
        return Pending(self._plane.start_average_(on_wire), lambda: flat.copy_(on_wire))

    def _check(self, flat):
        if not isinstance(flat, torch.Tensor):
            raise TypeError(f'average_ needs a torch.Tensor, got {type(flat).__name__}')
        if flat.dtype != torch.float32 or flat.dim() != 1 or not flat.is_contiguous():
            raise ValueError('average_ needs a 1-D contiguous float32 tensor, got {} of shape '
                             '{}{}'.format(flat.dtype, tuple(flat.shape),
                                           '' if flat.is_contiguous() else ' (not contiguous)'))
        if resolve_device(flat.device) != self.device:
            raise ValueError(f'average_: the buffer is on {flat.device} but this exchanger was '
                             f'made for {self.device}')

    def send_recv_(self, sends, recvs):
        """Point-to-point: send each (peer, flat) of `sends` and fill each (peer, flat) of
        `recvs` from its peer (float32, 1-D, contiguous, on this exchanger's device); returns
        once everything arrived. Every pair must be matched by the peer's own call."""
        for _, flat in sends + recvs:
            self._check(flat)
        if self._plane is not None and (sends or recvs):
            self._plane.send_recv_(sends, recvs)

    def all_sum(self, values):
        """Sum a short list of numbers over the replicas (float64); returns a list of floats."""
        values = [float(v) for v in values]
        return values if self._ctl is None else self._ctl.all_sum(values)

    def check_identical(self, flat, what='parameters'):
        """Raise ExchangeError naming the ranks whose `flat` differs (SHA-256 of the bytes)."""
        if self._ctl is not None:
            self._ctl.check_identical(flat, what)

    def barrier(self):
        if self._ctl is not None:
            self._ctl.barrier()

    def close(self):
        plane, ctl = self._plane, self._ctl
        self._plane = self._ctl = None
        try:
            if plane is not None:
                plane.close()
        finally:
            if ctl is not None:
                ctl.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f'Exchanger(kind={self.kind!r}, rank={self.rank}, world={self.world}, '
                f'device={self.device})')


# ----------------------------------------------------------------------------------------------
# the collective backends: torch.distributed all_reduce

def _send_recv(ctl, sends, recvs, group, what):
    ops = ([dist.P2POp(dist.isend, flat, peer, group) for peer, flat in sends]
           + [dist.P2POp(dist.irecv, flat, peer, group) for peer, flat in recvs])
    with ctl.guard(what):
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _start_all_reduce(ctl, flat, group, what, average_op=False):
    """average_op: the backend averages itself (NCCL's ncclAvg: no extra pass over `flat`)."""
    op = dist.ReduceOp.AVG if average_op else dist.ReduceOp.SUM
    with ctl.guard(what):
        work = dist.all_reduce(flat, op=op, group=group, async_op=True)
    return Pending(work, None if average_op else lambda: flat.div_(ctl.world), ctl.guard(what))


class Gloo(Plane):
    """gloo all_reduce; CUDA buffers are staged through pinned host memory."""

    def __init__(self, ctl, device):
        super().__init__(ctl, device)
        self._pinned = {}

    def average_(self, flat):
        ctl = self.ctl
        if not flat.is_cuda:
            return self.start_average_(flat).wait()
        with ctl.guard('average_ (gloo all_reduce)'):
            key = (flat.data_ptr(), flat.numel(), flat.dtype)
            stage = self._pinned.get(key)
            if stage is None:
                stage = self._pinned[key] = torch.empty(flat.numel(), dtype=flat.dtype,
                                                        pin_memory=True)
            stage.copy_(flat)                   # synchronous: the GPU work is finished
            dist.all_reduce(stage, op=dist.ReduceOp.SUM, group=ctl.group)
            stage.div_(ctl.world)
            flat.copy_(stage, non_blocking=True)
            stream_sync(flat.device)           # the pinned buffer is reused next call

    def start_average_(self, flat):
        if flat.is_cuda:       # staged through host memory: nothing to overlap
            self.average_(flat)
            return Pending()
        return _start_all_reduce(self.ctl, flat, self.ctl.group, 'average_ (gloo all_reduce)')

    def send_recv_(self, sends, recvs):
        if self.device.type != 'cuda':
            return _send_recv(self.ctl, sends, recvs, self.ctl.group, 'gossip (gloo send/recv)')
        # gloo moves host memory: CUDA buffers go through host copies
        host_sends = [(peer, flat.cpu()) for peer, flat in sends]
        host_recvs = [(peer, torch.empty(flat.numel(), dtype=flat.dtype)) for peer, flat in recvs]
        _send_recv(self.ctl, host_sends, host_recvs, self.ctl.group, 'gossip (gloo send/recv)')
        for (_, flat), (_, host) in zip(recvs, host_recvs):
            flat.copy_(host)

    def close(self):
        self._pinned.clear()


class Nccl(Plane):
    """NCCL all_reduce, averaging in the reduction, on NCCL's stream."""

    def start_average_(self, flat):
        # on NCCL's own stream, after the work already queued on the current one; a dead peer
        # is caught by the NCCL watchdog (timeout)
        return _start_all_reduce(self.ctl, flat, self.ctl.nccl_group, 'average_ (nccl all_reduce)',
                                 average_op=True)

    def send_recv_(self, sends, recvs):
        _send_recv(self.ctl, sends, recvs, self.ctl.nccl_group, 'gossip (nccl send/recv)')

