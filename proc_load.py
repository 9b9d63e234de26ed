#!/usr/bin/env python3
"""The loader process of parallel loading (``para_load: True``): it reads the next minibatches
from the batch files into its trainer's memory while the trainer trains, so that the GPU does
not wait. One per trainer, started by ``alexnet_lib.parallel.ParallelLoader`` (the trainer's
side; ``alexnet_lib.data.SerialLoader`` has the same interface) with this file as a script;
it is not meant to be started by hand (``python proc_load.py -h``).

How it works
------------
* Buffers. The trainer owns ``prefetch`` (>= 2) buffers of ``max_rows`` images: CUDA tensors
  handed to the loader as CUDA IPC handles (the original handed over PyCUDA IPC handles), or on
  the CPU anonymous shared-memory files (memfd) passed as inherited file descriptors, which no
  other process can open and which cannot leak when a process is killed. ``prefetch`` counts
  the buffer being trained on too: 2 is the original's double buffering.
* Start. The trainer binds a ZeroMQ PAIR socket at an ipc:// path in a private folder
  (``proc_load-<trainer pid>-XXXXXXXX`` in the temporary folder, mode 0700: no other user can
  connect, and a PAIR socket hears one peer only), starts the loader in a session of its own
  and writes one JSON line to its stdin: the endpoint, the buffers, the events. The pipe stays
  open; its end tells the loader that the trainer has gone.
* Loading. Read threads read chunks of the requested rows (``batch_files.read_rows``: preadv at
  the dataset's offset in the file) into pinned staging memory; the loader's main thread copies
  each chunk, in order, into the trainer's buffer on its own CUDA stream, behind the trainer's
  "free" event of that buffer. Once a request's copies are queued it records the buffer's
  "ready" event and says 'ready'; the trainer's stream waits for that event before it uses the
  buffer. Both events are interprocess CUDA events, so neither process waits on the host for
  the other's GPU work, and reads, copies and training overlap. On the CPU the threads read
  straight into the shared buffers.
* Messages. JSON objects, never pickles, every field checked: to the loader 'load' (seq, path,
  lo, hi, buf) and 'stop'; to the trainer 'setup_ok', 'ready' (seq) and 'error' (seq or null,
  message). The loader answers requests in order.
* Failures. Every wait of the trainer polls in slices of POLL_MS with an overall ``timeout`` and
  checks that the loader lives: a loader error (naming the file) or its death (signal, exit
  status, the end of its stderr) raises LoaderError within a second, and the loader is reaped.
  The loader exits on 'stop', when its stdin ends or its parent changes (trainer dead), and on
  a SIGINT sent to it; it ignores SIGTERM, so that a preempted trainer can finish its step and
  write a snapshot.
* Ctrl-C. A terminal's Ctrl-C (SIGINT to its foreground process group) reaches the trainer, not
  the loader (its own session): the trainer's KeyboardInterrupt leaves the feed without waiting
  for the loads in flight and stops the loader on its way out, so a run ends the same way
  (``interrupted``, status 130) with or without parallel loading. A loader that dies of a
  SIGINT all the same is reported only if the trainer was not interrupted too.
* Clean-up. The loader removes the socket's folder when it exits, for whatever reason (its
  trainer may be dead); the trainer removes it when it stops the loader or finds it dead (a
  SIGKILL); a new trainer first removes this user's folders whose trainer has died
  (``alexnet_lib.launch.private_dir``: both were killed). Nothing is left once the survivors
  of a run, however it ended, have exited.
"""
import argparse
import collections
import json
import mmap
import os
import select
import signal
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zmq

from alexnet_lib.batch_files import IMAGE_SHAPE, BatchFileError, read_rows
from alexnet_lib.launch import remove_private_dir
from alexnet_lib.parallel import (DIR_PREFIX, LOAD, MAX_MESSAGE_BYTES, POLL_MS,
                                  checked_message)

STAGING_REQUESTS = 2        # pinned staging memory: this many full requests
BUSY_POLL_S = 1e-4          # how often the loader looks at reads and copies in flight


class _ParentGone(Exception):
    pass


