"""The trainer's side of parallel loading (para_load: True): ParallelLoader starts the loader
process (proc_load.py, whose docstring says how the two work together), owns the buffers it
fills and hands out their images, request by request.

    from alexnet_lib.parallel import ParallelLoader
    with ParallelLoader('cuda:0', max_rows=256, prefetch=2) as loader:
        with loader.feed([(path, 0, 256), ...]) as feed:
            images = feed.take()    # uint8 (hi-lo, 256, 256, 3) on the device
            ...                     # queue the GPU work that reads images
            feed.release()          # the buffer may be refilled once that work has run
"""
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import zmq

from alexnet_lib.batch_files import IMAGE_SHAPE
from alexnet_lib.data import BatchLoader
from alexnet_lib.errors import UserError
from alexnet_lib.launch import private_dir, remove_private_dir
from alexnet_lib.loader_messages import (DIR_PREFIX, MAX_MESSAGE_BYTES, POLL_MS, TO_TRAINER,
                                         checked_message)
from alexnet_lib.shared_buffers import SharedBuffers

LOADER_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))),
                             'proc_load.py')
CHUNK_ROWS = 32             # rows per read (6.3 MB)
READ_THREADS = min(8, os.cpu_count() or 1)
STOP_WAIT_S = 5.0           # how long close() waits for the loader before terminating it
DEATH_GRACE_S = 0.5         # after the loader died: how long to wait for its last messages
SOCKET_NAME = 'loader'
STDERR_TAIL = 4000


class LoaderError(UserError):
    """The loader process failed (a missing or corrupt batch file, named in the message) or died."""


def _interrupted(returncode):
    """Whether an exit status is a Ctrl-C's: killed by SIGINT, or 130 (KeyboardInterrupt)."""
    return returncode in (-signal.SIGINT, 128 + signal.SIGINT)


def _exit_text(returncode):
    from alexnet_lib.launch import describe_exit
    if _interrupted(returncode):
        return "was interrupted (SIGINT)"
    if returncode < 0:
        return f"was killed by {describe_exit(returncode)}"
    return f"exited with status {returncode}"


# ---------------------------------------------------------------------------------------------
# trainer side

