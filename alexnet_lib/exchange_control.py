"""What every exchange backend is given: the control group of the replicas (class Control), the
error it raises (ExchangeError) and what an average in flight returns (Pending).

Control is a gloo process group (launch.init_distributed's, or torchrun's when one exists):
barriers, small all-gathers and sums, each bounded by the timeout, and every failure turned
into one ExchangeError naming the peer that died or stopped answering. A backend uses

    ctl.rank, ctl.world, ctl.timeout
    ctl.group          the gloo group for CPU tensors (None: the default group)
    ctl.nccl_group     an NCCL group for CUDA tensors (None: the default group), made when the
                       backend's registry entry says nccl_group
    ctl.guard(what)    a context: any failure inside becomes ExchangeError explaining `what`
    ctl.barrier(what), ctl.gather_i64(values, what), ctl.all_gather_bytes(data, what),
    ctl.all_min(value, what)
"""
import contextlib
import datetime
import hashlib
import os
import socket
import time

import numpy as np
import torch
import torch.distributed as dist

from alexnet_lib import launch
from alexnet_lib.errors import UserError


class ExchangeError(UserError):
    """An exchange between replicas failed: a peer died or stopped answering, replicas differ,
    or a peer sent something invalid."""


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


class Plane:
    """A data plane's defaults (the interface: exchange.py's docstring): a plane overrides
    average_ or start_average_, or both, and close when it holds anything."""

    def __init__(self, ctl, device):
        self.ctl, self.device = ctl, device

    def average_(self, flat):
        self.start_average_(flat).wait()

    def start_average_(self, flat):
        self.average_(flat)          # averaged at once: nothing left to wait for
        return Pending()

    def close(self):
        pass


def stream_sync(device):
    """Wait for the work queued on `device`'s current stream (nothing on the CPU)."""
    if device.type == 'cuda':
        torch.cuda.current_stream(device).synchronize()


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


class Control:
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
