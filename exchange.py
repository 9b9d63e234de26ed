"""Averaging a flat float32 buffer across replicas: the weight exchange of the report's section 2.2.

    ex = make_exchanger('p2p', rank, world, device, port=5000, timeout=120.0)
    ex.average_(state)        # in place: every replica ends with the elementwise mean
    ex.all_sum([loss, errors, n])
    ex.check_identical(state, 'parameters')
    ex.close()

Kinds of data plane (the control plane - barriers, metric sums, checksums - is always a gloo
process group, made here with launch.init_distributed, or torchrun's when one exists):

- ``p2p``: the original scheme, one node with GPUs. Each trainer sends the others the CUDA IPC
  handle of its buffer over ZeroMQ (ipc:// socket in a private directory, HMAC-authenticated JSON,
  nothing unpickled). Per exchange: (1) each trainer finishes its pending GPU work and enters
  barrier A; (2) each copies every peer's buffer device-to-device into its own receive buffer and
  sums the replicas in rank order; (3) it synchronises its streams and enters barrier B - after B
  nobody reads a peer's buffer any more; (4) it writes sum/world into its own buffer. Without
  peer access between the GPUs it falls back to ``host`` with a warning.
- ``nccl``: torch.distributed all_reduce (SUM, then divide) with NCCL.
- ``gloo``: torch.distributed all_reduce with gloo; CUDA buffers go through pinned host memory.
- ``host``: one shared-memory segment per rank and buffer; each rank writes its buffer into its
  segment, barrier A, sums all segments in rank order, barrier B. CUDA buffers are staged
  through pinned memory.

Every average is the sum in rank order divided by the world size, so all replicas end bitwise
identical (p2p, host) or as the collective library returns them (nccl, gloo). world == 1 gives a
no-op exchanger. A peer that dies or stops answering makes the call raise ExchangeError naming
it within the timeout (for nccl, the NCCL watchdog ends the process at the timeout instead).
"""
import base64
import contextlib
import datetime
import hashlib
import hmac
import json
import mmap
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

import launch

KINDS = ('p2p', 'nccl', 'gloo', 'host')


class ExchangeError(RuntimeError):
    """An exchange between replicas failed: a peer died or stopped answering, replicas differ,
    or a peer sent something invalid."""