class ParallelLoader(BatchLoader):
    """Delivers batch-file rows into the trainer's memory from a loader process.

    device: 'cpu' or a GPU ('cuda:0', 'gpu0', 0). max_rows: the most rows one request asks for.
    prefetch (>= 2): buffers, i.e. requests held by the loader at once, the one being trained
    on included. timeout: the longest wait for any answer of the loader, in seconds.
    chunk_rows, read_threads: rows per read and copy, and read threads, of the loader."""

    def __init__(self, device, max_rows, prefetch=2, timeout=60.0, chunk_rows=CHUNK_ROWS,
                 read_threads=READ_THREADS):
        from alexnet_lib.config import resolve_device
        self.device = resolve_device(device)
        if type(max_rows) is not int or max_rows < 1:
            raise ValueError(f"ParallelLoader: max_rows must be a positive int, not {max_rows!r}")
        if type(prefetch) is not int or prefetch < 2:
            raise ValueError(f"ParallelLoader: prefetch (config key 'prefetch') must be an int "
                             f">= 2 (double buffering at least), not {prefetch!r}")
        self.max_rows, self.prefetch, self.timeout = max_rows, prefetch, float(timeout)
        self.cuda = self.device.type == 'cuda'
        self.pid = self._proc = self._sock = self._ctx = self._stderr = None
        self._buffers, self._free = None, collections.deque(range(prefetch))
        self._inbox = collections.deque()     # messages received, not yet handled
        self._seq = 0
        self._feed = None
        self._abandoned = collections.deque()   # loads of a feed left by an exception
        self._broken = None                   # the LoaderError that ended this loader
        self._closed = False
        # mode 0700; stale ones of dead trainers go first
        self._dir = private_dir(DIR_PREFIX, room=len(SOCKET_NAME) + 1)
        self.endpoint = f'ipc://{self._dir}/{SOCKET_NAME}'
        try:
            self._ctx = zmq.Context()
            self._sock = self._ctx.socket(zmq.PAIR)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            self._sock.bind(self.endpoint)
            try:
                self._buffers = SharedBuffers(self.device, (max_rows,) + IMAGE_SHAPE, prefetch)
            except OSError as e:    # too many files or mappings for this process
                raise LoaderError(f"cannot make the loader's {prefetch} buffers ({e.strerror}): "
                                  f"lower prefetch (2 or 3 keep the GPU fed)") from None
            boot = {'endpoint': self.endpoint, 'parent_pid': os.getpid(),
                    'max_rows': max_rows,
                    'chunk_rows': int(chunk_rows), 'read_threads': int(read_threads),
                    **self._buffers.boot()}
            self._stderr = tempfile.TemporaryFile()
            try:
                # a session of its own: a terminal's Ctrl-C (SIGINT to the foreground process
                # group) reaches the trainer only, which stops the loader as it unwinds
                self._proc = subprocess.Popen([sys.executable, LOADER_SCRIPT],
                                              stdin=subprocess.PIPE, stderr=self._stderr,
                                              pass_fds=self._buffers.fds, close_fds=True,
                                              start_new_session=True)
            finally:
                self._buffers.close_fds()   # the loader has its own copies now
            self.pid = self._proc.pid
            try:
                self._proc.stdin.write((json.dumps(boot) + '\n').encode())
                self._proc.stdin.flush()    # the pipe stays open: its end tells the loader
            except OSError:
                pass                        # it died at once: the wait says why
            self._wait('setup_ok', None, 'starting up')
        except BaseException:
            self.close()
            raise

    # -- messages --------------------------------------------------------------------------------
    def _send(self, msg):
        try:
            self._sock.send(json.dumps(msg).encode(), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            # the loader went away, usually after it reported an error (naming the file): the
            # wait for this request's answer reports that, after what came before it
            end = time.monotonic() + 2.0
            while self._proc.poll() is None and time.monotonic() < end:
                time.sleep(0.01)
            if self._proc.poll() is None:
                raise self._fail(f"cannot send to the loader process (pid {self.pid}): "
                                 f"{e}") from None

    def _receive(self, wait_ms):
        """Received messages go to the inbox; a malformed one is a broken loader."""
        if not self._sock.poll(wait_ms, zmq.POLLIN):
            return False
        while True:
            try:
                raw = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return True
            try:
                msg = json.loads(raw)
            except ValueError:
                msg = None
            kind = msg.get('type') if isinstance(msg, dict) else None
            if kind not in TO_TRAINER or checked_message(msg, TO_TRAINER[kind]) is None:
                raise self._fail(f"loader process (pid {self.pid}) sent a malformed message: "
                                 f"{raw[:200]!r}")
            self._inbox.append(msg)

    def _wait(self, kind, seq, what):
        """Waits for the message `kind` (with `seq`), in order; LoaderError if the loader
        reports an error, dies, or is silent for `timeout` seconds."""
        deadline = time.monotonic() + self.timeout
        while True:
            if self._broken is not None:
                raise self._broken
            while self._inbox:
                msg = self._inbox.popleft()
                if msg['type'] == 'error':
                    raise self._fail(msg['message'])
                if msg['type'] != kind or msg.get('seq') != seq:
                    raise self._fail(f"loader process (pid {self.pid}) answered {msg!r} while "
                                     f"{what}")
                return msg
            if self._receive(0):
                continue
            if self._proc.poll() is not None:
                self._died(what)
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"loader process (pid {self.pid}) sent nothing for "
                                 f"{self.timeout:g} s while {what}")
            self._receive(max(1, min(POLL_MS, int(left * 1000) + 1)))

    def _died(self, what):
        """The loader has exited: its own last error if one comes, else how it ended. A loader
        ended by SIGINT (sent to every process of the run, the trainer included) leaves the
        trainer a moment for its own KeyboardInterrupt, which then ends the run as one."""
        end = time.monotonic() + DEATH_GRACE_S
        while time.monotonic() < end and not any(m['type'] == 'error' for m in self._inbox):
            self._receive(20)
        for msg in self._inbox:
            if msg['type'] == 'error':
                raise self._fail(msg['message'])
        if _interrupted(self._proc.returncode):
            time.sleep(DEATH_GRACE_S)      # a SIGINT of ours raises KeyboardInterrupt here
        text = f"loader process (pid {self.pid}) {_exit_text(self._proc.returncode)} while {what}"
        tail = self._stderr_tail()
        raise self._fail(text + (f"; its stderr ends with:\n{tail}" if tail else ''))

    def _fail(self, text):
        """Marks this loader broken, stops the loader process, returns the LoaderError."""
        if self._broken is None:
            self._broken = LoaderError(text)
        self._shutdown(forward_stderr=False)
        return self._broken

    def _stderr_tail(self):
        return _file_tail(self._stderr)

    # -- delivery ----------------------------------------------------------------------------------
    def feed(self, requests):
        """A Feed over (batch_file, lo, hi) requests; one at a time per loader."""
        if self._broken is not None:
            raise self._broken
        if self._closed:
            raise LoaderError("ParallelLoader is closed")
        if self._feed is not None:
            raise RuntimeError("ParallelLoader.feed: the previous feed is still open")
        self.collect_abandoned()
        self._feed = Feed(self, requests)
        return self._feed

    def send_load(self, path, lo, hi):
        """Asks the loader for rows [lo, hi) of a batch file in a free buffer: (seq, buffer),
        or None when every buffer is taken."""
        if not self._free:
            return None
        buf = self._free.popleft()
        self._seq += 1
        self._send({'type': 'load', 'seq': self._seq, 'path': path, 'lo': lo, 'hi': hi,
                    'buf': buf})
        return self._seq, buf

    def wait_loaded(self, seq, buf, rows, what):
        """The first `rows` images of buffer `buf` once load `seq` is in it (on the GPU: the
        current stream waits for it)."""
        self._wait('ready', seq, what)
        return self._buffers.take(buf, rows)

    def free_buffer(self, buf, after_gpu_work=True):
        """Buffer `buf` may be loaded again (on the GPU: once the work queued on it so far is
        done)."""
        if after_gpu_work:
            self._buffers.give_back(buf)
        self._free.append(buf)

    def abandon(self, seq, buf, request):
        """Load `seq` into buffer `buf` is no longer wanted: its buffer comes back when its
        answer has come (collect_abandoned), not before: the loader may be writing it."""
        self._abandoned.append((seq, buf, request))

    def collect_abandoned(self):
        """Waits for the answers to the abandoned loads (each within the timeout, the loader's
        life checked) and frees their buffers."""
        while self._abandoned and self._broken is None:
            seq, buf, (path, lo, hi) = self._abandoned[0]
            self._wait('ready', seq, f"finishing the load of rows [{lo}, {hi}) of {path!r}")
            self._abandoned.popleft()
            self.free_buffer(buf, after_gpu_work=False)

    @property
    def usable(self):
        return self._broken is None and not self._closed

    def feed_closed(self, feed):
        """Whether `feed` was closed already; else it is now, and another may be opened."""
        if self._feed is not feed:
            return True
        self._feed = None
        return False

    # -- shutdown ----------------------------------------------------------------------------------
    def _shutdown(self, forward_stderr=True):
        """Stops the loader process (bounded waits, then SIGTERM, then SIGKILL) and the socket."""
        proc = self._proc
        if proc is not None:
            _stop(proc, self._sock)
            tail = self._stderr_tail() if forward_stderr else ''
            if tail:
                print(f"proc_load: loader process (pid {self.pid}) stderr:\n{tail}",
                      file=sys.stderr, flush=True)
        for closing in (self._sock, self._stderr):
            if closing is not None:
                closing.close()
        if self._ctx is not None:
            self._ctx.term()
        self._sock = self._ctx = self._stderr = None
        remove_private_dir(self._dir, DIR_PREFIX)   # (the loader may have removed it already)

    def close(self):
        """Stops the loader (bounded wait), frees the buffers. Safe to call more than once.
        Loads in flight are not waited for: the loader is stopped whatever it is doing."""
        if self._closed:
            return
        if self._feed is not None:
            self._feed.close(wait=False)
        self._closed = True
        self._shutdown()
        if self._buffers is not None:
            self._buffers.close()

