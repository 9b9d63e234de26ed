"""Averaging a flat float32 buffer across replicas: the weight exchange of data-parallel training.

    ex = make_exchanger('p2p', rank, world, device, port=5000, timeout=120.0)
    ex.average_(state)        # in place: every replica ends with the elementwise mean
    p = ex.start_average_(grad); ...; p.wait()   # the same, overlapped with other work
    ex.all_sum([loss, errors, n])
    ex.check_identical(state, 'parameters')
    ex.close()

The control plane (barriers, metric sums, checksums) is a gloo process group, made here with
launch.init_distributed, or torchrun's when one exists. Data planes:

- ``p2p``: the original scheme, one node with GPUs. Each trainer owns a send buffer on its GPU
  and hands the others its CUDA IPC handle over the control group (JSON, checked field by
  field, nothing unpickled). Per exchange: copy the buffer into the send
  buffer, synchronise the stream, barrier A; then copy each peer's send buffer device-to-device
  into a receive buffer on this GPU, sum the replicas in rank order and write sum / world into
  the buffer. The send buffer has two halves used alternately (double buffering), so a half is
  rewritten only after every peer has finished reading it: one barrier per exchange. Without
  peer access between the GPUs it falls back to ``host`` with a one-line warning.
- ``nccl``: torch.distributed all_reduce with NCCL, averaging in the reduction (ncclAvg).
- ``gloo``: torch.distributed all_reduce with gloo; CUDA buffers go through pinned host memory.
- ``host``: the same double-buffered scheme through shared-memory segments, one per rank;
  CUDA buffers are staged through pinned memory. For CPU runs.

p2p and host sum in rank order, so all replicas end bitwise identical. world == 1 gives a
no-op exchanger. A peer that dies or stops answering makes the next call raise ExchangeError
naming it, within the timeout (for nccl, the NCCL watchdog ends the process at the timeout).
Every rank must call average_ with buffers of the same size in the same order.
"""
import contextlib
import datetime
import hashlib
import json
import mmap
import os
import secrets
import socket
import tempfile
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from alexnet_lib import launch
from alexnet_lib.config import resolve_device
from alexnet_lib.errors import UserError

KINDS = ('p2p', 'nccl', 'gloo', 'host')


class ExchangeError(UserError):
    """An exchange between replicas failed: a peer died or stopped answering, replicas differ,
    or a peer sent something invalid."""


def make_exchanger(kind, rank, world, device, *, port, timeout=120.0):
    """An Exchanger for replica `rank` of `world`, averaging buffers that live on `device`.

    kind: 'p2p' | 'nccl' | 'gloo' | 'host'. port: names this group's rendezvous (see
    launch.init_distributed). timeout: seconds any wait on a peer may take."""
    if kind not in KINDS:
        raise ValueError('unknown exchange kind {!r}: expected one of {}'.format(
            kind, ', '.join(KINDS)))
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f'bad rank/world: rank {rank!r} of world {world!r}')
    device = resolve_device(device)
    if world == 1:
        return Exchanger(kind, rank, world, device)
    if kind in ('p2p', 'nccl') and device.type != 'cuda':
        if kind == 'nccl':
            raise ValueError(f'the nccl exchange needs CUDA buffers; device is {device} '
                             '(use gloo or host)')
        if rank == 0:
            print(f'exchange: p2p needs GPUs, device is {device}: using host memory instead',
                  file=sys.stderr, flush=True)
        kind = 'host'
    if kind in ('p2p', 'host'):
        _check_one_node(kind)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    ctl = _Control(rank, world, port, timeout, nccl=(kind == 'nccl'))
    try:
        if kind == 'p2p':
            why_not = _P2P.impossible(ctl, device)
            if why_not:
                if rank == 0:
                    print(f'exchange: no peer-to-peer copies ({why_not}): using host memory',
                          file=sys.stderr, flush=True)
                kind = 'host'
        plane = {'p2p': _P2P, 'nccl': _Nccl, 'gloo': _Gloo, 'host': _Host}[kind](ctl, device)
    except BaseException:
        ctl.close()
        raise
    return Exchanger(kind, rank, world, device, ctl, plane)


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
        start = getattr(self._plane, 'start_average_', None)
        if wire_dtype == torch.float32:
            if start is None:               # p2p, host: averaged at once
                self._plane.average_(flat)
                return Pending()
            return start(flat)
        if start is None:
            raise ValueError(f'a {wire_dtype} average needs the nccl or gloo exchange, not '
                             f'{self.kind}')
        wire = flat.to(wire_dtype)
        return Pending(start(wire), lambda: flat.copy_(wire))

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
# helpers