class LoaderProcess:
    """The loader process: fills the buffers it is told to fill, in order."""

    def __init__(self, boot):
        self.parent_pid = boot['parent_pid']
        self.max_rows, self.chunk_rows = boot['max_rows'], boot['chunk_rows']
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.sock.connect(boot['endpoint'])
        self.pool = ThreadPoolExecutor(boot['read_threads'], thread_name_prefix='read')
        self.queue = collections.deque()     # chunks not yet read: (seq, buf, path, lo, a, b)
        self.inflight = collections.deque()  # chunks being read or copied, in order
        self.last_seq = 0
        self.cuda = boot['device'] != 'cpu'
        self.boot = boot

    def open_buffers(self, boot):
        shape = (self.max_rows,) + IMAGE_SHAPE
        if self.cuda:
            import torch
            self.torch = torch
            dev = torch.device(boot['device'])
            torch.cuda.set_device(dev)
            self.buffers = []
            for handle in boot['buffers']:
                args = [bytes.fromhex(v) if isinstance(v, str) else v for v in handle]
                t = torch.empty((0,), dtype=torch.uint8, device=dev)
                t.set_(torch.UntypedStorage._new_shared_cuda(*args), 0, shape)
                self.buffers.append(t)
            self.free_events, self.ready_events = (
                [torch.cuda.Event.from_ipc_handle(dev, bytes.fromhex(h)) for h in boot[k]]
                for k in ('free_events', 'ready_events'))
            self.stream = torch.cuda.Stream(dev)
            slots = STAGING_REQUESTS * -(-self.max_rows // self.chunk_rows)
            rows = min(self.chunk_rows, self.max_rows)
            self.staging = [torch.empty((rows,) + IMAGE_SHAPE, dtype=torch.uint8,
                                        pin_memory=True) for _ in range(slots)]
            self.copied = [torch.cuda.Event() for _ in range(slots)]
            self.free_slots = collections.deque(range(slots))
        else:
            nbytes = int(np.prod(shape))
            self.buffers = []
            for fd in boot['buffers']:
                self.buffers.append(np.frombuffer(mmap.mmap(fd, nbytes), np.uint8,
                                                  nbytes).reshape(shape))
                os.close(fd)

    def send(self, msg):
        self.sock.send(json.dumps(msg).encode())

    def poll(self, timeout_ms):
        """The messages that came within `timeout_ms`; _ParentGone if the trainer died."""
        r, _, _ = select.select([sys.stdin.fileno()], [], [], 0)
        if (r and os.read(sys.stdin.fileno(), 4096) == b'') or os.getppid() != self.parent_pid:
            raise _ParentGone()
        msgs = []
        if self.sock.poll(timeout_ms, zmq.POLLIN):
            while True:
                try:
                    raw = self.sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    msgs.append(json.loads(raw))
                except ValueError:
                    raise _Fatal(None, f"bad message from the trainer: {raw[:200]!r}") from None
        return msgs

    def accept(self, msg):
        """A 'load' request, checked, split into chunks; False for 'stop'."""
        kind = msg.get('type') if isinstance(msg, dict) else None
        if kind == 'stop':
            return False
        m = checked_message(msg, LOAD) if kind == 'load' else None
        if (m is None or m['seq'] <= self.last_seq or not 0 <= m['lo'] <= m['hi']
                or m['hi'] - m['lo'] > self.max_rows or not 0 <= m['buf'] < len(self.buffers)):
            raise _Fatal(None, f"bad request from the trainer: {msg!r}")
        self.last_seq = m['seq']
        starts = range(m['lo'], m['hi'], self.chunk_rows) or [m['lo']]   # empty: one chunk
        for a in starts:
            self.queue.append((m['seq'], m['buf'], m['path'], m['lo'], a,
                               min(a + self.chunk_rows, m['hi'])))
        return True

    def start_reads(self):
        while self.queue and (not self.cuda or self.free_slots):
            seq, buf, path, lo, a, b = chunk = self.queue.popleft()
            if self.cuda:
                slot = self.free_slots.popleft()
                out = self.staging[slot][:b - a].numpy()
            else:
                slot, out = None, self.buffers[buf][a - lo:b - lo]
            future = self.pool.submit(read_rows, path, a, b, out)
            self.inflight.append([chunk, slot, future, False])

    def advance(self):
        """Copies the chunks that were read, in order; says 'ready' for each request whose
        chunks are all copied (queued, on the GPU); frees the staging of finished copies."""
        for item in self.inflight:
            (seq, buf, path, lo, a, b), slot, future, copied = item
            if copied:
                continue
            if not future.done():
                break
            error = future.exception()
            if error is not None:
                text = str(error) if isinstance(error, BatchFileError) else (
                    f"loader failed on rows [{a}, {b}) of {path!r}: "
                    f"{type(error).__name__}: {error}")
                raise _Fatal(seq, text)
            if self.cuda:
                with self.torch.cuda.stream(self.stream):
                    if a == lo:        # the trainer's work on this buffer comes first
                        self.stream.wait_event(self.free_events[buf])
                    self.buffers[buf][a - lo:b - lo].copy_(self.staging[slot][:b - a],
                                                          non_blocking=True)
                    self.copied[slot].record(self.stream)
            item[3] = True
            last = not any(c[0] == seq for c in self.queue) and \
                all(c[0][0] != seq or c[3] for c in self.inflight)
            if last:
                if self.cuda:
                    self.ready_events[buf].record(self.stream)
                self.send({'type': 'ready', 'seq': seq})
        while self.inflight and self.inflight[0][3] and (
                not self.cuda or self.copied[self.inflight[0][1]].query()):
            _, slot, _, _ = self.inflight.popleft()
            if self.cuda:
                self.free_slots.append(slot)

    def run(self):
        try:
            self.open_buffers(self.boot)
        except Exception as e:
            raise _Fatal(None, f"loader cannot open the trainer's {self.boot['device']} "
                               f"buffers: {type(e).__name__}: {e}") from e
        self.send({'type': 'setup_ok'})
        while True:
            busy = bool(self.inflight)
            for msg in self.poll(0 if busy else POLL_MS):
                if not self.accept(msg):
                    return
            self.start_reads()
            self.advance()
            if self.inflight:
                time.sleep(BUSY_POLL_S)

    def close(self):
        if self.cuda and self.inflight:
            # copies already queued finish before the IPC mappings go (bounded: a copy may wait
            # on an event of a trainer that died, which never completes)
            end = time.monotonic() + 2.0
            while time.monotonic() < end and not self.copied[self.inflight[-1][1]].query():
                time.sleep(1e-3)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.sock.close(linger=2000)     # an error message reaches the trainer before we go
        self.ctx.term()


class _Fatal(Exception):
    """An error to report to the trainer (seq None: not about one request), then stop."""

    def __init__(self, seq, text):
        super().__init__(text)
        self.seq = seq


def _read_boot(timeout):
    """The one JSON line the trainer writes on our stdin."""
    fd, data = sys.stdin.fileno(), b''
    deadline = time.monotonic() + timeout
    while b'\n' not in data:
        left = deadline - time.monotonic()
        if left <= 0 or len(data) > (1 << 20):
            raise SystemExit("proc_load: no start-up line on stdin (this script is started by "
                             "alexnet_lib.parallel.ParallelLoader; see --help)")
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise SystemExit("proc_load: stdin closed before the start-up line arrived")
            data += chunk
    try:
        boot = json.loads(data.split(b'\n', 1)[0])
    except ValueError:
        boot = None
    fields = {'endpoint': (str,), 'parent_pid': (int,), 'device': (str,), 'max_rows': (int,),
              'chunk_rows': (int,), 'read_threads': (int,), 'buffers': (list,)}
    if (checked_message(boot, fields) is None or not boot['endpoint'].startswith('ipc://')
            or min(boot['max_rows'], boot['chunk_rows'], boot['read_threads']) < 1):
        raise SystemExit("proc_load: malformed start-up line on stdin")
    return boot


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Loader process of parallel loading (para_load: True). Started by "
                    "alexnet_lib.parallel.ParallelLoader, one per trainer: it reads a start-up "
                    "line (the trainer's private ipc:// endpoint and buffers) from its stdin "
                    "and reads the requested rows of batch files into the trainer's buffers "
                    "(CUDA IPC or shared memory), answering 'ready' for each. It exits on "
                    "'stop', when the trainer dies (stdin ends or the parent changes), and on "
                    "SIGINT; it ignores SIGTERM (its trainer decides). On its way out it "
                    "removes the trainer's socket folder.")
    p.add_argument('--boot-timeout', type=float, default=60.0,
                   help="seconds to wait for the start-up line on stdin (default 60)")
    args = p.parse_args(argv)
    # a cluster that preempts a job signals every process; the trainer finishes its step and
    # writes a snapshot, and the loader ends with its trainer
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    loader = folder = None
    try:
        boot = _read_boot(args.boot_timeout)
        folder = os.path.dirname(boot['endpoint'][len('ipc://'):])
        if os.getppid() != boot['parent_pid']:
            return 0
        try:
            loader = LoaderProcess(boot)
            loader.run()
        except _Fatal as e:
            loader.send({'type': 'error', 'seq': e.seq, 'message': str(e)})
            return 1
        except _ParentGone:
            # nobody is left to use the buffers: skip the interpreter's and CUDA's teardown,
            # which could wait on GPU work of the dead trainer
            remove_private_dir(folder, DIR_PREFIX)
            sys.stderr.flush()
            os._exit(0)
        except Exception as e:
            traceback.print_exc()
            if loader is not None:
                loader.send({'type': 'error', 'seq': None,
                             'message': f"loader process crashed: {type(e).__name__}: {e}"})
            return 1
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        try:
            if loader is not None:
                loader.close()
        finally:
            # the trainer may be gone (it removes the folder too when it is not)
            remove_private_dir(folder, DIR_PREFIX)


if __name__ == '__main__':
    sys.exit(main())
