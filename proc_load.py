#!/usr/bin/env python3
"""Parallel loading (report §2.1, ``para_load: True``): a loader process fills the trainer's input
buffers while the trainer computes, so the GPU never waits for data.

Trainer side (same interface as ``data.SerialLoader``)::

    from proc_load import ParallelLoader, LoaderError
    with ParallelLoader('cuda:0', max_rows=256, prefetch=2, port=5001) as loader:
        for images in loader.iterate([(path, 0, 256), ...]):
            ...   # uint8 (hi-lo, 256, 256, 3) on the device, valid until the next item is taken

Loader side: this file run as a script (``python proc_load.py --help``). ``ParallelLoader`` starts
it; it is not meant to be started by hand.

Design
------
* Buffers. The trainer owns ``prefetch`` (>= 2) buffers of ``max_rows`` images. On a GPU they are
  ordinary CUDA tensors of the trainer, handed to the loader as CUDA IPC handles (the original
  handed over PyCUDA IPC handles); on the CPU they are anonymous shared-memory files (memfd)
  passed to the loader as inherited file descriptors, so no named segment can leak when a process
  is SIGKILLed and no other process can open them by name. ``prefetch`` counts every request the
  loader holds a buffer for, the one being consumed included: 2 is the original's double
  buffering (train on one buffer while the other one loads).
* Loading. The loader reads the requested rows with ``batch_files.read_rows`` straight into
  pinned host memory and issues the host->GPU copy on its own CUDA stream at once (asynchronous),
  so the next request's read overlaps this one's copy (two pinned staging buffers). Requests
  larger than CHUNK_ROWS are read and copied in chunks (copy of chunk i overlaps the read of
  chunk i+1). When a request's copies are complete (a CUDA event on the loader's stream, i.e.
  that stream synchronised up to them) the loader reports the buffer ready.
* Freeing. When the consumer takes the next item, the trainer records, per buffer, an
  *interprocess* CUDA event on its current stream and at once tells the loader the buffer's next
  request; the loader's stream waits on that event (GPU-side) before overwriting the buffer.
  The trainer never blocks on its own GPU work and the loader learns about a free buffer as soon
  as the consumer moves on, not at the trainer's next visit to the loader (which, with two
  buffers, would serialise loading and compute). If interprocess events are unavailable, the
  trainer falls back to a plain event that it polls, and sends the request once it completed.
* Socket. The trainer binds a ZeroMQ ROUTER socket on tcp://127.0.0.1:<port> (``sock_data``);
  if the port is taken it prints one line and binds a free port. ``port=None`` uses an ipc://
  endpoint inside a private 0700 directory instead. The *trainer* binds (not the loader, as in
  the original) because it owns the port choice: a clash is resolved before the loader exists,
  and the actual endpoint reaches the loader with the key over the loader's private stdin pipe,
  so no output has to be parsed and there is no bind/connect race.
* Trust. A random 32-byte key goes to the loader over its stdin pipe (never argv or the
  environment). Every message, both ways, is one JSON object plus its HMAC-SHA256 under that key,
  checked with ``hmac.compare_digest`` and then checked field by field for type before use;
  the trainer also only accepts the ZeroMQ peer that first said hello with the loader's pid.
  Anything else (a stranger on the port, garbage, a wrong key) is dropped. Nothing from a socket
  is ever unpickled.
* Failures. Every wait polls in slices of POLL_MS with an overall ``timeout``. The trainer checks
  the loader's exit status in every slice: a loader error (message naming the file) or death
  (signal, exit status, stderr tail) raises LoaderError within a second and the loader is
  reaped. The loader exits when its stdin pipe reaches EOF or its parent pid changes (trainer
  dead), on a 'stop' message, and on SIGINT (Ctrl-C reaches both processes). It ignores
  SIGTERM, so that a preempted trainer can finish its step and write a snapshot.
"""
import argparse
import collections
import base64
import hashlib
import hmac
import json
import mmap
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import zmq

from alexnet_lib.batch_files import IMAGE_SHAPE, read_rows
from alexnet_lib.errors import UserError

LOADER_SCRIPT = os.path.abspath(__file__)
ROW_BYTES = int(np.prod(IMAGE_SHAPE))
CHUNK_ROWS = 128            # most rows per read_rows call (and GPU copy) in the loader; each
                            # call opens the file (~1 ms), so small chunks cost throughput
N_STAGING = 2               # pinned host staging buffers in the loader (read k+1 while copying k)
MAX_MESSAGE_BYTES = 1 << 16
POLL_MS = 100               # liveness checks at least this often in every wait
READY_POLL_S = 1e-4         # how often the loader looks whether a copy to the GPU is done
STOP_WAIT_S = 5.0           # how long close() waits for the loader before terminating it
DEATH_GRACE_S = 0.5         # after the loader died: how long to wait for its last messages
STDERR_TAIL = 4000

