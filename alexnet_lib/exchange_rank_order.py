"""The average of the p2p and host backends: double-buffered, summed in rank order, so that every
replica ends with the same bits, those of (x0 + x1 + ... + x_{world-1}) / world.

RankOrderAverage is the scheme, written once; a backend gives only its memory:

    _allocate(n)          this rank's two halves of n elements each, published to the peers
                          (every rank calls it at the same exchange, with the same n)
    _publish(flat, half)  copy flat into this rank's half `half` (0 or 1); the copy is complete,
                          visible to the peers, when it returns
    _half(r, half, n)     a view of rank r's half (n elements) as this process sees it
    _after_barrier()      optional: after barrier A, before the first read (p2p: registration)
    sum_device            where the sum is taken (this rank's GPU for p2p, the CPU for host)
    copies_peers          True: a peer's half is copied onto the summing device before it is
                          added (p2p: a device-to-device peer copy); False: added in place

One exchange: publish into the current half; barrier A (every rank has published; all check
that they pass the same size); sum the halves in rank order and write sum / world into the
buffer. The halves are used alternately: a half is written again two exchanges later, after the
next barrier A, which no peer reaches before it has finished reading that half.

Host is the memory of shared host segments; the p2p memory (CUDA IPC) is in exchange_p2p.py.
"""
import mmap
import os
import secrets
import tempfile

import torch

from alexnet_lib.exchange_control import ExchangeError, Plane, stream_sync


class RankOrderAverage(Plane):
    """The scheme above, a data plane (exchange.py's interface); subclasses give the memory."""
    name = ''
    sum_device = torch.device('cpu')
    copies_peers = False

    def __init__(self, ctl, device):
        super().__init__(ctl, device)
        self._cap = self._gen = self._calls = 0
        self._scratch = {}           # 'acc', 'recv' -> buffers of _cap on the summing device

    def _after_barrier(self):
        pass

    def _buffer(self, key, n):
        """Scratch buffer `key` on the summing device (made when first needed after a growth;
        pinned when it is host memory that a GPU buffer is copied from)."""
        buf = self._scratch.get(key)
        if buf is None:
            pin = self.sum_device.type == 'cpu' and self.device.type == 'cuda'
            buf = self._scratch[key] = torch.empty(self._cap, dtype=torch.float32,
                                                   device=self.sum_device, pin_memory=pin)
        return buf[:n]

    def average_(self, flat):
        ctl, n = self.ctl, flat.numel()
        if n > self._cap:
            self._cap, self._gen, self._scratch = n, self._gen + 1, {}
            self._allocate(n)
        half = self._calls % 2
        self._calls += 1
        self._publish(flat, half)
        check_table(ctl.gather_i64([n, self._gen], f'average_ ({self.name}, barrier A)'),
                    ctl.rank)
        self._after_barrier()
        with ctl.guard(f'average_ ({self.name}, sum)'):
            acc = self._sum(flat, half, n)
            if acc is flat:
                flat.div_(ctl.world)
            elif acc.device == flat.device:
                torch.div(acc, ctl.world, out=flat)
            else:
                acc.div_(ctl.world)
                flat.copy_(acc, non_blocking=True)
                stream_sync(flat.device)    # acc is pinned and rewritten next call

    def _sum(self, flat, half, n):
        """The replicas' halves summed in rank order: flat itself (rank 0, summing where flat
        lives), or the 'acc' buffer."""
        rank, here = self.ctl.rank, self.sum_device

        def values(r):              # rank r's values, readable on the summing device
            if r == rank and flat.device == here:
                return flat
            src = self._half(r, half, n)
            return self._buffer('recv', n).copy_(src) if self.copies_peers else src

        if rank == 0 and flat.device == here:
            acc = flat
        else:
            acc = self._buffer('acc', n).copy_(self._half(0, half, n))
        for r in range(1, self.ctl.world):
            acc.add_(values(r))
        return acc


def check_table(table, rank):
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


