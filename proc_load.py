#!/usr/bin/env python3
"""The loader process of parallel loading (``para_load: True``): it reads the next minibatches
from the batch files into its trainer's memory while the trainer trains, so that the GPU does
not wait. One per trainer, started by ``alexnet_lib.parallel.ParallelLoader`` (the trainer's
side; ``alexnet_lib.data.SerialLoader`` has the same interface) with this file as a script;
it is not meant to be started by hand (``python proc_load.py -h``).

How it works
------------
* Buffers. The trainer owns ``prefetch`` (>= 2) buffers of ``max_rows`` images: anonymous
  shared-memory files (memfd) passed as inherited file descriptors, which no other process can
  open and which cannot leak when a process is killed. ``prefetch`` counts the buffer being
  trained on too: 2 is the original's double buffering. For a GPU the trainer pins them and
  copies each batch it takes to the device itself, on a CUDA stream of its own that overlaps
  the training step (the original's loader copied into the trainer's GPU memory through PyCUDA
  IPC handles; done so here, through CUDA IPC, the trainer waited longer: BENCHMARKS.md).
* Start. The trainer binds a ZeroMQ PAIR socket at an ipc:// path in a private folder
  (``proc_load-<trainer pid>-XXXXXXXX`` in the temporary folder, mode 0700: no other user can
  connect, and a PAIR socket hears one peer only), starts the loader in a session of its own
  and writes one JSON line to its stdin: the endpoint and the buffers. The pipe stays
  open; its end tells the loader that the trainer has gone.
* Loading. Read threads read chunks of the requested rows (``batch_files.read_rows``: preadv at
  the dataset's offset in the file) straight into the shared buffer; once a request's chunks
  are all read the loader says 'ready'. The trainer asks for a buffer only when it is free
  (its copy to the GPU done), so the loader never writes one that is being read.
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
import os
import select
import signal
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import zmq

from alexnet_lib.batch_files import IMAGE_SHAPE, BatchFileError, read_rows
from alexnet_lib.launch import remove_private_dir
from alexnet_lib.loader_messages import (DIR_PREFIX, LOAD, MAX_MESSAGE_BYTES, POLL_MS,
                                         checked_message)
from alexnet_lib.shared_buffers import map_buffer

BUSY_POLL_S = 1e-4          # how often the loader looks at the reads in flight


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
        self.inflight = collections.deque()  # chunks being read, in order
        self.last_seq = 0
        self.boot = boot

    def open_buffers(self, boot):
        self.buffers = []
        for fd in boot['buffers']:
            self.buffers.append(map_buffer(fd, (self.max_rows,) + IMAGE_SHAPE)[1])
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
        while self.queue:
            seq, buf, path, lo, a, b = chunk = self.queue.popleft()
            future = self.pool.submit(read_rows, path, a, b, self.buffers[buf][a - lo:b - lo])
            self.inflight.append((chunk, future))

    def advance(self):
        """Says 'ready' for each request whose chunks are all read, in order."""
        while self.inflight and self.inflight[0][1].done():
            (seq, buf, path, lo, a, b), future = self.inflight.popleft()
            error = future.exception()
            if error is not None:
                text = str(error) if isinstance(error, BatchFileError) else (
                    f"loader failed on rows [{a}, {b}) of {path!r}: "
                    f"{type(error).__name__}: {error}")
                raise _Fatal(seq, text)
            later = self.inflight[0][0] if self.inflight else (
                self.queue[0] if self.queue else None)
            if later is None or later[0] != seq:       # the request's last chunk
                self.send({'type': 'ready', 'seq': seq})

    def run(self):
        try:
            self.open_buffers(self.boot)
        except Exception as e:
            raise _Fatal(None, f"loader cannot open the trainer's buffers: "
                               f"{type(e).__name__}: {e}") from e
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
    fields = {'endpoint': (str,), 'parent_pid': (int,), 'max_rows': (int,),
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
                    "(shared memory), answering 'ready' for each. It exits on "
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
            # nobody is left to use the buffers: exit at once, reads in flight included
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
