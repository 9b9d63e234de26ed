"""Worker processes for work that must stop at once on Ctrl-C or SIGTERM, and fail at once
when a worker dies (killed by the kernel's out-of-memory killer, say):

    with TaskProcesses(n, run) as workers:     # run(task), a module-level function, returns
                                               # NumPy arrays and plain values
        workers.submit(task)                   # while workers.idle()
        result = workers.result()              # the next one to finish; ProcessDied if one died

Leaving the block normally ends the workers; leaving it by an exception (Ctrl-C included)
kills them at once.
"""
import contextlib
import multiprocessing
import os
import pickle
import signal
import struct
import time
import traceback
from multiprocessing.connection import wait

from alexnet_lib.mnist import loads_arrays


class ProcessDied(Exception):
    """A worker died before its task's result: pid, how (exit code or signal), the task."""

    def __init__(self, pid, how, task):
        super().__init__(f"worker process {pid} died ({how})")
        self.pid, self.how, self.task = pid, how, task


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
HEADER = struct.Struct('<Q')  # the length of a pickled result, before it


def task_loop(run, tasks, results, parent):
    """A worker process: ``run(task)`` for each task from the connection ``tasks``, its result
    written, pickled after its length, to the pipe ``results``, until the main process sends
    None or is gone."""
    # Ctrl-C and SIGTERM (also when sent to the whole process group: a terminal, a batch
    # system) are the main process's to handle: it kills its workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    while True:
        try:
            while not tasks.poll(1.0):
                if os.getppid() != parent:
                    return  # the main process was killed: no one waits for a result
            task = tasks.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            result = True, run(task)
        except Exception:
            result = False, traceback.format_exc()
        data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        out = memoryview(HEADER.pack(len(data)) + data)
        try:
            while out:
                out = out[os.write(results.fileno(), out):]
        except OSError:
            return  # the main process is gone


class TaskProcesses:
    """``n`` worker processes that run ``run(task)`` (task_loop), each with pipes of its own:
    one task at a time goes out, its result comes back. They share no lock, so stopping them
    (Ctrl-C, SIGTERM, a failed write) is a SIGKILL and a bounded wait for each:
    multiprocessing.Pool's terminate() can wait forever on the lock of its result queue when
    it kills a worker that is sending a result larger than a pipe holds. The main process waits
    in one place only, wait() in result(), which a worker that dies or a signal ends (the
    results are read without blocking): a dead worker is ProcessDied, not a wait for a result
    that never comes."""

    def __init__(self, n, run):
        ctx = multiprocessing.get_context()
        self.procs, self.to_procs, self.from_procs, self.inbox, self.tasks = [], [], [], [], []
        self.wakeup = None
        try:
            # blocked while processes start: none is left out of self.procs, and the children
            # start with them blocked until they ignore them (one in between would be a
            # KeyboardInterrupt there, a traceback)
            with signals_held():
                for _ in range(n):
                    task_r, task_w = ctx.Pipe(duplex=False)
                    result_r, result_w = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=task_loop,
                                       args=(run, task_r, result_w, os.getpid()), daemon=True)
                    try:
                        proc.start()
                    finally:
                        task_r.close()  # the child's ends
                        result_w.close()
                    os.set_blocking(result_r.fileno(), False)
                    self.procs.append(proc)
                    self.to_procs.append(task_w)
                    self.from_procs.append(result_r)
                    self.inbox.append(bytearray())
                    self.tasks.append(None)
            # Ctrl-C or SIGTERM ends that wait (Python then raises KeyboardInterrupt there)
            # also when another thread receives it: tqdm's monitor, OpenBLAS's threads
            self.wakeup, wakeup_w = os.pipe()
            for fd in (self.wakeup, wakeup_w):
                os.set_blocking(fd, False)
            self.old_wakeup = signal.set_wakeup_fd(wakeup_w)
        except BaseException:
            self.stop()
            raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.stop()

    def idle(self):
        return self.tasks.count(None)

    def busy(self):
        return len(self.tasks) - self.idle()

    def submit(self, task):
        i = self.tasks.index(None)
        self.tasks[i] = task
        try:
            self.to_procs[i].send(task)  # the process waits for it; a dead one's pipe is broken
        except OSError:
            self._died(i)

    def result(self):
        """The next result of a busy process (run's); ProcessDied when one has died,
        a RuntimeError with the worker's traceback when run raised (a bug)."""
        busy = [i for i, t in enumerate(self.tasks) if t is not None]
        assert busy, 'no task is running'
        while True:
            # a process's sentinel is ready when it has died
            ready = wait([self.from_procs[i] for i in busy]
                         + [self.procs[i].sentinel for i in busy] + [self.wakeup])
            if self.wakeup in ready:
                os.read(self.wakeup, 512)
            for i in busy:
                died = self.procs[i].sentinel in ready
                if died or self.from_procs[i] in ready:
                    result, closed = self._read(i)
                    if result is not None:
                        ok, value = result
                        if not ok:  # a bug in run: keep its traceback
                            raise RuntimeError(f"a task failed in a worker process:\n{value}")
                        return value
                    if closed or died:  # all it wrote is read: no result will come
                        self._died(i)

    def _read(self, i):
        """(process i's (ok, run's result or traceback), or None while it is incomplete;
        whether its pipe is closed), from what has arrived, without waiting for more."""
        inbox, closed = self.inbox[i], False
        while True:
            try:
                data = os.read(self.from_procs[i].fileno(), 1 << 20)
            except BlockingIOError:
                break
            if not data:
                closed = True
                break
            inbox += data
        if len(inbox) >= HEADER.size:
            end = HEADER.size + HEADER.unpack_from(inbox)[0]
            if len(inbox) >= end:
                # NumPy arrays and plain values only: no global a pickle names runs here
                result = loads_arrays(bytes(inbox[HEADER.size:end]))
                del inbox[:end]
                self.tasks[i] = None
                return result, closed
        return None, closed

    def _died(self, i):
        proc, task = self.procs[i], self.tasks[i]
        proc.join(5)
        code = proc.exitcode
        if code is None or code >= 0:
            how = 'its pipe closed' if code is None else f'exit code {code}'
        else:
            try:
                how = f'signal {signal.Signals(-code).name}'
            except ValueError:
                how = f'signal {-code}'
        raise ProcessDied(proc.pid, how, task)

    def close(self, seconds=10.0):
        """The end of the work: each process is told to return."""
        for conn in self.to_procs:
            try:
                conn.send(None)
            except OSError:
                pass  # it has died
        deadline = time.monotonic() + seconds
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self.stop()

    def stop(self, seconds=10.0):
        """Kill the processes (SIGKILL: a half-written batch is a temporary file the caller
        removes; nothing else needs tidying) and wait, at most ``seconds``, for them to end."""
        with signals_held():  # a second Ctrl-C does not leave one alive
            for proc in self.procs:
                proc.kill()
        deadline = time.monotonic() + seconds
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for conn in self.to_procs + self.from_procs:
            conn.close()
        self.tasks = [None] * len(self.tasks)
        if self.wakeup is not None:
            os.close(signal.set_wakeup_fd(self.old_wakeup))
            os.close(self.wakeup)
            self.wakeup = None


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait until the block is done (and are raised then, as usual)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
