"""Parallel loading (proc_load.py): a real loader process, real ZeroMQ sockets, real shared memory
(on a GPU, tests marked gpu: pinned and copied to the device by the trainer), real batch files
written with batch_files.write_batch."""
import json
import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zmq

from conftest import default_sigint

from alexnet_lib.batch_files import replica_rows, write_batch
from alexnet_lib.data import SerialLoader
from alexnet_lib.parallel import LoaderError, ParallelLoader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

B = 16          # rows per batch file (small: the image shape is fixed at 256x256x3)
N_FILES = 5
PROC_LOAD = os.path.join(ROOT, 'proc_load.py')

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp('proc_load_batches')
    rng = np.random.RandomState(1234)
    files = []
    for i in range(N_FILES):
        p = str(d / f'{i:04d}.hkl')
        write_batch(p, rng.randint(0, 256, (B, 256, 256, 3)).astype(np.uint8))
        files.append(p)
    labels = rng.randint(0, 1000, N_FILES * B)
    return files, labels


def mixed_requests(files):
    """Whole files, each replica's slice of a 2- and 3-replica run, out of order, repeats, and
    an empty request."""
    reqs = [(f, 0, B) for f in files]
    for world in (2, 3):
        for rank in range(world):
            lo, hi = replica_rows(B, rank, world)
            reqs += [(f, lo, hi) for f in files[::-1]]
    reqs += [(files[2], 5, 6), (files[0], 0, B), (files[0], 0, B), (files[3], 7, 7)]
    return reqs


def with_labels(files, labels, requests):
    """Pairs each request with its labels: batch i's labels are labels[i*B:(i+1)*B]."""
    return [labels[files.index(p) * B + lo: files.index(p) * B + hi] for p, lo, hi in requests]


def serial(requests, device='cpu'):
    return [x.clone() for x in SerialLoader(device).iterate(requests)]


