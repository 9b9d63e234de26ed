"""Starting and supervising one worker process per replica.

    spawn(worker_fn, world, args=(), timeout=None)

starts ``world`` processes (multiprocessing 'spawn' context), each calling
``worker_fn(rank, world, *args)``, and watches them: when one of them fails (non-zero exit or
killed by a signal) the others are stopped (SIGTERM, then SIGKILL after a grace period) and
``WorkerFailed`` is raised naming the rank and how it died. SIGINT/SIGTERM sent to the launcher
are passed on to the workers; a worker takes only its first SIGINT (a terminal's Ctrl-C reaches
it directly too), so that a second one does not cut its clean-up short. Each worker calls
``parent_watchdog()`` first, so it exits when the launcher disappears, even after a SIGKILL
(PR_SET_PDEATHSIG on Linux, plus a polling thread).

spawn() also gives the workers a fresh private rendezvous directory through the environment
(``RENDEZVOUS_ENV``): ``init_distributed`` then meets in a file store in that directory (no
listening socket at all). Under torchrun (RANK/WORLD_SIZE/MASTER_ADDR set) ``init_distributed`` uses
torchrun's ``env://`` rendezvous instead.

Private folders (the rendezvous directory here, a loader's socket folder in parallel.py) come
from ``private_dir(prefix)``: ``<prefix>-<pid of their maker>-XXXXXXXX`` in the temporary
folder, mode 0700. The maker removes it when it ends, and so does whoever finds the maker gone
(the launcher's: its workers; a trainer's: its loader); each new one first removes this user's
folders of that prefix whose maker has died (killed with every process that would have).
"""
import ctypes
import datetime
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import traceback
import multiprocessing as mp
from multiprocessing.connection import wait as _wait_any

from alexnet_lib.errors import UserError

RENDEZVOUS_ENV = 'ALEXNET_RENDEZVOUS_DIR'
RENDEZVOUS_PREFIX = 'rdv'
_PR_SET_PDEATHSIG = 1
UNIX_PATH_MAX = 100     # bytes of a unix socket's path that every system takes (Linux: 107)


class WorkerFailed(UserError):
    """A worker process exited with an error, was killed, or the run timed out."""

    def __init__(self, message, rank=None, exitcode=None):
        super().__init__(message)
        self.rank = rank
        self.exitcode = exitcode


def describe_exit(exitcode):
    """'exit code 3' or 'signal SIGKILL' for a multiprocessing exit code."""
    if exitcode is None:
        return 'still running'
    if exitcode < 0:
        try:
            return 'signal ' + signal.Signals(-exitcode).name
        except ValueError:
            return f'signal {-exitcode}'
    return f'exit code {exitcode}'


# ----------------------------------------------------------------------------------------------
# private folders

def pid_alive(pid):
    """Whether process `pid` exists (a zombie or another user's process counts as alive)."""
    if pid <= 0:
        return True             # not a process of its own: never taken for dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_dirs(prefix, base=None):
    """Removes this user's folders ``<prefix>-<pid>-*`` in `base` (the temporary folder) whose
    maker `pid` is dead; returns their paths. Another user's folder, a link, or the folder of a
    live process is never touched."""
    base = tempfile.gettempdir() if base is None else base
    rx = re.compile(rf'{re.escape(prefix)}-(\d+)-[^/]+\Z')
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        m = rx.match(name)
        if m is None:
            continue
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and \
                not pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def private_dir(prefix, room=0):
    """A fresh folder ``<prefix>-<this pid>-XXXXXXXX`` (mode 0700) in the temporary folder,
    once the stale ones of `prefix` (remove_stale_dirs) are gone. room: characters that must
    fit after the folder's path in a unix socket's path (UNIX_PATH_MAX); a TMPDIR too long for
    them gives way to /tmp."""
    base = tempfile.gettempdir()
    if room and len(os.fsencode(base)) + len(prefix) + 20 + room > UNIX_PATH_MAX \
            and os.path.isdir('/tmp'):
        base = '/tmp'
    remove_stale_dirs(prefix, base)
    return tempfile.mkdtemp(prefix=f'{prefix}-{os.getpid()}-', dir=base)


def remove_private_dir(path, prefix):
    """Removes the folder `path` that private_dir(prefix) made (anything else is left alone:
    `path` may come from another process)."""
    if path and re.fullmatch(rf'{re.escape(prefix)}-\d+-[^/]+', os.path.basename(path)):
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# in the worker

def _launcher_gone(parent_pid):
    """The launcher has died (SIGKILL): say so, remove its rendezvous folder, exit 1."""
    print(f'worker {os.getpid()}: the launcher (pid {parent_pid}) has gone, exiting',
          file=sys.stderr, flush=True)
    remove_private_dir(os.environ.get(RENDEZVOUS_ENV), RENDEZVOUS_PREFIX)
    os._exit(1)


