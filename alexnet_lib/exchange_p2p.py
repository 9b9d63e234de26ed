"""The p2p backend's memory: CUDA IPC handles and device-to-device peer copies (the original's
scheme, one node with GPUs). The average itself is exchange_rank_order.RankOrderAverage's.

Each rank owns a send buffer of two halves on its GPU and hands the others its CUDA IPC handle
over the control group (JSON, checked field by field, nothing unpickled) once, and again only
when a larger buffer is needed. Publishing copies the buffer into the current half and
synchronises the stream (which also completes this rank's reads of the previous exchange);
reading a peer's half is a device-to-device copy into a buffer on this GPU, then summed there.
"""
import json

import torch

from alexnet_lib.exchange_control import ExchangeError, stream_sync
from alexnet_lib.exchange_rank_order import RankOrderAverage


class P2P(RankOrderAverage):
    """See the module's docstring. unavailable() says why peer copies cannot work between these
    GPUs (make_exchanger then uses the registry's fallback, host)."""
    name = 'p2p'
    copies_peers = True

    @staticmethod
    def unavailable(ctl, device):
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
        super().__init__(ctl, device)
        self.sum_device = device
        self._local = _local_gpu_indices(ctl.gather_i64(_pci_id(device.index), 'setup (p2p)'))
        self._peer_gen = 0
        self._peers = {}             # rank -> that rank's send buffer (2 * cap), opened here
        self._send = None

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

    # the memory of RankOrderAverage ------------------------------------------------------------
    def _allocate(self, n):
        self._peers = {}
        self._send = torch.empty(2 * n, dtype=torch.float32, device=self.device)

    def _publish(self, flat, half):
        lo = half * self._cap
        self._send[lo:lo + flat.numel()].copy_(flat)
        stream_sync(self.device)
        for t in self._peers.values():           # previous copies, if on the peers' streams
            if t.device != self.device:
                stream_sync(t.device)

    def _after_barrier(self):
        if self._peer_gen != self._gen:
            self._register()

    def _half(self, r, half, n):
        lo = half * self._cap
        return (self._send if r == self.ctl.rank else self._peers[r])[lo:lo + n]

    def close(self):
        # nobody frees (or exits with) a send buffer that a peer's copy may still be reading
        try:
            if self._cap:
                stream_sync(self.device)
                for t in self._peers.values():
                    if t.device != self.device:
                        stream_sync(t.device)
                self.ctl.barrier('close (p2p)')
        except Exception:
            pass      # a peer is gone or the exchange failed earlier: nothing left to protect
        self._peers = {}
        self._send = None
        self._scratch = {}


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