def proc_state(pid):
    """'gone', 'Z' (zombie: exited, not yet reaped) or the live state letter."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return 'gone'


def alive(pid):
    return proc_state(pid) not in ('gone', 'Z')


def wait_dead(pid, within):
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return not alive(pid)


def loader_children():
    """Our child processes running proc_load.py (zombies included: they would be unreaped)."""
    kids = []
    for d in os.listdir('/proc'):
        if not d.isdigit():
            continue
        try:
            with open(f'/proc/{d}/stat') as f:
                ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            with open(f'/proc/{d}/cmdline', 'rb') as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and (b'proc_load.py' in cmd or proc_state(d) == 'Z'):
            kids.append(int(d))
    return kids


def assert_no_loader_left(pid):
    assert not alive(pid), f"loader {pid} still running"
    assert proc_state(pid) == 'gone', f"loader {pid} left as a zombie (not reaped)"
    assert loader_children() == []


def socket_folder(endpoint):
    return os.path.dirname(endpoint[len('ipc://'):])


# ---------------------------------------------------------------------------------------------
# delivery

@pytest.mark.parametrize('prefetch', [2, 3, 5])
def test_delivers_requested_rows_in_order_like_serial(dataset, prefetch):
    files, labels = dataset
    reqs = mixed_requests(files)
    want = serial(reqs)
    want_labels = with_labels(files, labels, reqs)
    got, got_labels = [], []
    with ParallelLoader('cpu', max_rows=B, prefetch=prefetch) as loader:
        pid = loader.pid
        for (path, lo, hi), lab, x in zip(reqs, want_labels, loader.iterate(reqs)):
            assert x.dtype == torch.uint8 and x.device.type == 'cpu'
            assert tuple(x.shape) == (hi - lo, 256, 256, 3)
            assert len(lab) == hi - lo
            got.append(x.clone())
            got_labels.append(lab)
        assert len(got) == len(reqs)
        for i, (w, g) in enumerate(zip(want, got)):
            assert torch.equal(w, g), f"request {i} {reqs[i]} differs from SerialLoader"
        assert all(np.array_equal(a, b) for a, b in zip(got_labels, want_labels))
        # a second epoch on the same loader
        again = [x.clone() for x in loader.iterate(reqs[:7])]
        assert all(torch.equal(a, b) for a, b in zip(again, want[:7]))
    assert_no_loader_left(pid)


@pytest.mark.slow
def test_item_is_not_overwritten_while_held(dataset):
    """The loader runs ahead, but never into the buffer the consumer still holds."""
    files, _ = dataset
    reqs = [(f, 0, B) for f in files] * 3
    want = serial(reqs)
    with ParallelLoader('cpu', max_rows=B, prefetch=2) as loader:
        for i, x in enumerate(loader.iterate(reqs)):
            time.sleep(0.03)        # time for the loader to finish everything it may do
            assert torch.equal(x, want[i]), f"item {i} changed while the consumer held it"


@pytest.mark.slow
def test_abandoned_iteration_then_new_one(dataset):
    files, _ = dataset
    reqs = [(f, 0, B) for f in files]
    want = serial(reqs)
    with ParallelLoader('cpu', max_rows=B, prefetch=3) as loader:
        for i, x in enumerate(loader.iterate(reqs * 2)):
            if i == 1:
                break                # two loads are still with the loader
        gen = loader.iterate(reqs)
        next(gen)
        gen.close()                  # abandoned right after the first item
        got = [x.clone() for x in loader.iterate(reqs)]
        assert all(torch.equal(a, b) for a, b in zip(got, want)) and len(got) == len(want)
        assert list(loader.iterate([])) == []


def test_ipc_endpoint_in_private_dir(dataset):
    files, _ = dataset
    reqs = [(files[1], 0, B), (files[4], 2, 9)]
    want = serial(reqs)
    with ParallelLoader('cpu', max_rows=B) as loader:
        assert loader.endpoint.startswith('ipc://')
        d = os.path.dirname(loader.endpoint[len('ipc://'):])
        assert os.stat(d).st_mode & 0o777 == 0o700
        got = [x.clone() for x in loader.iterate(reqs)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not os.path.exists(d)


def test_bad_arguments_are_refused(dataset):
    files, _ = dataset
    with pytest.raises(ValueError, match='prefetch'):
        ParallelLoader('cpu', max_rows=B, prefetch=1)
    with pytest.raises(ValueError, match='max_rows'):
        ParallelLoader('cpu', max_rows=0)
    with ParallelLoader('cpu', max_rows=8) as loader:
        with pytest.raises(ValueError, match='max_rows=8'):
            list(loader.iterate([(files[0], 0, 9)]))
        # still usable afterwards
        assert len(list(loader.iterate([(files[0], 0, 8)]))) == 1
    assert loader_children() == []


def test_script_help():
    r = subprocess.run([sys.executable, PROC_LOAD, '--help'], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and 'Loader process' in r.stdout


@pytest.mark.slow
def test_script_without_startup_line_exits():
    r = subprocess.run([sys.executable, PROC_LOAD, '--boot-timeout', '0.5'], stdin=subprocess.PIPE,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and 'start-up line' in r.stderr


# ---------------------------------------------------------------------------------------------
# trust

@pytest.mark.slow
def test_a_second_peer_on_the_socket_is_not_heard(dataset):
    """The loader's socket is a PAIR in a 0700 folder: another process of this user that
    connects to it anyway and sends forged answers, garbage and an oversized message is not
    heard, before or during an iteration."""
    files, _ = dataset
    reqs = [(f, 0, B) for f in files]
    want = serial(reqs)
    with ParallelLoader('cpu', max_rows=B) as loader:
        ctx = zmq.Context()
        try:
            s = ctx.socket(zmq.PAIR)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(loader.endpoint)
            forged = json.dumps({'type': 'ready', 'seq': 1}).encode()
            for msg in (forged, json.dumps({'type': 'error', 'seq': None, 'message': 'x'}).encode(),
                        b'\x80\x04garbage-not-json', b'x' * (1 << 17)):
                try:
                    s.send(msg, zmq.NOBLOCK)
                except zmq.Again:
                    pass               # nobody takes it: as good
            time.sleep(0.2)
            got = [x.clone() for x in loader.iterate(reqs)]
            it = loader.iterate(reqs)
            first = next(it).clone()
            try:
                s.send(forged, zmq.NOBLOCK)
            except zmq.Again:
                pass
            rest = [x.clone() for x in it]
            s.close()
        finally:
            ctx.term()
        assert all(torch.equal(a, b) for a, b in zip(got, want)) and len(got) == len(want)
        assert torch.equal(first, want[0])
        assert all(torch.equal(a, b) for a, b in zip(rest, want[1:])) and len(rest) == 4
        assert alive(loader.pid)


# ---------------------------------------------------------------------------------------------
# failures

@pytest.mark.slow
def test_sigkill_of_loader_mid_epoch_raises_and_leaves_nothing(dataset):
    files, _ = dataset
    reqs = [(f, 0, B) for f in files] * 10
    loader = ParallelLoader('cpu', max_rows=B, prefetch=2)
    pid = loader.pid
    taken = 0
    t_kill = None
    with pytest.raises(LoaderError) as ei:
        for x in loader.iterate(reqs):
            taken += 1
            if taken == 3:
                os.kill(pid, signal.SIGKILL)
                t_kill = time.monotonic()
    elapsed = time.monotonic() - t_kill
    assert elapsed < 5, f"trainer noticed the dead loader only after {elapsed:.1f} s"
    assert taken < len(reqs)
    msg = str(ei.value)
    assert f'pid {pid}' in msg and 'SIGKILL' in msg and '.hkl' in msg, msg
    assert_no_loader_left(pid)
    assert not os.path.exists(socket_folder(loader.endpoint))   # the trainer removed it
    with pytest.raises(LoaderError):        # the loader stays broken, with the same message
        list(loader.iterate(reqs))
    loader.close()
    loader.close()
    assert_no_loader_left(pid)


@pytest.mark.slow
def test_loader_ignores_sigterm_and_ends_with_its_trainer(dataset):
    """A preempted job gets SIGTERM everywhere: the loader keeps serving so the trainer can
    finish its step and write a snapshot; it ends when the trainer closes it."""
    files, _ = dataset
    with ParallelLoader('cpu', max_rows=B) as loader:
        pid = loader.pid
        it = loader.iterate([(files[0], 0, B)] * 6)
        next(it)
        os.kill(pid, signal.SIGTERM)
        assert len(list(it)) == 5
    assert_no_loader_left(pid)


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['truncated', 'missing', 'not_hdf5'])
def test_bad_batch_file_is_reported_by_name(dataset, tmp_path, kind):
    files, _ = dataset
    bad = str(tmp_path / f'bad_{kind}.hkl')
    if kind == 'truncated':
        with open(files[1], 'rb') as f:
            data = f.read()
        with open(bad, 'wb') as f:
            f.write(data[:len(data) // 2])
    elif kind == 'not_hdf5':
        with open(bad, 'wb') as f:
            f.write(os.urandom(300000))
    reqs = [(files[0], 0, B), (files[1], 0, B), (bad, 0, B), (files[2], 0, B)]
    loader = ParallelLoader('cpu', max_rows=B, prefetch=2)
    pid = loader.pid
    got = []
    t0 = time.monotonic()
    with pytest.raises(LoaderError) as ei:
        for x in loader.iterate(reqs):
            got.append(x.clone())
    assert time.monotonic() - t0 < 10
    assert bad in str(ei.value), str(ei.value)
    assert len(got) == 2                     # everything before the bad file was delivered
    assert_no_loader_left(pid)               # stopped and reaped even before close()
    loader.close()


@pytest.mark.slow
def test_dead_trainer_makes_loader_exit(dataset):
    """A trainer killed by SIGKILL: its loader exits within seconds and removes the trainer's
    socket folder."""
    code = ("import time\n"
            "from alexnet_lib.parallel import ParallelLoader\n"
            f"l = ParallelLoader('cpu', max_rows={B:d})\n"
            f"it = l.iterate([({files_0(dataset)!r}, 0, {B:d})] * 1000); next(it)\n"
            "print(l.pid, l.endpoint, flush=True)\n"
            "time.sleep(120)\n")
    trainer = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE)
    try:
        r, _, _ = select.select([trainer.stdout], [], [], 40)
        assert r, "trainer did not start its loader within 40 s"
        pid, endpoint = trainer.stdout.readline().split()
        pid, folder = int(pid), socket_folder(endpoint.decode())
        assert alive(pid) and os.path.isdir(folder)
        assert os.path.basename(folder).startswith(f'proc_load-{trainer.pid}-')
        trainer.kill()
        trainer.wait(10)
        assert wait_dead(pid, 5), f"loader {pid} outlived its trainer by more than 5 s"
        assert not os.path.exists(folder), "the loader left its dead trainer's socket folder"
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(10)
        trainer.stdout.close()


def files_0(dataset):
    return dataset[0][0]


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_a_feed_left_by_an_exception_neither_waits_nor_reports(dataset):
    """An exception leaving a feed (a Ctrl-C, an error of the step) goes on its way at once,
    unchanged, whatever the loader does; the loads it left in flight are collected by the next
    feed, which delivers the right rows."""
    files, _ = dataset
    reqs = [(f, 0, B) for f in files]
    want = serial(reqs)
    with ParallelLoader('cpu', max_rows=B, prefetch=3) as loader:
        for _ in range(2):
            with pytest.raises(Interrupt):
                with loader.feed(reqs * 2) as feed:
                    feed.take()
                    raise Interrupt()
        got = [x.clone() for x in loader.iterate(reqs)]
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))

    loader = ParallelLoader('cpu', max_rows=B, prefetch=3)
    pid = loader.pid
    with pytest.raises(Interrupt):
        with loader.feed(reqs * 2) as feed:
            feed.take()
            os.kill(pid, signal.SIGKILL)
            assert wait_dead(pid, 5)
            t0 = time.monotonic()
            raise Interrupt()            # not replaced by the dead loader's LoaderError
    assert time.monotonic() - t0 < 1
    with pytest.raises(LoaderError, match='SIGKILL'):   # the loader's next use says it
        list(loader.iterate(reqs))
    loader.close()
    assert_no_loader_left(pid)
    assert not os.path.exists(socket_folder(loader.endpoint))


@pytest.mark.slow
def test_a_loader_interrupted_alone_is_an_error(dataset):
    """SIGINT to the loader only (the trainer is not interrupted): a LoaderError that says so,
    naming what was being loaded."""
    files, _ = dataset
    # a loader started where SIGINT is ignored (a background job, nohup) ignores it too: here
    # it is started with SIGINT heard, as from a terminal
    heard = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        loader = ParallelLoader('cpu', max_rows=B, prefetch=2)
    finally:
        signal.signal(signal.SIGINT, heard)
    pid = loader.pid
    with pytest.raises(LoaderError) as ei:
        for i, x in enumerate(loader.iterate([(files[0], 0, B)] * 1000)):
            if i == 2:
                os.kill(pid, signal.SIGINT)
    msg = str(ei.value)
    assert f'loader process (pid {pid}) was interrupted (SIGINT) while loading' in msg, msg
    assert files[0] in msg
    loader.close()
    assert_no_loader_left(pid)


@pytest.mark.slow
def test_ctrl_c_ends_trainer_and_loader(dataset):
    """SIGINT to the whole process group, as a terminal's Ctrl-C does, mid-epoch: the trainer
    ends with its KeyboardInterrupt (not with a LoaderError about the loader), the loader and
    its socket folder go too."""
    code = ("import time\n"
            "from alexnet_lib.parallel import ParallelLoader\n"
            f"with ParallelLoader('cpu', max_rows={B:d}) as l:\n"
            "    print(l.pid, l.endpoint, flush=True)\n"
            f"    for x in l.iterate([({files_0(dataset)!r}, 0, {B:d})] * 100000):\n"
            "        time.sleep(0.001)\n")
    trainer = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True,
                               preexec_fn=default_sigint)
    try:
        r, _, _ = select.select([trainer.stdout], [], [], 40)
        assert r, "trainer did not start its loader within 40 s"
        pid, endpoint = trainer.stdout.readline().split()
        pid, folder = int(pid), socket_folder(endpoint.decode())
        time.sleep(0.3)
        os.killpg(trainer.pid, signal.SIGINT)
        trainer.wait(10)
        err = trainer.stderr.read().decode(errors='replace')
        assert trainer.returncode != 0
        assert err.rstrip().endswith('KeyboardInterrupt') and 'LoaderError' not in err, err
        assert wait_dead(pid, 5), f"loader {pid} still running after Ctrl-C"
        assert not os.path.exists(folder)
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
            trainer.wait(10)
        trainer.stdout.close()
        trainer.stderr.close()


# ---------------------------------------------------------------------------------------------
# GPU (run on a CUDA machine: python -m pytest -m gpu tests/test_proc_load.py)

@gpu
@needs_cuda
@pytest.mark.parametrize('prefetch', [2, 3])
def test_gpu_delivers_like_serial(dataset, prefetch):
    files, _ = dataset
    reqs = mixed_requests(files)
    want = serial(reqs, 'cuda')
    with ParallelLoader('cuda', max_rows=B, prefetch=prefetch) as loader:
        got = []
        for x in loader.iterate(reqs):
            assert x.is_cuda and x.dtype == torch.uint8
            got.append(x.clone())
        torch.cuda.synchronize()
        pid = loader.pid
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"request {i} {reqs[i]} differs from SerialLoader"
    assert_no_loader_left(pid)


@gpu
@needs_cuda
def test_gpu_buffer_not_overwritten_while_gpu_still_reads_it(dataset):
    """The consumer queues slow GPU work on an item and moves on at once: neither the loader
    (its shared buffer) nor a later copy (the device buffer) may overwrite the item before the
    work has run."""
    files, _ = dataset
    reqs = [(f, 0, B) for f in files] * 2
    want = serial(reqs, 'cuda')
    outs = []
    with ParallelLoader('cuda', max_rows=B, prefetch=2) as loader:
        for x in loader.iterate(reqs):
            torch.cuda._sleep(50_000_000)     # tens of ms of GPU time before reading x
            outs.append(x.clone())            # queued after the sleep, on the same stream
        torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(outs, want)):
        assert torch.equal(a, b), f"item {i}: buffer overwritten while the GPU still read it"


@gpu
@needs_cuda
def test_gpu_loader_errors(dataset, tmp_path):
    files, _ = dataset
    bad = str(tmp_path / 'bad.hkl')
    with open(bad, 'wb') as f:
        f.write(b'\0' * 1000)
    loader = ParallelLoader('cuda', max_rows=B)
    with pytest.raises(LoaderError, match='bad.hkl'):
        list(loader.iterate([(files[0], 0, B), (bad, 0, B)]))
    assert_no_loader_left(loader.pid)
    loader.close()
    loader = ParallelLoader('cuda', max_rows=B)
    pid = loader.pid
    with pytest.raises(LoaderError, match='SIGKILL'):
        for i, x in enumerate(loader.iterate([(files[0], 0, B)] * 100)):
            if i == 2:
                os.kill(pid, signal.SIGKILL)
    loader.close()
    assert_no_loader_left(pid)


@gpu
@needs_cuda
def test_gpu_dead_trainer_makes_loader_exit(dataset):
    """The trainer dies while its GPU runs a long kernel that a batch's copy waits behind: the
    loader must still go within seconds."""
    code = ("import time, torch\n"
            "from alexnet_lib.parallel import ParallelLoader\n"
            f"l = ParallelLoader('cuda', max_rows={B:d}, prefetch=2)\n"
            f"it = l.iterate([({files_0(dataset)!r}, 0, {B:d})] * 1000)\n"
            "x = next(it); torch.cuda._sleep(20_000_000_000); x.sum()\n"
            "next(it); next(it)   # the copy into x's device buffer waits for the sleep\n"
            "time.sleep(0.5)\n"
            "print(l.pid, flush=True)\n"
            "time.sleep(120)\n")
    trainer = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE)
    try:
        r, _, _ = select.select([trainer.stdout], [], [], 90)
        assert r, "trainer did not start its loader within 90 s"
        line = trainer.stdout.readline()
        assert line.strip(), f"trainer exited with {trainer.wait(10)} before starting its loader"
        pid = int(line)
        assert alive(pid)
        trainer.kill()
        trainer.wait(10)
        assert wait_dead(pid, 10), f"loader {pid} outlived its trainer by more than 10 s"
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(10)
        trainer.stdout.close()