def parent_watchdog(parent_pid=None, interval=0.5):
    """Make this process exit when its parent (the launcher) dies.

    Uses prctl(PR_SET_PDEATHSIG, SIGTERM) on Linux and, everywhere, a daemon thread that polls
    os.getppid(); when the parent is gone the process ends with exit code 1, removing the
    launcher's rendezvous folder. Call it first thing in a worker process (its main thread)."""
    if parent_pid is None:
        parent_pid = os.getppid()
    if sys.platform.startswith('linux'):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass   # the polling thread below still works
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        # SIGTERM still ends the worker (until it sets a handler of its own: train()'s
        # preemption), but, sent by the launcher's death, only once its folder is removed
        def on_sigterm(signum, frame):
            if os.getppid() != parent_pid:
                _launcher_gone(parent_pid)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        signal.signal(signal.SIGTERM, on_sigterm)

    def watch():
        while True:
            if os.getppid() != parent_pid:
                _launcher_gone(parent_pid)
            time.sleep(interval)

    if os.getppid() != parent_pid:   # it died before we got here
        _launcher_gone(parent_pid)
    threading.Thread(target=watch, name='parent-watchdog', daemon=True).start()


def _interrupt_once(signum, frame):
    """SIGINT in a worker: the first one interrupts (KeyboardInterrupt); later ones do not cut
    its clean-up short (a terminal's Ctrl-C reaches the worker, and the launcher passes it on
    again)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _worker_main(worker_fn, rank, world, args, parent_pid, err_conn):
    parent_watchdog(parent_pid)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt_once)
    try:
        worker_fn(rank, world, *args)
    except SystemExit as e:
        if e.code not in (None, 0):
            _report(err_conn, f'SystemExit({e.code!r})')
        raise
    except KeyboardInterrupt:
        _report(err_conn, 'KeyboardInterrupt')
        sys.exit(130)
    except UserError as e:
        # an error its message explains (bad input, a dead peer, preemption): the launcher
        # prints it; no traceback
        _report(err_conn, f'{type(e).__name__}: {e}')
        sys.exit(e.exit_status)
    except BaseException as e:
        _report(err_conn, f'{type(e).__name__}: {e}')
        traceback.print_exc()
        sys.stderr.flush()
        sys.exit(1)
    finally:
        err_conn.close()


def _report(conn, text):
    """Tell the launcher why this worker failed, as plain UTF-8 text (nothing is pickled)."""
    try:
        conn.send_bytes(text.encode('utf-8', 'replace')[:4000])
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# in the launcher

def _stop(procs, grace):
    """SIGTERM every live process, SIGKILL what is left after `grace` seconds, reap all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(5.0)


def _collect_errors(conns, received):
    """Read, without blocking, the error texts the workers sent (rank -> last text)."""
    for rank, c in enumerate(conns):
        try:
            while c.poll():
                received[rank] = c.recv_bytes(8192).decode('utf-8', 'replace')
        except (EOFError, OSError):
            pass