def _check_one_node(kind):
    local, world = os.environ.get('LOCAL_WORLD_SIZE'), os.environ.get('WORLD_SIZE')
    if launch.under_torchrun() and local is not None and local != world:
        raise ValueError(f'the {kind} exchange works within one node (LOCAL_WORLD_SIZE={local}, '
                         f'WORLD_SIZE={world}): use nccl or gloo across nodes')


def _pid_alive(pid):
    """False once process `pid` (on this host) has exited, zombies included."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            state = f.read().rsplit(b')', 1)[1].split()[0]
        return state not in (b'Z', b'X', b'x')
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def _host_id():
    return int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:7], 'little')


def _stream_sync(device):
    if device.type == 'cuda':
        torch.cuda.current_stream(device).synchronize()


# ----------------------------------------------------------------------------------------------
# control plane: a gloo process group

class _Control:
    """Barriers, small all-gathers and sums over a gloo group, each bounded by the timeout, and
    failures turned into ExchangeError naming the peer that died."""

    def __init__(self, rank, world, port, timeout, nccl=False):
        self.rank, self.world, self.timeout = rank, world, float(timeout)
        self._owns_pg = False
        self._broken = None
        self.group = None             # None: the default group carries CPU tensors (gloo)
        self.nccl_group = None
        if dist.is_initialized():
            if (dist.get_rank(), dist.get_world_size()) != (rank, world):
                raise ValueError(f'a process group already exists as rank {dist.get_rank()} of '
                                 f'{dist.get_world_size()}, not {rank} of {world}')
            config = str(dist.get_backend_config() if hasattr(dist, 'get_backend_config')
                         else dist.get_backend())
            td = datetime.timedelta(seconds=self.timeout)
            if 'gloo' not in config:
                self.group = dist.new_group(backend='gloo', timeout=td)
            if nccl and 'nccl' not in config:
                self.nccl_group = dist.new_group(backend='nccl', timeout=td)
        else:
            backend = 'cpu:gloo,cuda:nccl' if nccl else 'gloo'
            try:
                launch.init_distributed(backend, rank, world, port, self.timeout)
            except Exception as e:
                raise ExchangeError(f'rank {rank}: could not meet the other {world - 1} replica(s) '
                                    f'within {self.timeout:.0f} s (port {port}): '
                                    f'{_first_line(e)}') from e
            self._owns_pg = True
        try:
            table = self.gather_i64([os.getpid(), _host_id()])
        except BaseException:
            self.close()
            raise
        self.pids = [int(p) for p in table[:, 0]]
        self.local = [int(h) == int(table[rank, 1]) for h in table[:, 1]]

    # failure handling ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self, what):
        if self._broken:
            raise ExchangeError(f'rank {self.rank}: the exchange is unusable after an earlier '
                                f'failure ({self._broken})')
        try:
            yield
        except ExchangeError as e:
            self._broken = str(e)
            raise
        except Exception as e:
            msg = self._explain(what, e)
            self._broken = msg
            raise ExchangeError(msg) from e

    def _explain(self, what, error):
        peers = [r for r in range(self.world) if r != self.rank]
        pids = getattr(self, 'pids', None)
        dead = []
        if pids is not None:
            deadline = time.monotonic() + 1.0       # a dying process closes its sockets first
            while True:
                dead = [r for r in peers if self.local[r] and not _pid_alive(pids[r])]
                if dead or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        text = _first_line(error)
        if dead:
            dead_ranks = ', '.join(map(str, dead))
            dead_pids = ', '.join(str(pids[r]) for r in dead)
            return (f'rank {dead_ranks} stopped responding during {what}: its process '
                    f'(pid {dead_pids}) has exited [rank {self.rank}; backend: {text}]')
        if 'timed out' in text.lower() or 'timeout' in text.lower():
            return (f'a peer stopped responding during {what}: no answer within '
                    f'{self.timeout:.0f} s; the peer '
                    'processes on this host are alive, so one is stuck or on another node '
                    f'[rank {self.rank}; backend: {text}]')
        return f'{what} failed on rank {self.rank}: {text}'

    # collectives ------------------------------------------------------------------------------
    def gather_i64(self, values, what='exchange'):
        """All-gather a short list of int64 from every rank: array (world, len(values))."""
        t = torch.tensor([int(v) for v in values], dtype=torch.int64)
        out = [torch.empty_like(t) for _ in range(self.world)]
        with self.guard(what):
            dist.all_gather(out, t, group=self.group)
        return torch.stack(out).numpy()

    def all_gather_bytes(self, data, what='setup'):
        """Every rank's `data` (bytes), in rank order."""
        sizes = self.gather_i64([len(data)], what)[:, 0]
        buf = torch.zeros(int(sizes.max()), dtype=torch.uint8)
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else 0
        out = [torch.empty_like(buf) for _ in range(self.world)]
        with self.guard(what):
            dist.all_gather(out, buf, group=self.group)
        return [bytes(t[:n].numpy()) for t, n in zip(out, sizes)]

    def barrier(self, what='barrier'):
        with self.guard(what):
            dist.barrier(group=self.group)

    def all_min(self, value, what='setup'):
        t = torch.tensor([int(value)], dtype=torch.int64)
        with self.guard(what):
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def all_sum(self, values):
        lengths = self.gather_i64([len(values)], 'all_sum')[:, 0]
        if len(set(lengths.tolist())) != 1:
            raise ExchangeError('all_sum: ranks pass lists of different lengths: {}'.format(
                ', '.join(f'rank {r}: {n:d}' for r, n in enumerate(lengths))))
        if not values:
            return []
        t = torch.tensor(values, dtype=torch.float64)
        with self.guard('all_sum'):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return [float(v) for v in t.tolist()]

    def check_identical(self, flat, what='parameters'):
        digest = _sha256(flat)
        row = [flat.numel()] + list(np.frombuffer(digest, dtype='<i8'))
        table = self.gather_i64(row, f'check_identical({what})')
        sizes = table[:, 0].tolist()
        if len(set(sizes)) != 1:
            raise ExchangeError('{} differ between replicas: sizes {}'.format(
                what, ', '.join(f'rank {r} has {n:d} elements' for r, n in enumerate(sizes))))
        groups = {}
        for r in range(self.world):
            groups.setdefault(table[r, 1:].tobytes(), []).append(r)
        if len(groups) > 1:
            parts = ['rank{} {} (sha256 {}...)'.format('s' if len(rs) > 1 else '',
                                                  ', '.join(map(str, rs)), key[:4].hex())
                     for key, rs in groups.items()]
            odd = [r for key, rs in groups.items() if 0 not in rs for r in rs]
            raise ExchangeError('{} differ between replicas: rank{} {} differ{} from rank 0; '
                                'groups: {}'.format(what, 's' if len(odd) > 1 else '',
                                                ', '.join(map(str, odd)),
                                                '' if len(odd) > 1 else 's', '; '.join(parts)))

    def close(self):
        if self._owns_pg and dist.is_initialized():
            self._owns_pg = False
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def _first_line(error):
    text = str(error).strip().splitlines()
    text = text[0] if text else type(error).__name__
    return text[:400]