class Feed:
    """The requests of one pass (an epoch's steps, a validation), loaded ahead into the
    loader's buffers. take() waits for the next request's images; release() hands the buffer
    back once the GPU work queued on it so far has run; close() waits for the loads still in
    flight (each within the timeout), except when the feed is left by an exception (a
    Ctrl-C, an error): then it neither waits for nor reports the loader, and the loader's next
    feed collects those loads (its close() stops the loader without them)."""

    def __init__(self, loader, requests):
        self.loader = loader
        self.requests = [self._checked(r) for r in requests]
        self._next = 0                          # the next request to send to the loader
        self._sent = collections.deque()        # (seq, buf, request), in order
        self._held = None                       # the buffer being trained on
        self._fill()

    def _checked(self, req):
        try:
            path, lo, hi = req
            path, lo, hi = os.fsdecode(os.fspath(path)), int(lo), int(hi)
        except (TypeError, ValueError):
            raise ValueError(f"ParallelLoader: a request must be (batch_file, lo, hi), not "
                             f"{req!r}") from None
        if not 0 <= lo <= hi or hi - lo > self.loader.max_rows:
            raise ValueError(f"ParallelLoader: rows [{lo}, {hi}) of {path!r}: need 0 <= lo <= "
                             f"hi and at most max_rows={self.loader.max_rows} rows")
        return path, lo, hi

    def _fill(self):
        while self._next < len(self.requests):
            request = self.requests[self._next]
            sent = self.loader.send_load(*request)
            if sent is None:                    # every buffer is taken
                return
            self._next += 1
            self._sent.append(sent + (request,))

    def take(self):
        """The next request's uint8 (hi-lo, 256, 256, 3) images on the device."""
        if self._held is not None:
            raise RuntimeError("Feed.take: release() the previous batch first")
        if not self._sent:
            raise IndexError("Feed.take: every request was taken")
        seq, buf, (path, lo, hi) = self._sent[0]
        images = self.loader.wait_loaded(seq, buf, hi - lo,
                                         f"loading rows [{lo}, {hi}) of {path!r}")
        self._sent.popleft()
        self._held = buf
        return images

    def release(self):
        """The taken batch's buffer may be refilled once the GPU work queued so far is done."""
        if self._held is not None:
            self.loader.free_buffer(self._held)
            self._held = None
            self._fill()

    def close(self, wait=True):
        """No more requests are sent; with `wait`, waits for those in flight."""
        if self.loader.feed_closed(self):
            return
        self._next = len(self.requests)
        if self._held is not None:
            held, self._held = self._held, None
            try:
                self.loader.free_buffer(held)
            except Exception:
                if wait:
                    raise
                # (the GPU failed under the exception on its way out: the buffer stays taken)
        while self._sent:       # their buffers come back when their answers have come
            self.loader.abandon(*self._sent.popleft())
        if wait and self.loader.usable:
            self.loader.collect_abandoned()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # an exception on its way out (KeyboardInterrupt, a LoaderError, ...) is not held up
        # by, nor replaced with, what the loader does meanwhile
        self.close(wait=exc_type is None)


def _stop(proc, sock):
    """Stops the loader process: 'stop' and the end of its stdin, then bounded waits, SIGTERM,
    SIGKILL."""
    if proc.poll() is None and sock is not None:
        try:
            sock.send(b'{"type": "stop"}', zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
    try:
        proc.stdin.close()        # EOF: a second reason for the loader to go
    except OSError:
        pass
    for stop in (None, proc.terminate, proc.kill):
        if stop is not None and proc.poll() is None:
            stop()
        try:
            proc.wait(STOP_WAIT_S if stop is None else 2.0)
            return
        except subprocess.TimeoutExpired:
            continue


def _file_tail(f):
    """The last STDERR_TAIL bytes of a file, as text ('' when it cannot be read)."""
    try:
        size = os.fstat(f.fileno()).st_size
        data = os.pread(f.fileno(), STDERR_TAIL, max(0, size - STDERR_TAIL))
        return data.decode('utf-8', 'replace').strip()
    except (AttributeError, OSError, ValueError):
        return ''