_NONE = type(None)
# message schemas: type -> {field: allowed exact types}
TO_LOADER = {
    'setup': {'device': (str,), 'max_rows': (int,), 'chunk_rows': (int,), 'buffers': (list,),
              'events': (list, _NONE)},
    'load': {'seq': (int,), 'path': (str,), 'lo': (int,), 'hi': (int,), 'buf': (int,)},
    'stop': {},
}
TO_TRAINER = {
    'hello': {'pid': (int,)},
    'setup_ok': {},
    'ready': {'seq': (int,), 'buf': (int,)},
    'error': {'seq': (int, _NONE), 'message': (str,)},
}


class LoaderError(UserError):
    """The loader process failed (a missing or corrupt batch file, named in the message) or died."""


# ---------------------------------------------------------------------------------------------
# messages: JSON body + HMAC-SHA256 under the shared key; verified and type-checked before use

def _seal(key, msg):
    body = json.dumps(msg, separators=(',', ':')).encode()
    return [body, hmac.new(key, body, hashlib.sha256).hexdigest().encode()]


def _unseal(key, frames, schema):
    """The message in ``frames`` if its MAC is right and it matches ``schema``; otherwise None."""
    if len(frames) != 2:
        return None
    body, mac = frames
    if len(body) > MAX_MESSAGE_BYTES or len(mac) != 64:
        return None
    if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).hexdigest().encode(), mac):
        return None
    try:
        msg = json.loads(body)
    except ValueError:
        return None
    if not isinstance(msg, dict) or not isinstance(msg.get('type'), str):
        return None
    fields = schema.get(msg['type'])
    if fields is None:
        return None
    for name, types in fields.items():
        if name not in msg or type(msg[name]) not in types:   # exact: no bool for int
            return None
    return msg


def _b64(b):
    return base64.b64encode(b).decode('ascii')


def _pack_ipc(values):
    """A tuple from ``storage._share_cuda_()`` as JSON: bytes become {"b64": ...}."""
    out = []
    for v in values:
        if isinstance(v, bytes):
            out.append({'b64': _b64(v)})
        elif v is None or type(v) in (bool, int):
            out.append(v)
        else:
            raise TypeError(f"unexpected {type(v).__name__} in a CUDA IPC handle")
    return out


def _unpack_ipc(values):
    out = []
    for v in values:
        if isinstance(v, dict) and set(v) == {'b64'} and isinstance(v['b64'], str):
            out.append(base64.b64decode(v['b64'], validate=True))
        elif v is None or type(v) in (bool, int):
            out.append(v)
        else:
            raise ValueError("malformed CUDA IPC handle")
    return tuple(out)


def _signal_text(returncode):
    if returncode < 0:
        try:
            return f"was killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


# ---------------------------------------------------------------------------------------------
# trainer side

