"""Scripts of the repository run as real processes, for the tests that fault, interrupt or kill
them (test_faults.py, test_cleanup.py, test_soak.py, test_security.py): /proc look-ups, a
process runner that collects the output line by line and remembers every descendant, and the
checks that nothing of a run is left."""
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN_TIMEOUT = 240      # no run here should take more than a fraction of this
GONE_WITHIN = 15       # seconds for every process of a stopped run to be gone


def proc_stat(pid):
    """(state letter, parent pid, start time) of a process, or None when it is gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        return fields[0], int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid, start=None):
    """Whether process pid runs (not a zombie); with start, only that incarnation of pid."""
    st = proc_stat(pid)
    return st is not None and st[0] not in ('Z', 'X') and (start is None or st[2] == start)


def cmdline(pid):
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return f.read().replace(b'\0', b' ').decode(errors='replace').strip()
    except OSError:
        return ''


def descendants(pid):
    """Live descendants of pid: {pid: start time}."""
    children = {}
    for d in os.listdir('/proc'):
        if d.isdigit():
            st = proc_stat(int(d))
            if st is not None and st[0] not in ('Z', 'X'):
                children.setdefault(st[1], []).append((int(d), st[2]))
    out, todo = {}, [pid]
    while todo:
        for c, start in children.get(todo.pop(), []):
            out[c] = start
            todo.append(c)
    return out


_RUNS = []      # every Proc started: a failed test must not leave its run going


def stop_runs():
    """SIGKILL whatever a (failed) test left of the runs it started; for a fixture's teardown."""
    while _RUNS:
        run = _RUNS.pop()
        if run.p.poll() is None or any(alive(p, s) for p, s in list(run.family.items())):
            run.kill_all()


class Proc:
    """A script of the repository run as a real process. Output (stdout and stderr together in
    `lines`, or apart in `outputs` where a subclass sets SEPARATE_STDERR) is collected line by
    line as it comes ('\\r' ends a line too: progress bars); every process that ever descended
    from it is remembered (a loader whose trainer was killed is re-parented, but stays on the
    list)."""

    SEPARATE_STDERR = False     # stderr to a list of its own (outputs[1]) instead of the stdout's
    STRIP = False               # strip the spaces around each line
    POLL = 0.1                  # seconds between two looks for new descendants
    WAIT_TIMEOUT = RUN_TIMEOUT  # wait()'s default

    def __init__(self, script, args, preexec_fn=None, env=None, new_session=False):
        self.p = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if self.SEPARATE_STDERR else subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED='1', **(env or {})),
            preexec_fn=preexec_fn, start_new_session=new_session)
        self.pid = self.p.pid
        _RUNS.append(self)
        streams = [self.p.stdout] + ([self.p.stderr] if self.SEPARATE_STDERR else [])
        self.outputs = [[] for _ in streams]
        self.lines = self.outputs[0]
        self.family = {}                 # pid -> start time, every descendant seen
        self._cond = threading.Condition()
        self._open = len(streams)        # output streams not at their end yet
        self._readers = [threading.Thread(target=self._read, args=(s, lines), daemon=True)
                         for s, lines in zip(streams, self.outputs)]
        for t in self._readers:
            t.start()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _line(self, raw):
        line = raw.decode(errors='replace')
        return line.strip() if self.STRIP else line

    def _read(self, stream, lines):
        buf = b''
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                break
            buf += chunk
            parts = re.split(rb'[\r\n]', buf)
            buf = parts.pop()
            with self._cond:
                lines += [self._line(x) for x in parts if x.strip()]
                self._cond.notify_all()
        with self._cond:
            if buf.strip():
                lines.append(self._line(buf))
            self._open -= 1
            self._cond.notify_all()

    def _watch(self):
        while self._open:
            self.family.update(descendants(self.pid))
            time.sleep(self.POLL)

    @property
    def text(self):
        with self._cond:
            return '\n'.join(self.lines)

    def wait_for(self, pattern, timeout=RUN_TIMEOUT):
        """The first output line matching the regex, waiting for it; fails if the run ends or
        the time is up first."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        seen = [0] * len(self.outputs)
        with self._cond:
            while True:
                for k, lines in enumerate(self.outputs):
                    for line in lines[seen[k]:]:
                        if rx.search(line):
                            return line
                    seen[k] = len(lines)
                if not self._open or time.monotonic() > end:
                    break
                self._cond.wait(0.1)
        self.kill_all()
        raise AssertionError(f"no line matching {pattern!r} "
                             f"({'the run ended' if not self._open else 'timed out'}); output:\n"
                             + self.text[-4000:])

    def wait(self, timeout=None):
        """Exit status, once the process ended and every holder of its output closed it."""
        timeout = self.WAIT_TIMEOUT if timeout is None else timeout
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"still running after {timeout} s; output:\n"
                                 + self.text[-4000:]) from None
        for t in self._readers:
            t.join(GONE_WITHIN)
        return rc

    def members(self, word):
        """Live processes of the run whose command line contains word."""
        self.family.update(descendants(self.pid))
        return sorted(p for p, s in self.family.items() if alive(p, s) and word in cmdline(p))

    def running(self):
        """{pid: command line} of the run's processes alive now."""
        left = {p: cmdline(p) for p, s in list(self.family.items()) if alive(p, s)}
        if self.p.poll() is None:
            left[self.pid] = cmdline(self.pid)
        return left

    def left_behind(self, within=GONE_WITHIN):
        """Processes of the run still alive after `within` seconds (should be none)."""
        end = time.monotonic() + within
        while True:
            left = self.running()
            if not left or time.monotonic() > end:
                return left
            time.sleep(0.1)

    def folders_left(self):
        """The private folders (proc_load-<pid>-*, rdv-<pid>-*) of the run's processes still in
        the temporary folder: call it once the survivors have exited."""
        pids = {self.pid, *self.family}
        base = tempfile.gettempdir()
        return sorted(n for n in os.listdir(base)
                      if (m := re.fullmatch(r'(?:proc_load|rdv)-(\d+)-.+', n)) and
                      int(m.group(1)) in pids)

    def kill_all(self):
        """Clean-up after a failed test: SIGKILL the run and everything it started."""
        for pid, start in list(self.family.items()):
            if alive(pid, start):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)


def assert_nothing_left(run):
    """No process of the run is alive (within GONE_WITHIN seconds), none of its folders left."""
    left = run.left_behind()
    assert not left, f"processes left behind: {left}"
    assert not run.folders_left(), f"folders left behind in {tempfile.gettempdir()}: " \
                                   f"{run.folders_left()}"


def assert_sigkill_leaves_nothing(run):
    """SIGKILL to the run's own process: it ends by that signal, and the survivors (its
    loaders, a launcher's trainers) go without leaving a process or a folder behind."""
    run.p.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert_nothing_left(run)