def _sha256(flat):
    data = flat.detach().reshape(-1).contiguous().view(torch.uint8)
    h = hashlib.sha256()
    step = 1 << 26
    for i in range(0, data.numel(), step):
        h.update(data[i:i + step].cpu().numpy())
    return h.digest()


# ----------------------------------------------------------------------------------------------
# data planes

class Pending:
    """An average in flight (Exchanger.start_average_); wait() finishes it: waits for `work`
    (a torch.distributed Work, or another Pending), then runs `then`."""

    def __init__(self, work=None, then=None, guard=None):
        self._work, self._then, self._guard = work, then, guard

    def wait(self):
        if self._work is None:
            return
        work, self._work = self._work, None
        with self._guard or contextlib.nullcontext():
            work.wait()       # nccl: the current stream waits for the all-reduce
            if self._then is not None:
                self._then()


def _start_all_reduce(ctl, flat, group, what, average_op=False):
    """average_op: the backend averages itself (NCCL's ncclAvg: no extra pass over `flat`)."""
    op = dist.ReduceOp.AVG if average_op else dist.ReduceOp.SUM
    with ctl.guard(what):
        work = dist.all_reduce(flat, op=op, group=group, async_op=True)
    return Pending(work, None if average_op else lambda: flat.div_(ctl.world), ctl.guard(what))