class ParallelLoader:
    """Delivers batch-file rows into the trainer's device memory from a separate loader process.

    ``device``: 'cpu' or a CUDA device. ``max_rows``: the most rows one request asks for.
    ``prefetch`` (>= 2): number of buffers, i.e. requests held by the loader at once, the one
    being consumed included. ``port``: TCP port on 127.0.0.1 (``sock_data``); a taken port is
    replaced by a free one with a notice; 0 means any free port, None an ipc:// endpoint in a
    private directory. ``timeout``: the longest wait for any answer of the loader, in seconds.
    """

    _use_ipc_events = True   # False: the fallback (trainer polls its own events); for tests

    def __init__(self, device, max_rows, prefetch=2, port=5001, timeout=60.0):
        import torch
        self.device = torch.device(device)
        if self.device.type == 'cuda' and self.device.index is None:
            self.device = torch.device('cuda', torch.cuda.current_device())
        if self.device.type not in ('cpu', 'cuda'):
            raise ValueError(f"ParallelLoader: device must be 'cpu' or CUDA, not {device!r}")
        if type(max_rows) is not int or max_rows < 1:
            raise ValueError(f"ParallelLoader: max_rows must be a positive int, not {max_rows!r}")
        if type(prefetch) is not int or prefetch < 2:
            raise ValueError(f"ParallelLoader: prefetch (config key 'prefetch') must be an int "
                             f">= 2 (double buffering at least), not {prefetch!r}")
        if not timeout > 0:
            raise ValueError(f"ParallelLoader: timeout must be > 0, not {timeout!r}")
        self.max_rows, self.prefetch, self.timeout = max_rows, prefetch, float(timeout)
        self.endpoint = None
        self.pid = None
        self._proc = self._sock = self._ctx = self._peer = None
        self._ipc_dir = None
        self._stderr = None
        self._closed = False
        self._broken = None          # the LoaderError that ended this loader, re-raised on use
        self._active = False         # an iterate() generator is running
        self._views = []             # per buffer: the trainer's tensor (max_rows, 256, 256, 3)
        self._mmaps = []
        self._events = None          # CUDA: per buffer, interprocess event the loader waits on
        self._free = collections.deque()      # buffers the loader may fill now
        self._pending = collections.deque()   # (buf, event): fallback, free once event completes
        self._stale = {}             # seq -> buf: loads of an abandoned iterate() still in flight
        self._sent = {}              # seq -> buf of every load the loader has not reported yet
        self._seq = 0
        self._strangers = 0
        self._error = None           # a loader error for a request behind the ones already ready
        try:
            self._start(port)
        except BaseException:
            self.close()
            raise

    # -- start-up ------------------------------------------------------------------------------
    def _bind(self, port):
        sock = self._sock
        if port is None:
            self._ipc_dir = tempfile.mkdtemp(prefix='proc_load-')   # mode 0700
            ep = f'ipc://{self._ipc_dir}/data'
            sock.bind(ep)
            return ep
        if type(port) is not int or not 0 <= port < 65536:
            raise ValueError(f"ParallelLoader: port (sock_data) must be an int in [0, 65535] or "
                             f"None, not {port!r}")
        if port:
            try:
                sock.bind(f'tcp://127.0.0.1:{port}')
                return sock.getsockopt(zmq.LAST_ENDPOINT).decode()
            except zmq.ZMQError as e:
                if e.errno != zmq.EADDRINUSE:
                    raise
        sock.bind('tcp://127.0.0.1:*')
        ep = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        if port:
            print(f"proc_load: port {port} on 127.0.0.1 is in use; the loader socket uses {ep} "
                  f"instead", file=sys.stderr, flush=True)
        return ep

    def _start(self, port):
        import torch
        self._key = secrets.token_bytes(32)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 256)  # strangers can't flood
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.endpoint = self._bind(port)

        nbytes = self.max_rows * ROW_BYTES
        shape = (self.max_rows,) + IMAGE_SHAPE
        fds, buffers, events = [], [], None
        try:
            if self.device.type == 'cpu':
                for i in range(self.prefetch):
                    fd = (os.memfd_create(f'proc_load_buf{i}') if hasattr(os, 'memfd_create')
                          else _anonymous_file())
                    fds.append(fd)
                    os.ftruncate(fd, nbytes)
                    mm = mmap.mmap(fd, nbytes)
                    self._mmaps.append(mm)
                    self._views.append(torch.from_numpy(
                        np.frombuffer(mm, np.uint8, nbytes).reshape(shape)))
                    buffers.append({'fd': fd, 'bytes': nbytes})
            else:
                with torch.cuda.device(self.device):
                    for _ in range(self.prefetch):
                        t = torch.empty(shape, dtype=torch.uint8, device=self.device)
                        self._views.append(t)
                        buffers.append({'ipc': _pack_ipc(t.untyped_storage()._share_cuda_())})
                    if self._use_ipc_events:
                        try:
                            self._events = [torch.cuda.Event(interprocess=True)
                                            for _ in range(self.prefetch)]
                            events = [_b64(bytes(e.ipc_handle())) for e in self._events]
                        except (RuntimeError, AttributeError) as e:
                            print(f"proc_load: interprocess CUDA events unavailable ({e}); the "
                                  f"trainer polls its own events instead", file=sys.stderr)
                            self._events = events = None
            self._stderr = tempfile.TemporaryFile()
            self._proc = subprocess.Popen(
                [sys.executable, LOADER_SCRIPT], stdin=subprocess.PIPE, stderr=self._stderr,
                pass_fds=fds, close_fds=True)
        finally:
            for fd in fds:          # the loader has its own copies now; the mmaps stay
                os.close(fd)
        self.pid = self._proc.pid
        boot = {'key': self._key.hex(), 'endpoint': self.endpoint, 'parent_pid': os.getpid(),
                'timeout': self.timeout}
        try:
            self._proc.stdin.write((json.dumps(boot) + '\n').encode())
            self._proc.stdin.flush()      # the pipe stays open: its EOF tells the loader we died
        except OSError:
            pass                          # it died at once: the wait below reports why
        deadline = time.monotonic() + self.timeout
        while self._peer is None:         # the hello fixes the loader's ZeroMQ identity
            self._pump(deadline, 'starting up', {})
        self._send({'type': 'setup', 'device': str(self.device), 'max_rows': self.max_rows,
                    'chunk_rows': CHUNK_ROWS, 'buffers': buffers, 'events': events})
        got = {}
        deadline = time.monotonic() + self.timeout
        while 'setup_ok' not in got:
            self._pump(deadline, 'opening the shared buffers', got)
        self._free.extend(range(self.prefetch))

    # -- messages ------------------------------------------------------------------------------
    def _send(self, msg):
        try:
            self._sock.send_multipart([self._peer] + _seal(self._key, msg), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            # the loader disconnected: usually it reported an error and is exiting. Its error
            # message (naming the file) may still be on its way: wait for it or for its exit.
            end = time.monotonic() + 2.0
            while self._error is None and self._proc.poll() is None and time.monotonic() < end:
                if not self._take({}):
                    self._sock.poll(20, zmq.POLLIN)
            if self._error is not None:
                raise self._fail(self._error)
            if self._proc.poll() is not None:
                self._drain({})
                raise self._died(f"sending it a '{msg['type']}' message")
            raise self._fail(f"cannot send to the loader process (pid {self.pid}) on "
                             f"{self.endpoint}: {e}")

    def _receive(self):
        """The next verified message from our loader, or None when none is waiting."""
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return None
            msg = None
            if len(frames) == 3 and (self._peer is None or frames[0] == self._peer):
                msg = _unseal(self._key, frames[1:], TO_TRAINER)
            if msg is not None and self._peer is None:
                if msg['type'] == 'hello' and msg['pid'] == self.pid:
                    self._peer = frames[0]
                    return msg
                msg = None
            if msg is None:
                self._strangers += 1
                if self._strangers == 1:
                    print(f"proc_load: ignored a message on {self.endpoint} that did not come "
                          f"from this trainer's loader", file=sys.stderr, flush=True)
                continue
            return msg

    def _pump(self, deadline, what, ready, slice_ms=POLL_MS):
        """Wait up to ``slice_ms`` for loader messages and handle those that came ('ready' ones
        go into ``ready``: seq -> buf). Raises LoaderError when the loader reported an error, died,
        or has been silent past ``deadline``."""
        if self._error is not None:
            raise self._fail(self._error)
        if self._take(ready):
            return
        if self._proc.poll() is not None:
            if self._drain(ready):   # what it finished before it went is still delivered
                return
            raise self._died(what)
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._fail(f"loader process (pid {self.pid}) sent nothing for "
                             f"{self.timeout:g} s while {what}")
        self._sock.poll(max(1, min(slice_ms, int(left * 1000) + 1)), zmq.POLLIN)

    def _take(self, ready):
        """Handles the messages that are waiting; whether there were any."""
        got = False
        while True:
            msg = self._receive()
            if msg is None:
                return got
            got = True
            t = msg['type']
            if t == 'error':
                # the loader works in order: every request before the failed one is ready or
                # about to be; those are still delivered, the error comes when it is next
                if msg['seq'] is None:
                    raise self._fail(msg['message'])
                self._error = msg['message']
            if t == 'ready':
                if self._sent.pop(msg['seq'], None) != msg['buf']:
                    raise self._fail(f"loader process (pid {self.pid}) broke the protocol: "
                                     f"{msg!r}")
                if msg['seq'] in self._stale:
                    self._free.append(self._stale.pop(msg['seq']))
                else:
                    ready[msg['seq']] = msg['buf']
            elif t == 'setup_ok':
                ready['setup_ok'] = True

    def _drain(self, ready):
        """The loader has exited: takes what it sent before it went, which may still be on its
        way (until its error message comes, or for DEATH_GRACE_S); whether anything came."""
        got = False
        end = time.monotonic() + DEATH_GRACE_S
        while self._error is None and time.monotonic() < end:
            if self._take(ready):
                got = True
            else:
                self._sock.poll(20, zmq.POLLIN)
        return got

    def _stderr_tail(self):
        if self._stderr is None:
            return ''
        try:
            size = os.fstat(self._stderr.fileno()).st_size
            data = os.pread(self._stderr.fileno(), STDERR_TAIL, max(0, size - STDERR_TAIL))
            return data.decode('utf-8', 'replace').strip()
        except (OSError, ValueError):
            return ''

    def _died(self, what):
        """LoaderError for a loader that is gone (after _drain): its own error message if it
        sent one, else how it ended."""
        if self._error is not None:
            return self._fail(self._error)
        text = (f"loader process (pid {self.pid}) {_signal_text(self._proc.returncode)} "
                f"while {what}")
        tail = self._stderr_tail()
        if tail:
            text += f"; its stderr ends with:\n{tail}"
        return self._fail(text)

    def _fail(self, text):
        """Marks this loader broken, stops the loader process, returns the LoaderError."""
        if self._broken is None:
            self._broken = LoaderError(text)
        self._shutdown(forward_stderr=False)
        return self._broken

    # -- iteration ------------------------------------------------------------------------------
    def _check_request(self, req):
        try:
            path, lo, hi = req
            path = os.fspath(path)
        except (TypeError, ValueError):
            raise ValueError(f"ParallelLoader.iterate: a request must be (batch_file, lo, hi), "
                             f"not {req!r}") from None
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        lo, hi = int(lo), int(hi)
        if not 0 <= lo <= hi or hi - lo > self.max_rows:
            raise ValueError(f"ParallelLoader.iterate: rows [{lo}, {hi}) of {path!r}: need "
                             f"0 <= lo <= hi and at most max_rows={self.max_rows} rows")
        return path, lo, hi

    def _usable(self):
        if self._broken is not None:
            raise self._broken
        if self._closed:
            raise LoaderError("ParallelLoader is closed")

    def _release(self, buf):
        """The consumer is done with ``buf`` (it took the next item)."""
        if self.device.type == 'cpu':
            self._free.append(buf)
            return
        import torch
        stream = torch.cuda.current_stream(self.device)
        if self._events is not None:   # the loader's stream waits for this event on the GPU
            self._events[buf].record(stream)
            self._free.append(buf)
        else:                          # fallback: hand it back once our GPU work on it is done
            ev = torch.cuda.Event()
            ev.record(stream)
            self._pending.append((buf, ev))

    def _reclaim(self, block=False):
        while self._pending and (block or self._pending[0][1].query()):
            buf, ev = self._pending.popleft()
            deadline = time.monotonic() + self.timeout
            while not ev.query():      # our own GPU work; polled so that it cannot hang us
                if time.monotonic() > deadline:
                    raise LoaderError(f"the trainer's GPU work on input buffer {buf} did not "
                                      f"finish within {self.timeout:g} s")
                time.sleep(50e-6)
            self._free.append(buf)
            block = False

    def iterate(self, requests):
        """Yields, for each (batch_file, lo, hi) in ``requests`` and in order, a uint8 tensor
        (hi-lo, 256, 256, 3) on the device, valid until the next item is taken. Up to
        ``prefetch`` requests are with the loader at any time."""
        self._usable()
        if self._active:
            raise RuntimeError("ParallelLoader.iterate: another iteration is still running")
        self._active = True
        src = iter(requests)
        exhausted = False
        sent = collections.deque()     # (seq, buf, n, path, lo, hi), in order
        ready = {}
        out = None
        deadline = None
        try:
            while True:
                self._usable()
                self._reclaim()
                while not exhausted and self._free and self._error is None:
                    try:
                        path, lo, hi = self._check_request(next(src))
                    except StopIteration:
                        exhausted = True
                        break
                    buf = self._free.popleft()
                    self._seq += 1
                    self._send({'type': 'load', 'seq': self._seq, 'path': path, 'lo': lo,
                                'hi': hi, 'buf': buf})
                    sent.append((self._seq, buf, hi - lo, path, lo, hi))
                    self._sent[self._seq] = buf
                if sent:
                    seq, buf, n, path, lo, hi = sent[0]
                    if seq in ready:
                        sent.popleft()
                        del ready[seq]
                        deadline = None
                        out = buf
                        yield self._views[buf][:n]
                        out = None
                        self._release(buf)
                        continue
                    if deadline is None:
                        deadline = time.monotonic() + self.timeout
                    self._pump(deadline, f"loading rows [{lo}, {hi}) of {path!r}", ready,
                               1 if self._pending else POLL_MS)
                elif exhausted:
                    return
                elif self._pending:
                    self._reclaim(block=True)
                else:                    # every buffer is still with an abandoned iteration
                    if deadline is None:
                        deadline = time.monotonic() + self.timeout
                    self._pump(deadline, "finishing the loads of an abandoned iteration", ready)
        finally:
            self._active = False
            if self._broken is None and not self._closed:
                if out is not None:
                    self._release(out)
                for seq, buf, *_ in sent:          # still in flight: free when they arrive
                    if seq in ready:
                        self._free.append(buf)
                    else:
                        self._stale[seq] = buf

    # -- shutdown --------------------------------------------------------------------------------
    def _shutdown(self, forward_stderr=True):
        """Stops the loader process (bounded waits, then SIGTERM, then SIGKILL) and the socket."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                if self._peer is not None and self._sock is not None:
                    try:
                        self._sock.send_multipart(
                            [self._peer] + _seal(self._key, {'type': 'stop'}), zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
            try:
                proc.stdin.close()        # EOF: a second reason for the loader to go
            except OSError:
                pass
            for stop in (None, proc.terminate, proc.kill):
                if stop is not None and proc.poll() is None:
                    try:
                        stop()
                    except OSError:
                        pass
                try:
                    proc.wait(STOP_WAIT_S if stop is None else 2.0)
                    break
                except subprocess.TimeoutExpired:
                    continue
            if forward_stderr:
                tail = self._stderr_tail()
                if tail:
                    print(f"proc_load: loader process (pid {self.pid}) stderr:\n{tail}",
                          file=sys.stderr, flush=True)
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._ipc_dir is not None:
            for name in os.listdir(self._ipc_dir):
                try:
                    os.unlink(os.path.join(self._ipc_dir, name))
                except OSError:
                    pass
            try:
                os.rmdir(self._ipc_dir)
            except OSError:
                pass
            self._ipc_dir = None

    def close(self):
        """Stops the loader (bounded wait), frees the buffers. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._shutdown()
        cuda = self.device.type == 'cuda' and bool(self._views)
        self._views = []
        self._events = None
        self._pending.clear()
        for mm in self._mmaps:
            try:
                mm.close()
            except BufferError:   # a consumer still holds a tensor: freed when it is dropped
                pass
        self._mmaps = []
        if cuda:
            import torch
            torch.cuda.ipc_collect()   # blocks the loader held through IPC, now released

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _anonymous_file():
    """A file descriptor of an unlinked temporary file (where os.memfd_create is missing)."""
    f = tempfile.TemporaryFile()
    fd = os.dup(f.fileno())
    f.close()
    return fd


# ---------------------------------------------------------------------------------------------
# loader side

class _ParentGone(Exception):
    pass


class _Fatal(Exception):
    """An error already reported to the trainer: the loader stops."""


class Loader:
    """The loader process: connects to the trainer, fills the buffers it is told to fill."""

    def __init__(self, boot):
        self.key = bytes.fromhex(boot['key'])
        self.endpoint = boot['endpoint']
        self.parent_pid = boot['parent_pid']
        self.timeout = float(boot['timeout'])
        self.stdin_fd = sys.stdin.fileno()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 256)
        self.sock.connect(self.endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.stdin_fd, zmq.POLLIN)
        self.queue = collections.deque()   # load messages not started yet
        self.inflight = collections.deque()  # CUDA: (seq, buf, done event, staging index)
        self.last_seq = 0
        self.cuda = False
        self.host = []           # CPU: numpy views of the shared buffers
        self.gpu = []            # CUDA: the trainer's buffers, opened through IPC
        self.free_events = None
        self.stage_np, self.stage_t, self.stage_busy = [], [], []

    # -- messaging -------------------------------------------------------------------------------
    def send(self, msg):
        self.sock.send_multipart(_seal(self.key, msg))

    def error(self, seq, text):
        self.send({'type': 'error', 'seq': seq, 'message': text})
        self.sock.close(linger=2000)      # let the message reach the trainer before we go
        raise _Fatal(text)

    def check_parent(self):
        if os.getppid() != self.parent_pid:
            raise _ParentGone(f"trainer (pid {self.parent_pid}) is gone")

    def poll(self, timeout_ms):
        """Messages that arrived within ``timeout_ms``; raises _ParentGone if the trainer died."""
        events = dict(self.poller.poll(timeout_ms))
        if self.stdin_fd in events:
            if os.read(self.stdin_fd, 4096) == b'':
                raise _ParentGone(f"trainer (pid {self.parent_pid}) closed the pipe")
        self.check_parent()
        msgs = []
        if self.sock in events:
            while True:
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                msg = _unseal(self.key, frames, TO_LOADER)
                if msg is None:
                    print("proc_load loader: dropped a message that failed verification",
                          file=sys.stderr, flush=True)
                else:
                    msgs.append(msg)
        return msgs

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, msg):
        self.max_rows, self.chunk_rows = msg['max_rows'], msg['chunk_rows']
        if self.max_rows < 1 or self.chunk_rows < 1 or not msg['buffers']:
            self.error(None, f"bad setup message: {msg!r}")
        shape = (self.max_rows,) + IMAGE_SHAPE
        nbytes = self.max_rows * ROW_BYTES
        try:
            if msg['device'] == 'cpu':
                for b in msg['buffers']:
                    if not (isinstance(b, dict) and type(b.get('fd')) is int
                            and b.get('bytes') == nbytes):
                        raise ValueError(f"bad buffer description {b!r}")
                    mm = mmap.mmap(b['fd'], nbytes)
                    os.close(b['fd'])
                    self.host.append(np.frombuffer(mm, np.uint8, nbytes).reshape(shape))
            else:
                self.setup_cuda(msg, shape, nbytes)
        except _Fatal:
            raise
        except Exception as e:
            self.error(None, f"loader cannot open the trainer's {msg['device']} buffers: "
                             f"{type(e).__name__}: {e}")
        self.n_buffers = len(msg['buffers'])
        self.send({'type': 'setup_ok'})

    def setup_cuda(self, msg, shape, nbytes):
        import torch
        dev = torch.device(msg['device'])
        torch.cuda.set_device(dev)
        torch.cuda.init()
        self.cuda = True
        self.dev = dev
        for b in msg['buffers']:
            if not (isinstance(b, dict) and isinstance(b.get('ipc'), list)):
                raise ValueError(f"bad buffer description {b!r}")
            storage = torch.UntypedStorage._new_shared_cuda(*_unpack_ipc(b['ipc']))
            if storage.nbytes() < nbytes:
                raise ValueError(f"shared buffer holds {storage.nbytes()} bytes, need {nbytes}")
            t = torch.empty((0,), dtype=torch.uint8, device=dev)
            t.set_(storage, 0, shape)
            self.gpu.append(t)
        if msg['events'] is not None:
            if len(msg['events']) != len(msg['buffers']) or not all(
                    isinstance(h, str) for h in msg['events']):
                raise ValueError("bad event handles")
            self.free_events = [torch.cuda.Event.from_ipc_handle(
                dev, base64.b64decode(h, validate=True)) for h in msg['events']]
        self.stream = torch.cuda.Stream(dev)
        for _ in range(N_STAGING):
            st = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
            self.stage_t.append(st)
            self.stage_np.append(st.numpy())
            self.stage_busy.append(False)

    # -- loading ---------------------------------------------------------------------------------
    def check_load(self, msg):
        seq, lo, hi, buf = msg['seq'], msg['lo'], msg['hi'], msg['buf']
        if (seq <= self.last_seq or not 0 <= lo <= hi or hi - lo > self.max_rows
                or not 0 <= buf < self.n_buffers):
            self.error(seq, f"bad load request {msg!r}")
        self.last_seq = seq

    def flush(self):
        """Reports, in order, the requests whose copies to the GPU are complete."""
        while self.inflight and self.inflight[0][2].query():
            seq, buf, _, s = self.inflight.popleft()
            self.stage_busy[s] = False
            self.send({'type': 'ready', 'seq': seq, 'buf': buf})

    def stage_free(self):
        return not self.cuda or not all(self.stage_busy)

    def load(self, msg):
        seq, path, lo, hi, buf = msg['seq'], msg['path'], msg['lo'], msg['hi'], msg['buf']
        n = hi - lo
        try:
            if not self.cuda:
                read_rows(path, lo, hi, out=self.host[buf][:n])
                self.send({'type': 'ready', 'seq': seq, 'buf': buf})
                return
            import torch
            s = self.stage_busy.index(False)
            stage_np, stage_t, dst = self.stage_np[s], self.stage_t[s], self.gpu[buf]
            with torch.cuda.stream(self.stream):
                if self.free_events is not None:   # the trainer's work on this buffer is done
                    self.stream.wait_event(self.free_events[buf])
                for a in range(0, n, self.chunk_rows):
                    b = min(n, a + self.chunk_rows)
                    read_rows(path, lo + a, lo + b, out=stage_np[a:b])
                    dst[a:b].copy_(stage_t[a:b], non_blocking=True)
                    self.flush()
                done = torch.cuda.Event()
                done.record(self.stream)
            self.stage_busy[s] = True
            self.inflight.append((seq, buf, done, s))
        except _Fatal:
            raise
        except Exception as e:       # BatchFileError names the file; anything else: say what
            text = str(e) if type(e).__name__ == 'BatchFileError' else (
                f"loader failed on rows [{lo}, {hi}) of {path!r}: {type(e).__name__}: {e}")
            self.error(seq, text)

    def run(self):
        self.send({'type': 'hello', 'pid': os.getpid()})
        deadline = time.monotonic() + self.timeout
        while True:
            msgs = self.poll(POLL_MS)
            if msgs:
                if msgs[0]['type'] != 'setup':
                    self.error(None, f"expected a setup message, got {msgs[0]['type']!r}")
                self.setup(msgs[0])
                pending = msgs[1:]
                break
            if time.monotonic() > deadline:
                raise _Fatal(f"no setup from the trainer within {self.timeout:g} s")
        while True:
            for msg in pending:
                if msg['type'] == 'stop':
                    return
                if msg['type'] == 'load':
                    self.check_load(msg)
                    self.queue.append(msg)
                else:
                    self.error(None, f"unexpected {msg['type']!r} message")
            self.flush()
            if self.queue and self.stage_free():
                self.load(self.queue.popleft())
                pending = self.poll(0)
            elif self.inflight:
                # a copy is on its way: look again soon (ZeroMQ waits in whole milliseconds),
                # so that 'ready' follows the copy's end by ~0.1 ms rather than up to 1 ms
                pending = self.poll(0)
                if not pending:
                    time.sleep(READY_POLL_S)
            else:
                pending = self.poll(POLL_MS)

    def close(self, wait_gpu=True):
        if self.cuda:
            # let copies already queued finish before the IPC mappings go (bounded: a copy may
            # wait on an event of a trainer that died, which never completes)
            end = time.monotonic() + (2.0 if wait_gpu else 0.0)
            while self.inflight and time.monotonic() < end:
                try:
                    if self.inflight[-1][2].query():
                        break
                except Exception:
                    break
                time.sleep(1e-3)
            self.gpu, self.free_events, self.inflight = [], None, collections.deque()
            self.stage_t, self.stage_np = [], []
        self.host = []
        if not self.sock.closed:
            self.sock.close(linger=0)
        self.ctx.term()