class Host(RankOrderAverage):
    """Shared-memory segments, one file per rank in /dev/shm (mode 0600) holding its two halves.
    Segments grow to the largest buffer seen (every rank sees the same sizes, so they grow
    together) and are unlinked as soon as every peer has mapped them: a crash leaves nothing
    behind, unless a rank is killed in the moment between making a segment and its peers
    mapping it. GPU buffers are staged through pinned memory. A segment's name,
    xchg-<pid of rank 0>-<random>-r<rank>-g<generation>, says which run left it."""
    name = 'host'

    def __init__(self, ctl, device):
        super().__init__(ctl, device)
        shm = '/dev/shm' if os.path.isdir('/dev/shm') else tempfile.gettempdir()
        # rank 0's pid first: runs that share the folder (and a check for leftovers that looks
        # at one run only) tell their segments apart without asking anyone
        token = ctl.all_gather_bytes(f'{os.getpid()}-{secrets.token_hex(8)}'.encode(),
                                     'setup')[0].decode()
        self._prefix = os.path.join(shm, f'xchg-{token}')
        self._maps = {}              # rank -> mmap of that rank's segment (own included)
        self._halves = {}            # rank -> (half 0, half 1) float32 tensors over the mmap
        self._own_path = None
        self._stage = None

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
                self._reserve(fd, nbytes, path)
            elif os.fstat(fd).st_size != nbytes:
                raise ExchangeError(f'rank {self.ctl.rank}: segment {path} of rank {rank} holds '
                                    f'{os.fstat(fd).st_size} bytes, expected {nbytes:d}')
            mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        whole = torch.frombuffer(mm, dtype=torch.float32, count=2 * self._cap)
        self._maps[rank] = mm
        self._halves[rank] = (whole[:self._cap], whole[self._cap:])

    def _reserve(self, fd, nbytes, path):
        """The segment's memory, taken now: a shared-memory folder too small for it (a
        container's 64 MB /dev/shm) is an error naming it here, not a SIGBUS at a later
        write."""
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            raise ExchangeError(
                f'rank {self.ctl.rank}: exchange: host needs {nbytes / 2**20:.0f} MiB of shared '
                f'memory per replica in {os.path.dirname(path)} ({e.strerror}): use exchange: '
                f'gloo, or give it more room (a container: docker run --shm-size)') from None

    def _unmap_all(self):
        self._halves.clear()
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass             # a view is still alive somewhere; the mapping goes with it
        self._maps.clear()

    def _allocate(self, n):
        """New, larger segments on every rank (all ranks call this at the same exchange)."""
        ctl = self.ctl
        self._unmap_all()
        if self._own_path:
            _unlink(self._own_path)
        self._own_path = self._path(ctl.rank, self._gen)
        self._map(ctl.rank, self._own_path, create=True)
        if self.device.type == 'cuda':
            self._stage = torch.empty(n, dtype=torch.float32, pin_memory=True)
        # same shape as barrier A's gather: a rank that does not grow meets this one there, and
        # both see that the sizes differ
        check_table(ctl.gather_i64([n, self._gen], 'average_ (host, new segments)'), ctl.rank)
        for r in range(ctl.world):
            if r != ctl.rank:
                self._map(r, self._path(r, self._gen), create=False)
        ctl.barrier('average_ (host, segments mapped)')
        _unlink(self._own_path)
        self._own_path = None

    def _publish(self, flat, half):
        n = flat.numel()
        own = self._halves[self.ctl.rank][half][:n]
        if flat.is_cuda:
            stage = self._stage[:n]
            stage.copy_(flat, non_blocking=True)
            stream_sync(flat.device)
            own.copy_(stage)
        else:
            own.copy_(flat)

    def _half(self, r, half, n):
        return self._halves[r][half][:n]

    def close(self):
        self._unmap_all()
        self._scratch = {}
        if self._own_path:
            _unlink(self._own_path)
            self._own_path = None


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