class _Gloo:
    def __init__(self, ctl, device):
        self.ctl, self.device = ctl, device
        self._pinned = {}

    def average_(self, flat):
        ctl = self.ctl
        if not flat.is_cuda:
            return self.start_average_(flat).wait()
        with ctl.guard('average_ (gloo all_reduce)'):
            key = (flat.data_ptr(), flat.numel())
            stage = self._pinned.get(key)
            if stage is None:
                stage = self._pinned[key] = torch.empty(flat.numel(), dtype=flat.dtype,
                                                        pin_memory=True)
            stage.copy_(flat)                   # synchronous: the GPU work is finished
            dist.all_reduce(stage, op=dist.ReduceOp.SUM, group=ctl.group)
            stage.div_(ctl.world)
            flat.copy_(stage, non_blocking=True)
            _stream_sync(flat.device)           # the pinned buffer is reused next call

    def start_average_(self, flat):
        if flat.is_cuda:       # staged through host memory: nothing to overlap
            self.average_(flat)
            return Pending()
        return _start_all_reduce(self.ctl, flat, self.ctl.group, 'average_ (gloo all_reduce)')

    def close(self):
        self._pinned.clear()


class _Nccl:
    def __init__(self, ctl, device):
        self.ctl, self.device = ctl, device

    def average_(self, flat):
        self.start_average_(flat).wait()

    def start_average_(self, flat):
        # on NCCL's own stream, after the work already queued on the current one; a dead peer
        # is caught by the NCCL watchdog (timeout)
        return _start_all_reduce(self.ctl, flat, self.ctl.nccl_group, 'average_ (nccl all_reduce)',
                                 average_op=True)

    def close(self):
        pass