def _read_boot(fd, timeout):
    """The one JSON line the trainer writes on our stdin: key, endpoint, parent pid, timeout."""
    import select
    data = b''
    deadline = time.monotonic() + timeout
    while b'\n' not in data:
        left = deadline - time.monotonic()
        if left <= 0 or len(data) > MAX_MESSAGE_BYTES:
            raise SystemExit("proc_load: no start-up line on stdin (this script is started by "
                             "proc_load.ParallelLoader; see --help)")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise SystemExit("proc_load: stdin closed before the start-up line arrived")
            data += chunk
    try:
        boot = json.loads(data.split(b'\n', 1)[0])
        ok = (isinstance(boot, dict) and isinstance(boot.get('key'), str)
              and isinstance(boot.get('endpoint'), str) and type(boot.get('parent_pid')) is int
              and type(boot.get('timeout')) in (int, float) and boot['timeout'] > 0)
        bytes.fromhex(boot['key']) if ok else None
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise SystemExit("proc_load: malformed start-up line on stdin")
    if not boot['endpoint'].startswith(('tcp://127.0.0.1:', 'ipc://')):
        raise SystemExit(f"proc_load: refusing endpoint {boot['endpoint']!r}: loopback or "
                         f"ipc:// only")
    return boot




def main(argv=None):
    p = argparse.ArgumentParser(
        description="Loader process of parallel loading (para_load: True). Started by "
                    "proc_load.ParallelLoader, one per trainer: it reads a start-up line (key, "
                    "ZeroMQ endpoint on 127.0.0.1 or ipc://, trainer pid) from its stdin, "
                    "connects to the trainer, and reads the requested rows of batch files into "
                    "the trainer's buffers (CUDA IPC or shared memory), reporting each one "
                    "ready. It exits on 'stop', when the trainer dies (stdin EOF or a new parent "
                    "pid), and on SIGINT; it ignores SIGTERM (its trainer decides).")
    p.add_argument('--boot-timeout', type=float, default=60.0,
                   help="seconds to wait for the start-up line on stdin (default 60)")
    args = p.parse_args(argv)
    # SIGTERM is ignored: a cluster that preempts a job signals every process, and the trainer
    # must be able to finish its step and write a snapshot; the loader ends with its trainer
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    loader = None
    parent_gone = False
    try:
        boot = _read_boot(sys.stdin.fileno(), args.boot_timeout)
        if os.getppid() != boot['parent_pid']:
            return 0
        loader = Loader(boot)
        try:
            loader.run()
        except _Fatal:
            return 1
        except _ParentGone:
            parent_gone = True
            return 0
        except Exception as e:
            traceback.print_exc()
            try:
                loader.send({'type': 'error', 'seq': None,
                             'message': f"loader process crashed: {type(e).__name__}: {e}"})
                loader.sock.close(linger=2000)
            except Exception:
                pass
            return 1
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if loader is not None:
            try:
                loader.close(wait_gpu=not parent_gone)
            except Exception:
                pass
        if parent_gone:
            # nobody is left to use the buffers: skip interpreter/CUDA teardown, which could
            # wait on GPU work tied to the dead trainer
            sys.stderr.flush()
            os._exit(0)


if __name__ == '__main__':
    sys.exit(main())