def spawn(worker_fn, world, args=(), *, timeout=None, grace=5.0):
    """Run worker_fn(rank, world, *args) in `world` processes and wait for all of them.

    Returns None when every worker exits with code 0. Raises WorkerFailed naming the first rank
    that failed (exit code or signal, and its exception's message when it raised one), or when
    `timeout` seconds pass; the other workers are stopped first. On SIGINT/SIGTERM the signal is
    forwarded to the workers, which get `grace` seconds, and the launcher exits with 128+signal,
    printing what the workers reported (with 0 when every worker had finished its work); a
    worker exiting with 128+SIGTERM (a SIGTERM that reached it alone) counts as the launcher's
    SIGTERM. worker_fn must be importable by name (a module-level
    function). A worker that raises a UserError reports its message and exits with the
    error's exit_status, without a traceback."""
    if world < 1:
        raise ValueError(f'world must be at least 1, got {world!r}')
    ctx = mp.get_context('spawn')
    rdv_dir = private_dir(RENDEZVOUS_PREFIX)          # mode 0700: private to this user
    saved_env = {RENDEZVOUS_ENV: os.environ.get(RENDEZVOUS_ENV)}
    os.environ[RENDEZVOUS_ENV] = rdv_dir
    procs, conns = [], []
    received = {}
    stop_signal = []

    def on_signal(signum, frame):
        stop_signal.append(signum)

    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            old_handlers[s] = signal.signal(s, on_signal)
    try:
        for rank in range(world):
            r_conn, w_conn = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker_main, name=f'worker-{rank}',
                            args=(worker_fn, rank, world, tuple(args), os.getpid(), w_conn))
            p.start()
            w_conn.close()
            procs.append(p)
            conns.append(r_conn)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            _collect_errors(conns, received)
            failed = [(r, p) for r, p in enumerate(procs)
                      if p.exitcode is not None and p.exitcode != 0]
            stopped_by = f'{signal.Signals(stop_signal[0]).name} received' if stop_signal else ''
            if failed and not stop_signal and all(
                    p.exitcode == 128 + signal.SIGTERM for _, p in failed):
                # a worker that SIGTERM reached alone (and that stopped cleanly, as a
                # preempted trainer does): the others stop as on the launcher's SIGTERM
                stop_signal.append(signal.SIGTERM)
                stopped_by = f'rank {failed[0][0]} stopped by SIGTERM'
            if stop_signal:
                signum = stop_signal[0]
                for p in procs:
                    if p.is_alive():
                        os.kill(p.pid, signum)
                deadline_sig = time.monotonic() + grace
                for p in procs:
                    p.join(max(0.0, deadline_sig - time.monotonic()))
                _stop(procs, 1.0)
                if all(p.exitcode == 0 for p in procs):
                    return None         # they had finished their work
                _collect_errors(conns, received)
                said = ''.join(f'; rank {r}: {received[r]}' for r in sorted(received)
                               if r == min(received) or received[r] != received[min(received)])
                print('launcher: {}, workers stopped ({}){}'.format(
                    stopped_by, ', '.join(f'rank {r}: {describe_exit(p.exitcode)}'
                                          for r, p in enumerate(procs)), said),
                    file=sys.stderr, flush=True)
                raise SystemExit(128 + signum)
            if failed:
                # prefer a rank killed by a signal or exiting first: the survivors' errors are
                # usually consequences ("peer stopped responding")
                failed.sort(key=lambda rp: (rp[1].exitcode >= 0, rp[0]))
                rank, p = failed[0]
                _stop(procs, grace)
                _collect_errors(conns, received)
                msg = f'worker rank {rank} (pid {p.pid}) failed: {describe_exit(p.exitcode)}'
                if rank in received:
                    msg += ': ' + received[rank]
                others = [f'rank {r}: {describe_exit(q.exitcode)}'
                          for r, q in enumerate(procs) if r != rank]
                if others:
                    msg += ' (then stopped the others: {})'.format(', '.join(others))
                raise WorkerFailed(msg, rank=rank, exitcode=p.exitcode)
            if all(p.exitcode == 0 for p in procs):
                return None
            if deadline is not None and time.monotonic() > deadline:
                running = [r for r, p in enumerate(procs) if p.exitcode is None]
                _stop(procs, grace)
                raise WorkerFailed(f'workers {running} still running after the {timeout:.0f} s '
                                   'timeout; stopped them')
            _wait_any([p.sentinel for p in procs if p.exitcode is None], timeout=0.2)
    finally:
        _stop(procs, grace)          # no-op when all have exited; never leave orphans
        for c in conns:
            c.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        remove_private_dir(rdv_dir, RENDEZVOUS_PREFIX)


# ----------------------------------------------------------------------------------------------
# torch.distributed

def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def under_torchrun():
    return all(k in os.environ for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR'))


_init_count = {}


def init_distributed(backend, rank, world, port, timeout):
    """torch.distributed.init_process_group for this replica; `timeout` in seconds.

    Under torchrun: env:// (rank and world must agree with RANK/WORLD_SIZE). Under spawn(): a
    file store in the launcher's private rendezvous directory (the c10d TCP store would listen
    on every interface), named after `port`. Otherwise tcp://127.0.0.1:PORT, rank 0 hosting the
    store. Collective traffic of gloo and NCCL is kept on the loopback interface unless
    GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME say otherwise (not under torchrun)."""
    import torch.distributed as dist
    td = datetime.timedelta(seconds=float(timeout))
    if under_torchrun():
        env_rank, env_world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        if (env_rank, env_world) != (rank, world):
            raise ValueError(f'init_distributed: rank {rank} of {world} does not match '
                             f"torchrun's RANK={env_rank} WORLD_SIZE={env_world}")
        dist.init_process_group(backend, init_method='env://', rank=rank, world_size=world,
                                timeout=td)
        return
    os.environ.setdefault('GLOO_SOCKET_IFNAME', 'lo')
    os.environ.setdefault('NCCL_SOCKET_IFNAME', 'lo')
    rdv = os.environ.get(RENDEZVOUS_ENV)
    if rdv and os.path.isdir(rdv):
        n = _init_count[port] = _init_count.get(port, 0) + 1
        init_method = 'file://' + os.path.join(rdv, f'store-{port}-{n}')
    else:
        init_method = f'tcp://127.0.0.1:{port}'
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=td)