class _Host:
    """Shared-memory segments, one file per rank in /dev/shm (mode 0600) holding two halves,
    used alternately (double buffering: one barrier per exchange). A rank writes its buffer into
    its current half, barrier A, then sums everyone's halves in rank order. A half is written
    again two exchanges later, after the next barrier A, when every peer has finished reading it.
    Segments grow to the largest buffer seen (every rank sees the same sizes, so they grow
    together) and are unlinked as soon as every peer has mapped them: nothing is left behind,
    even after a crash."""

    def __init__(self, ctl, device):
        self.ctl, self.device = ctl, device
        shm = '/dev/shm' if os.path.isdir('/dev/shm') else tempfile.gettempdir()
        token = ctl.all_gather_bytes(secrets.token_hex(8).encode(), 'setup')[0].decode()
        self._prefix = os.path.join(shm, f'xchg-{token}')
        self._cap = self._gen = self._calls = 0
        self._maps = {}              # rank -> mmap of that rank's segment (own included)
        self._halves = {}            # rank -> (half 0, half 1) float32 tensors over the mmap
        self._own_path = None

    def _path(self, rank, gen):
        return f'{self._prefix}-r{rank:d}-g{gen:d}'

    def _map(self, rank, path, create):
        nbytes = 2 * self._cap * 4
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            raise ExchangeError(f'rank {self.ctl.rank}: the shared-memory segment of rank {rank} '
                                f'({path}) is missing') from None
        try:
            if create:
                os.ftruncate(fd, nbytes)
            elif os.fstat(fd).st_size != nbytes:
                raise ExchangeError(f'rank {self.ctl.rank}: segment {path} of rank {rank} holds '
                                    f'{os.fstat(fd).st_size} bytes, expected {nbytes:d}')
            mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        whole = torch.frombuffer(mm, dtype=torch.float32, count=2 * self._cap)
        self._maps[rank] = mm
        self._halves[rank] = (whole[:self._cap], whole[self._cap:])

    def _unmap_all(self):
        self._halves.clear()
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass             # a view is still alive somewhere; the mapping goes with it
        self._maps.clear()

    def _grow(self, n):
        """New, larger segments on every rank (all ranks call this at the same exchange)."""
        ctl = self.ctl
        self._unmap_all()
        if self._own_path:
            _unlink(self._own_path)
        self._cap, self._gen = n, self._gen + 1
        self._own_path = self._path(ctl.rank, self._gen)
        self._map(ctl.rank, self._own_path, create=True)
        pin = self.device.type == 'cuda'
        self._acc = torch.empty(n, dtype=torch.float32, pin_memory=pin)
        self._stage = torch.empty(n, dtype=torch.float32, pin_memory=True) if pin else None
        # same shape as barrier A's gather: a rank that does not grow meets this one there, and
        # both see that the sizes differ
        _check_table(ctl.gather_i64([n, self._gen], 'average_ (host, new segments)'), ctl.rank)
        for r in range(ctl.world):
            if r != ctl.rank:
                self._map(r, self._path(r, self._gen), create=False)
        ctl.barrier('average_ (host, segments mapped)')
        _unlink(self._own_path)
        self._own_path = None

    def average_(self, flat):
        ctl, world, rank, n = self.ctl, self.ctl.world, self.ctl.rank, flat.numel()
        if n > self._cap:
            self._grow(n)
        half = self._calls % 2
        self._calls += 1
        own = self._halves[rank][half][:n]
        if flat.is_cuda:
            stage = self._stage[:n]
            stage.copy_(flat, non_blocking=True)
            _stream_sync(flat.device)
            own.copy_(stage)
        else:
            own.copy_(flat)
        _check_table(ctl.gather_i64([n, self._gen], 'average_ (host, barrier A)'), rank)
        acc = self._acc[:n]
        for r in range(world):
            src = self._halves[r][half][:n]
            if r == 0:
                acc.copy_(src)
            else:
                acc.add_(src)
        if flat.is_cuda:
            acc.div_(world)
            flat.copy_(acc, non_blocking=True)
            _stream_sync(flat.device)     # acc is pinned and rewritten next call
        else:
            torch.div(acc, world, out=flat)

    def close(self):
        self._unmap_all()
        if self._own_path:
            _unlink(self._own_path)
            self._own_path = None


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _check_table(table, rank):
    """Rows [numel, generation] from every rank: all must agree."""
    sizes = [int(n) for n in table[:, 0]]
    if len(set(sizes)) != 1:
        listed = ', '.join(f'rank {r}: {n}' for r, n in enumerate(sizes))
        raise ExchangeError(f'average_: replicas pass buffers of different sizes ({listed}) '
                            f'[rank {rank}]')
    gens = [int(g) for g in table[:, 1]]
    if len(set(gens)) != 1:
        raise ExchangeError(f'average_: replicas disagree on the exchange buffers (generations '
                            f'{gens}) [rank {rank}]')