def make_exchanger(kind, rank, world, device, *, port, timeout=120.0, secret=None):
    """An Exchanger for replica `rank` of `world`, averaging buffers that live on `device`.

    kind: 'p2p' | 'nccl' | 'gloo' | 'host'. port: names this group's rendezvous (see
    launch.init_distributed). timeout: seconds any wait on a peer may take. secret:
    authenticates p2p peers; by default the one launch.spawn gave the workers, else one that
    rank 0 draws and sends over the process group."""
    if kind not in KINDS:
        raise ValueError('unknown exchange kind %r: expected one of %s' % (kind, ', '.join(KINDS)))
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError('bad rank/world: rank %r of world %r' % (rank, world))
    device = _normalise_device(device)
    if world == 1:
        return Exchanger(kind, rank, world, device)
    if kind in ('p2p', 'nccl') and device.type != 'cuda':
        if kind == 'nccl':
            raise ValueError('the nccl exchange needs CUDA buffers; device is %s (use gloo or host)'
                             % device)
        print('exchange: p2p needs GPUs, device is %s: using host memory instead' % device,
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
                    print('exchange: no peer-to-peer copies (%s): using host memory' % why_not,
                          file=sys.stderr, flush=True)
                kind = 'host'
        plane = {'p2p': _P2P, 'nccl': _Nccl, 'gloo': _Gloo, 'host': _Host}[kind](ctl, device, secret)
    except BaseException:
        ctl.close()
        raise
    return Exchanger(kind, rank, world, device, ctl, plane)


class Exchanger:
    """See make_exchanger. `kind` is the data plane actually in use ('host' after a p2p fallback)."""

    def __init__(self, kind, rank, world, device, ctl=None, plane=None):
        self.kind, self.rank, self.world, self.device = kind, rank, world, device
        self._ctl, self._plane = ctl, plane

    def average_(self, flat):
        """Replace `flat` (1-D contiguous float32 on this exchanger's device) by its mean over
        the replicas. Every replica must call it, with corresponding buffers in the same order."""
        if not isinstance(flat, torch.Tensor):
            raise TypeError('average_ needs a torch.Tensor, got %s' % type(flat).__name__)
        if flat.dtype != torch.float32 or flat.dim() != 1 or not flat.is_contiguous():
            raise ValueError('average_ needs a 1-D contiguous float32 tensor, got %s of shape %s%s'
                             % (flat.dtype, tuple(flat.shape),
                                '' if flat.is_contiguous() else ' (not contiguous)'))
        if _normalise_device(flat.device) != self.device:
            raise ValueError('average_: the buffer is on %s but this exchanger was made for %s'
                             % (flat.device, self.device))
        if self._plane is not None:
            self._plane.average_(flat)

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
        return 'Exchanger(kind=%r, rank=%d, world=%d, device=%s)' % (
            self.kind, self.rank, self.world, self.device)


# ----------------------------------------------------------------------------------------------
# helpers

def _normalise_device(device):
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    return device


def _check_one_node(kind):
    local, world = os.environ.get('LOCAL_WORLD_SIZE'), os.environ.get('WORLD_SIZE')
    if launch.under_torchrun() and local is not None and local != world:
        raise ValueError('the %s exchange works within one node (LOCAL_WORLD_SIZE=%s, WORLD_SIZE=%s):'
                         ' use nccl or gloo across nodes' % (kind, local, world))


def _pid_alive(pid):
    """False once process `pid` (on this host) has exited, zombies included."""
    try:
        with open('/proc/%d/stat' % pid, 'rb') as f:
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
                raise ValueError('a process group already exists as rank %d of %d, not %d of %d'
                                 % (dist.get_rank(), dist.get_world_size(), rank, world))
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
                raise ExchangeError('rank %d: could not meet the other %d replica(s) within %.0f s '
                                    '(port %s): %s' % (rank, world - 1, self.timeout, port,
                                                       _first_line(e))) from e
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
            raise ExchangeError('rank %d: the exchange is unusable after an earlier failure (%s)'
                                % (self.rank, self._broken))
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
            return ('rank %s stopped responding during %s: its process (pid %s) has exited '
                    '[rank %d; backend: %s]' % (', '.join(map(str, dead)), what,
                                                 ', '.join(str(pids[r]) for r in dead),
                                                 self.rank, text))
        if 'timed out' in text.lower() or 'timeout' in text.lower():
            return ('a peer stopped responding during %s: no answer within %.0f s; the peer '
                    'processes on this host are alive, so one is stuck or on another node '
                    '[rank %d; backend: %s]' % (what, self.timeout, self.rank, text))
        return '%s failed on rank %d: %s' % (what, self.rank, text)

    # collectives ------------------------------------------------------------------------------
    def gather_i64(self, values, what='exchange'):
        """All-gather a short list of int64 from every rank: array (world, len(values))."""
        t = torch.tensor([int(v) for v in values], dtype=torch.int64)
        out = [torch.empty_like(t) for _ in range(self.world)]
        with self.guard(what):
            dist.all_gather(out, t, group=self.group)
        return torch.stack(out).numpy()

    def broadcast_bytes(self, data, what='setup'):
        """Rank 0's `data` (bytes) on every rank."""
        n = torch.tensor([len(data) if self.rank == 0 else 0], dtype=torch.int64)
        with self.guard(what):
            dist.broadcast(n, 0, group=self.group)
            if self.rank == 0:
                buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            else:
                buf = torch.empty(int(n.item()), dtype=torch.uint8)
            dist.broadcast(buf, 0, group=self.group)
        return bytes(buf.numpy())

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
            raise ExchangeError('all_sum: ranks pass lists of different lengths: %s'
                                % ', '.join('rank %d: %d' % (r, n) for r, n in enumerate(lengths)))
        if not values:
            return []
        t = torch.tensor(values, dtype=torch.float64)
        with self.guard('all_sum'):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return [float(v) for v in t.tolist()]

    def check_identical(self, flat, what='parameters'):
        digest = _sha256(flat)
        row = [flat.numel()] + list(np.frombuffer(digest, dtype='<i8'))
        table = self.gather_i64(row, 'check_identical(%s)' % what)
        sizes = table[:, 0].tolist()
        if len(set(sizes)) != 1:
            raise ExchangeError('%s differ between replicas: sizes %s' % (
                what, ', '.join('rank %d has %d elements' % (r, n) for r, n in enumerate(sizes))))
        groups = {}
        for r in range(self.world):
            groups.setdefault(table[r, 1:].tobytes(), []).append(r)
        if len(groups) > 1:
            parts = ['rank%s %s (sha256 %s...)' % ('s' if len(rs) > 1 else '',
                                                  ', '.join(map(str, rs)), key[:4].hex())
                     for key, rs in groups.items()]
            odd = [r for key, rs in groups.items() if 0 not in rs for r in rs]
            raise ExchangeError('%s differ between replicas: rank%s %s differ%s from rank 0; '
                                'groups: %s' % (what, 's' if len(odd) > 1 else '',
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

class _Slot:
    """What one buffer of this rank needs: registered per (data_ptr, numel)."""

    def __init__(self, numel, gen):
        self.numel, self.gen = numel, gen
        self.views = {}          # rank -> gen of that rank's buffer this slot has opened
        self.peers = {}          # rank -> tensor (host: mapped segment; p2p: opened IPC tensor)
        self.maps = {}           # rank -> mmap (host)
        self.fresh = True


class _Gloo:
    def __init__(self, ctl, device, secret=None):
        self.ctl, self.device = ctl, device
        self._pinned = {}

    def average_(self, flat):
        ctl = self.ctl
        with ctl.guard('average_ (gloo all_reduce)'):
            if flat.is_cuda:
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
            else:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ctl.group)
                flat.div_(ctl.world)

    def close(self):
        self._pinned.clear()


class _Nccl:
    def __init__(self, ctl, device, secret=None):
        self.ctl, self.device = ctl, device

    def average_(self, flat):
        # enqueued on the current stream; a dead peer is caught by the NCCL watchdog (timeout)
        with self.ctl.guard('average_ (nccl all_reduce)'):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.ctl.nccl_group)
            flat.div_(self.ctl.world)

    def close(self):
        pass


class _Host:
    """Shared-memory segments (files in /dev/shm, mode 0600, unlinked as soon as every peer has
    mapped them, so nothing is left behind even after a crash)."""

    def __init__(self, ctl, device, secret=None):
        self.ctl, self.device = ctl, device
        shm = '/dev/shm' if os.path.isdir('/dev/shm') else tempfile.gettempdir()
        token = secrets.token_hex(8).encode() if ctl.rank == 0 else b''
        self._prefix = os.path.join(shm, 'xchg-%s' % ctl.broadcast_bytes(token, 'setup').decode())
        self._slots = {}
        self._gen = 0

    def _path(self, rank, gen):
        return '%s-r%d-g%d' % (self._prefix, rank, gen)

    def _new_slot(self, numel):
        self._gen += 1
        slot = _Slot(numel, self._gen)
        path = self._path(self.ctl.rank, slot.gen)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, numel * 4)
            slot.own_map = mmap.mmap(fd, numel * 4)
        finally:
            os.close(fd)
        slot.own_path = path
        slot.own = torch.frombuffer(slot.own_map, dtype=torch.float32, count=numel)
        pin = self.device.type == 'cuda'
        slot.acc = torch.empty(numel, dtype=torch.float32, pin_memory=pin)
        slot.stage = torch.empty(numel, dtype=torch.float32, pin_memory=True) if pin else None
        return slot

    def _attach(self, slot, rank, gen):
        self._detach(slot, rank)
        path = self._path(rank, gen)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise ExchangeError('rank %d: the shared-memory segment of rank %d (%s) is gone; pass '
                                'the same buffers in the same order on every rank'
                                % (self.ctl.rank, rank, path)) from None
        try:
            size = os.fstat(fd).st_size
            if size != slot.numel * 4:
                raise ExchangeError('rank %d: rank %d\'s segment %s holds %d bytes, expected %d'
                                    % (self.ctl.rank, rank, path, size, slot.numel * 4))
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        slot.maps[rank] = mm
        slot.peers[rank] = torch.frombuffer(mm, dtype=torch.float32, count=slot.numel)
        slot.views[rank] = gen

    @staticmethod
    def _detach(slot, rank):
        slot.peers.pop(rank, None)
        mm = slot.maps.pop(rank, None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass      # a view is still alive; the mapping goes with it

    def average_(self, flat):
        ctl, world, rank = self.ctl, self.ctl.world, self.ctl.rank
        key = (flat.data_ptr(), flat.numel())
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = self._new_slot(flat.numel())
        if flat.is_cuda:
            slot.stage.copy_(flat, non_blocking=True)
            _stream_sync(flat.device)
            slot.own.copy_(slot.stage)
        else:
            slot.own.copy_(flat)
        table = ctl.gather_i64([flat.numel(), slot.gen], 'average_ (host, barrier A)')
        _check_sizes(table[:, 0], rank)
        for r in range(world):
            if r != rank and slot.views.get(r) != int(table[r, 1]):
                self._attach(slot, r, int(table[r, 1]))
        acc = slot.acc
        for r in range(world):
            src = slot.own if r == rank else slot.peers[r]
            if r == 0:
                acc.copy_(src)
            else:
                acc.add_(src)
        acc.div_(world)
        ctl.barrier('average_ (host, barrier B)')
        if slot.fresh:               # every peer has mapped it by now
            slot.fresh = False
            _unlink(slot.own_path)
        if flat.is_cuda:
            flat.copy_(acc, non_blocking=True)
            _stream_sync(flat.device)     # acc is pinned and rewritten next call
        else:
            flat.copy_(acc)

    def close(self):
        for slot in self._slots.values():
            for r in list(slot.maps):
                self._detach(slot, r)
            if slot.fresh:
                _unlink(slot.own_path)
            slot.own = None
            try:
                slot.own_map.close()
            except BufferError:
                pass
        self._slots.clear()


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _check_sizes(sizes, rank):
    sizes = [int(n) for n in sizes]
    if len(set(sizes)) != 1:
        raise ExchangeError('average_: replicas pass buffers of different sizes (%s) [rank %d]'
                            % (', '.join('rank %d: %d' % (r, n) for r, n in enumerate(sizes)), rank))


class _P2P:
    """CUDA IPC handles over ZeroMQ, device-to-device copies, two barriers per exchange."""

    MAX_MSG = 1 << 16

    @staticmethod
    def impossible(ctl, device):
        """Why peer copies cannot work between these replicas' GPUs, or '' when they can (the
        same answer on every rank)."""
        why = ''
        local = _local_gpu_indices(ctl.gather_i64(_pci_id(device.index), 'setup (p2p)'))
        for r in range(ctl.world):
            j = local[r]
            if j is None:
                why = 'the GPU of rank %d is not visible to rank %d' % (r, ctl.rank)
                break
            if j != device.index and not torch.cuda.can_device_access_peer(device.index, j):
                why = 'GPU %d cannot access GPU %d directly' % (device.index, j)
                break
        ok = ctl.all_min(0 if why else 1, 'setup (p2p)')
        if not ok and not why:
            why = 'another rank cannot reach its peers\' GPUs'
        return why

    def __init__(self, ctl, device, secret=None):
        import zmq
        self.zmq = zmq
        self.ctl, self.device = ctl, device
        rank, world = ctl.rank, ctl.world
        secret = secret or os.environ.get(launch.SECRET_ENV)
        if secret is None:
            secret = ctl.broadcast_bytes(secrets.token_bytes(32) if rank == 0 else b'', 'setup')
        self._key = secret.encode() if isinstance(secret, str) else bytes(secret)
        self._local = _local_gpu_indices(ctl.gather_i64(_pci_id(device.index), 'setup (p2p)'))
        self._dir = tempfile.mkdtemp(prefix='xchg-') if rank == 0 else ''
        self._dir = ctl.broadcast_bytes(self._dir.encode(), 'setup (p2p)').decode()
        self._ctx = zmq.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.MAXMSGSIZE, self.MAX_MSG)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._push = {}
        self._slots = {}
        self._gen = 0
        self._round = 0
        try:
            endpoint = self._endpoint(rank)
            if len(endpoint) > 100:
                raise ExchangeError('ipc endpoint %r is too long for ZeroMQ; set TMPDIR to a '
                                    'shorter directory' % endpoint)
            self._pull.bind(endpoint)
            ctl.barrier('setup (p2p sockets)')
            for r in range(world):
                if r != rank:
                    s = self._ctx.socket(zmq.PUSH)
                    s.setsockopt(zmq.SNDTIMEO, int(ctl.timeout * 1000))
                    s.setsockopt(zmq.LINGER, int(ctl.timeout * 1000))
                    s.connect(self._endpoint(r))
                    self._push[r] = s
        except BaseException:
            self.close()
            raise

    def _endpoint(self, rank):
        return 'ipc://' + os.path.join(self._dir, 'r%d' % rank)

    # registration -------------------------------------------------------------------------------
    def _handle_message(self, flat, slot):
        storage = flat.untyped_storage()
        (dev, handle, size_bytes, offset_bytes, rc_handle, rc_offset, ev_handle,
         ev_sync) = storage._share_cuda_()
        b64 = lambda b: None if b is None else base64.b64encode(bytes(b)).decode('ascii')
        body = {'type': 'cuda_ipc', 'round': self._round, 'from': self.ctl.rank,
                'numel': slot.numel, 'gen': slot.gen, 'tensor_offset': flat.storage_offset(),
                'device': int(dev), 'handle': b64(handle), 'size_bytes': int(size_bytes),
                'offset_bytes': int(offset_bytes), 'ref_counter_handle': b64(rc_handle),
                'ref_counter_offset': int(rc_offset), 'event_handle': b64(ev_handle),
                'event_sync_required': bool(ev_sync)}
        payload = json.dumps(body, sort_keys=True).encode()
        return [payload, hmac.new(self._key, payload, hashlib.sha256).digest()]

    def _register(self, flat, slot, table):
        """Everyone sends its handle to everyone; each opens the buffers it has not opened yet."""
        zmq, ctl = self.zmq, self.ctl
        self._round += 1
        msg = self._handle_message(flat, slot)
        for r, s in self._push.items():
            try:
                s.send_multipart(msg, copy=True)
            except zmq.Again:
                raise ExchangeError('rank %d stopped responding during p2p registration: could not '
                                    'send to it within %.0f s [rank %d]'
                                    % (r, ctl.timeout, ctl.rank)) from None
        got = {}
        deadline = time.monotonic() + ctl.timeout
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        while len(got) < ctl.world - 1:
            left = deadline - time.monotonic()
            missing = [r for r in range(ctl.world) if r != ctl.rank and r not in got]
            dead = [r for r in missing if ctl.local[r] and not _pid_alive(ctl.pids[r])]
            if dead or left <= 0:
                raise ExchangeError('rank %s stopped responding during p2p registration (%s) '
                                    '[rank %d]' % (', '.join(map(str, dead or missing)),
                                                   'process exited' if dead else
                                                   'no message within %.0f s' % ctl.timeout,
                                                   ctl.rank))
            if not poller.poll(int(min(left, 0.5) * 1000) + 1):
                continue
            frames = self._pull.recv_multipart()
            body = self._check_message(frames, table)
            if body['from'] in got:
                raise ExchangeError('rank %d: two registration messages from rank %d'
                                    % (ctl.rank, body['from']))
            got[body['from']] = body
        for r, body in got.items():
            if slot.views.get(r) != body['gen']:
                slot.peers[r] = self._open(body)
                slot.views[r] = body['gen']

    def _check_message(self, frames, table):
        ctl = self.ctl
        bad = lambda why: ExchangeError('rank %d: refused a p2p registration message: %s'
                                        % (ctl.rank, why))
        if len(frames) != 2:
            raise bad('%d frames, expected 2' % len(frames))
        payload, mac = frames
        if not hmac.compare_digest(mac, hmac.new(self._key, payload, hashlib.sha256).digest()):
            raise bad('authentication failed (wrong secret?)')
        try:
            body = json.loads(payload.decode('utf-8'))
        except (UnicodeDecodeError, ValueError) as e:
            raise bad('not JSON (%s)' % e) from None
        ints = ('round', 'from', 'numel', 'gen', 'tensor_offset', 'device', 'size_bytes',
                'offset_bytes', 'ref_counter_offset')
        fields = set(ints) | {'type', 'handle', 'ref_counter_handle', 'event_handle',
                              'event_sync_required'}
        if not isinstance(body, dict) or set(body) != fields:
            raise bad('unexpected fields %s' % (sorted(body) if isinstance(body, dict) else body))
        for k in ints:
            if type(body[k]) is not int or body[k] < 0:
                raise bad('field %s=%r is not a non-negative integer' % (k, body[k]))
        if body['type'] != 'cuda_ipc' or body['round'] != self._round:
            raise bad('type %r round %r, expected cuda_ipc round %d'
                      % (body['type'], body['round'], self._round))
        r = body['from']
        if r == ctl.rank or r >= ctl.world:
            raise bad('sender rank %d is not a peer' % r)
        if body['numel'] != int(table[r, 0]) or body['gen'] != int(table[r, 1]):
            raise bad('rank %d announces %d elements (buffer %d), expected %d (buffer %d)'
                      % (r, body['numel'], body['gen'], table[r, 0], table[r, 1]))
        if (body['tensor_offset'] + body['numel']) * 4 > body['size_bytes']:
            raise bad('rank %d\'s buffer does not fit in its storage' % r)
        if type(body['event_sync_required']) is not bool:
            raise bad('event_sync_required is not a boolean')
        for k in ('handle', 'ref_counter_handle', 'event_handle'):
            v = body[k]
            if v is None and k == 'event_handle':
                continue
            try:
                raw = base64.b64decode(v.encode('ascii'), validate=True)
            except (AttributeError, ValueError, UnicodeEncodeError):
                raise bad('field %s is not base64' % k) from None
            if not 0 < len(raw) <= 4096:
                raise bad('field %s has %d bytes' % (k, len(raw)))
            body[k] = raw
        return body

    def _open(self, body):
        """The peer's buffer as a tensor in this process (CUDA IPC), on the peer's GPU."""
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
    def average_(self, flat):
        ctl, world, rank = self.ctl, self.ctl.world, self.ctl.rank
        key = (flat.data_ptr(), flat.numel())
        slot = self._slots.get(key)
        if slot is None:
            self._gen += 1
            slot = self._slots[key] = _Slot(flat.numel(), self._gen)
            slot.recv = torch.empty_like(flat)
            slot.acc = torch.empty_like(flat) if world > 2 else None
        _stream_sync(self.device)            # our buffer holds its final values
        # barrier A, and which buffer each rank passes / has opened
        views = [slot.gen if r == rank else slot.views.get(r, 0) for r in range(world)]
        table = ctl.gather_i64([flat.numel(), slot.gen] + views, 'average_ (p2p, barrier A)')
        _check_sizes(table[:, 0], rank)
        gens = table[:, 1]
        if any((table[r, 2:] != gens).any() for r in range(world)):
            with ctl.guard('average_ (p2p registration)'):
                self._register(flat, slot, table)
        with ctl.guard('average_ (p2p copies)'):
            if world == 2:
                peer = 1 - rank
                slot.recv.copy_(slot.peers[peer])      # device-to-device peer copy
                slot.recv.add_(flat)                   # x0 + x1 on both ranks: bitwise equal
                result = slot.recv
            else:
                result = slot.acc
                for r in range(world):
                    if r == rank:
                        src = flat
                    else:
                        slot.recv.copy_(slot.peers[r])
                        src = slot.recv
                    if r == 0:
                        result.copy_(src)
                    else:
                        result.add_(src)
            _stream_sync(self.device)          # the copies are complete: peers may write again
            for r, t in slot.peers.items():
                if t.device != self.device:
                    _stream_sync(t.device)
        ctl.barrier('average_ (p2p, barrier B)')
        torch.div(result, world, out=flat)

    def close(self):
        for slot in self._slots.values():
            slot.peers.clear()
        self._slots.clear()
        for s in self._push.values():
            s.close(linger=0)
        self._push.clear()
        if getattr(self, '_pull', None) is not None:
            self._pull.close(linger=0)
            self._pull = None
        if getattr(self, '_ctx', None) is not None:
            self._ctx.term()
            self._ctx = None
        if self.ctl.rank == 0 and getattr(self, '_dir', ''):
            shutil.rmtree(self._dir, ignore_errors=True)


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