class _P2P:
    """CUDA IPC and device-to-device copies. Each rank owns a send buffer of two halves on its
    GPU, used alternately (double buffering), and gives the others its CUDA IPC handle over the
    control group once (again only when a larger buffer is needed). One exchange:

      1. copy the buffer into the current half of the send buffer; synchronise the stream (this
         also completes the reads of the previous exchange); barrier A
      2. copy each peer's current half into a receive buffer on this GPU (peer copy) and sum
         the replicas in rank order; write sum / world into the buffer (all on the stream)

    A half is written again two exchanges later, after the next barrier A, which no peer reaches
    before its reads of that half have completed (step 1 synchronises)."""

    @staticmethod
    def impossible(ctl, device):
        """Why peer copies cannot work between these replicas' GPUs, or '' when they can (the
        same answer on every rank)."""
        why = ''
        local = _local_gpu_indices(ctl.gather_i64(_pci_id(device.index), 'setup (p2p)'))
        for r in range(ctl.world):
            j = local[r]
            if j is None:
                why = f'the GPU of rank {r} is not visible to rank {ctl.rank}'
                break
            if j != device.index and not torch.cuda.can_device_access_peer(device.index, j):
                why = f'GPU {device.index} cannot access GPU {j} directly'
                break
        ok = ctl.all_min(0 if why else 1, 'setup (p2p)')
        if not ok and not why:
            why = 'another rank cannot reach its peers\' GPUs'
        return why

    def __init__(self, ctl, device):
        self.ctl, self.device = ctl, device
        self._local = _local_gpu_indices(ctl.gather_i64(_pci_id(device.index), 'setup (p2p)'))
        self._cap = self._gen = self._calls = 0
        self._peer_gen = 0
        self._peers = {}             # rank -> that rank's send buffer (2 * cap), opened here

    # registration -------------------------------------------------------------------------------
    def _handle(self):
        """This rank's send buffer as JSON: its CUDA IPC handle, bytes in hex."""
        t = self._send
        (dev, handle, size_bytes, offset_bytes, rc_handle, rc_offset, ev_handle,
         ev_sync) = t.untyped_storage()._share_cuda_()
        hex_or_none = lambda b: None if b is None else bytes(b).hex()
        return json.dumps({'gen': self._gen, 'from': self.ctl.rank, 'numel': t.numel(),
                           'tensor_offset': t.storage_offset(), 'device': int(dev),
                           'handle': hex_or_none(handle), 'size_bytes': int(size_bytes),
                           'offset_bytes': int(offset_bytes),
                           'ref_counter_handle': hex_or_none(rc_handle),
                           'ref_counter_offset': int(rc_offset),
                           'event_handle': hex_or_none(ev_handle),
                           'event_sync_required': bool(ev_sync)}).encode()

    def _register(self):
        """Everyone's handle to everyone, over the control group; each opens the others'."""
        ctl = self.ctl
        handles = ctl.all_gather_bytes(self._handle(), 'average_ (p2p registration)')
        self._peers = {r: self._open(_check_handle(h, r, ctl.rank, ctl.world, self._gen,
                                                   2 * self._cap))
                       for r, h in enumerate(handles) if r != ctl.rank}
        self._peer_gen = self._gen

    def _open(self, body):
        """The peer's send buffer as a tensor of this process (CUDA IPC), on the peer's GPU."""
        j = self._local[body['from']]
        with torch.cuda.device(j):
            storage = torch.UntypedStorage._new_shared_cuda(
                j, body['handle'], body['size_bytes'], body['offset_bytes'],
                body['ref_counter_handle'], body['ref_counter_offset'], body['event_handle'],
                body['event_sync_required'])
            t = torch.empty(0, dtype=torch.float32, device=torch.device('cuda', j))
            t.set_(storage, body['tensor_offset'], (body['numel'],), (1,))
        return t

    # the exchange -------------------------------------------------------------------------------
    def _grow(self, n):
        self._cap, self._gen = n, self._gen + 1
        self._peers = {}
        self._send = torch.empty(2 * n, dtype=torch.float32, device=self.device)
        self._recv = torch.empty(n, dtype=torch.float32, device=self.device)
        self._acc = (torch.empty(n, dtype=torch.float32, device=self.device)
                     if self.ctl.world > 2 else None)

    def average_(self, flat):
        ctl, world, rank, n = self.ctl, self.ctl.world, self.ctl.rank, flat.numel()
        if n > self._cap:
            self._grow(n)
        lo = (self._calls % 2) * self._cap
        self._calls += 1
        self._send[lo:lo + n].copy_(flat)
        _stream_sync(self.device)
        for t in self._peers.values():           # previous copies, if on the peers' streams
            if t.device != self.device:
                _stream_sync(t.device)
        _check_table(ctl.gather_i64([n, self._gen], 'average_ (p2p, barrier A)'), rank)
        if self._peer_gen != self._gen:
            self._register()
        with ctl.guard('average_ (p2p copies)'):
            recv = self._recv[:n]
            if world == 2:
                recv.copy_(self._peers[1 - rank][lo:lo + n])   # device-to-device peer copy
                recv.add_(flat)                  # x0 + x1 on both ranks: bitwise equal
                torch.div(recv, 2, out=flat)
            else:
                acc = self._acc[:n]
                for r in range(world):
                    if r == rank:
                        src = flat
                    else:
                        recv.copy_(self._peers[r][lo:lo + n])
                        src = recv
                    if r == 0:
                        acc.copy_(src)
                    else:
                        acc.add_(src)
                torch.div(acc, world, out=flat)

    def close(self):
        # nobody frees (or exits with) a send buffer that a peer's copy may still be reading
        try:
            if self._cap:
                _stream_sync(self.device)
                for t in self._peers.values():
                    if t.device != self.device:
                        _stream_sync(t.device)
                self.ctl.barrier('close (p2p)')
        except Exception:
            pass      # a peer is gone or the exchange failed earlier: nothing left to protect
        self._peers = {}
        self._send = self._recv = self._acc = None


def _check_handle(payload, sender, rank, world, gen, numel):
    """The p2p registration of rank `sender`, checked field by field (JSON, never a pickle)."""
    def bad(why):
        return ExchangeError(f'rank {rank}: refused the p2p registration of rank {sender}: {why}')
    try:
        body = json.loads(payload.decode('utf-8'))
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f'not JSON ({e})') from None
    ints = ('gen', 'from', 'numel', 'tensor_offset', 'device', 'size_bytes', 'offset_bytes',
            'ref_counter_offset')
    fields = set(ints) | {'handle', 'ref_counter_handle', 'event_handle', 'event_sync_required'}
    if not isinstance(body, dict) or set(body) != fields:
        raise bad(f'unexpected fields {sorted(body) if isinstance(body, dict) else body}')
    for k in ints:
        if type(body[k]) is not int or body[k] < 0:
            raise bad(f'field {k}={body[k]!r} is not a non-negative integer')
    if body['gen'] != gen:
        raise bad(f'generation {body["gen"]}, expected {gen}')
    if body['from'] != sender or sender == rank or sender >= world:
        raise bad(f'it says it is from rank {body["from"]}')
    if body['numel'] != numel:
        raise bad(f'it announces {body["numel"]} elements, expected {numel}')
    if (body['tensor_offset'] + body['numel']) * 4 > body['size_bytes']:
        raise bad('its buffer does not fit in its storage')
    if type(body['event_sync_required']) is not bool:
        raise bad('event_sync_required is not a boolean')
    for k in ('handle', 'ref_counter_handle', 'event_handle'):
        v = body[k]
        if v is None and k == 'event_handle':
            continue
        try:
            raw = bytes.fromhex(v)
        except (TypeError, ValueError):
            raise bad(f'field {k} is not hex') from None
        if not 0 < len(raw) <= 4096:
            raise bad(f'field {k} has {len(raw)} bytes')
        body[k] = raw
    return body


def _pci_id(index):
    """(domain, bus, device) of CUDA device `index`, or (-1, -1, index) when unknown."""
    p = torch.cuda.get_device_properties(index)
    ids = [getattr(p, k, None) for k in ('pci_domain_id', 'pci_bus_id', 'pci_device_id')]
    if any(v is None for v in ids):
        return [-1, -1, index]
    return [int(v) for v in ids]


def _local_gpu_indices(table):
    """For each rank's PCI id, this process's index of that GPU (None if not visible)."""
    mine = {}
    for i in range(torch.cuda.device_count()):
        mine[tuple(_pci_id(i))] = i
    return [mine.get(tuple(int(v) for v in row)) for row in table]
