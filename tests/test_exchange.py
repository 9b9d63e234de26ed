"""launch.py and exchange.py with real processes, real sockets, real shared memory.

CPU: host and gloo averaging with 2 and 3 processes (exact against a reference), metric sums,
check_identical naming the rank that differs, a killed or stuck peer giving a clear error within
the timeout and leaving no process behind, spawn() naming the rank that failed, and the launcher
passing on SIGTERM and taking its workers with it when SIGKILLed.

The backends' table (exchange_backends): every entry complete and importable, its rules' one-line
messages, and what reads it (the config, dual_mlp.py's options, --help). The shared rank-order
average is also run through a test memory that copies every peer's half first, as p2p does, and
a backend that says it cannot run gives way to its fallback: both on the CPU.

GPU (pytest -m gpu, two GPUs): p2p (CUDA IPC + peer copies) and nccl averaging, exact.

Workers are module-level functions: spawned processes import this module by name. The module
imports only the standard library, pytest and launch at the top, so light workers start fast.
"""
import functools
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alexnet_lib import launch

ROOT = Path(__file__).resolve().parents[1]

TIMEOUT = 30.0


def _alive(pid):
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            return f.read().rsplit(b')', 1)[1].split()[0] not in (b'Z', b'X')
    except FileNotFoundError:
        return False


def _wait_gone(pids, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return []
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _kill_all(pids):
    for p in pids:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _write_pid(out_dir, rank):
    tmp = os.path.join(out_dir, f'pid{rank}.tmp')
    with open(tmp, 'w') as f:
        f.write(str(os.getpid()))
    os.replace(tmp, os.path.join(out_dir, f'pid{rank}'))


def _read_pids(out_dir):
    pids = []
    for name in os.listdir(out_dir):
        if name.startswith('pid') and not name.endswith('.tmp'):
            with open(os.path.join(out_dir, name)) as f:
                pids.append(int(f.read()))
    return pids


def _shm_segments(pids):
    """The host exchange's segments in /dev/shm of the groups whose rank 0 is one of `pids`
    (their names start with its pid): this test's own, not those of a run that another test
    worker has going at the same time."""
    if not os.path.isdir('/dev/shm'):
        return set()
    prefixes = tuple(f'xchg-{p}-' for p in pids)
    return {n for n in os.listdir('/dev/shm') if n.startswith(prefixes)}


# ----------------------------------------------------------------------------------------------
# workers: averaging

def _data(rank, step, n, gaussian, device):
    import torch
    g = torch.Generator().manual_seed(7919 * rank + 104729 * step + n)
    if gaussian:
        t = torch.randn(n, generator=g)
    else:          # multiples of 1/4 below 2**12: every sum is exact, whatever the order
        t = torch.randint(-4096, 4096, (n,), generator=g).float() * 0.25
    return t.to(device)


def _reference(parts, world):
    """The mean the exchange promises: the sum in rank order, divided by the world size."""
    import torch
    acc = parts[0].clone()
    for p in parts[1:]:
        acc.add_(p)
    return torch.div(acc, world)


def _register_test_backends():
    """Two backends of this module, added to the table of this process: 'copying' (host's
    memory read as p2p reads its peers: each half copied before it is added) and 'refusing'
    (says it cannot run; its fallback is host)."""
    import dataclasses
    from alexnet_lib import exchange_backends
    host = exchange_backends.BACKENDS['host']
    for name, cls, fallback in (('copying', '_CopyingHost', ''), ('refusing', '_Refusing', 'host')):
        exchange_backends.BACKENDS[name] = dataclasses.replace(
            host, name=name, constructor=f'test_exchange:{cls}', fallback=fallback)


@functools.lru_cache(maxsize=None)
def _plane_classes():
    from alexnet_lib.exchange_rank_order import Host

    class CopyingHost(Host):
        name = 'copying'
        copies_peers = True

    class Refusing(Host):
        @staticmethod
        def unavailable(ctl, device):
            return 'a test backend that never runs'

    return CopyingHost, Refusing


def __getattr__(name):           # the test planes, made when a worker asks for them
    if name in ('_CopyingHost', '_Refusing'):
        return _plane_classes()[name == '_Refusing']
    raise AttributeError(name)


def _w_average(rank, world, kinds, device_type, expect_kinds, port, out_dir=None):
    if out_dir:
        _write_pid(out_dir, rank)
    import torch
    from alexnet_lib import exchange, exchange_backends
    from alexnet_lib.exchange_rank_order import RankOrderAverage
    torch.set_num_threads(1)
    _register_test_backends()
    device = torch.device('cuda', rank) if device_type == 'cuda' else torch.device('cpu')
    for kind, expect in zip(kinds, expect_kinds):
        ex = exchange.make_exchanger(kind, rank, world, device, port=port, timeout=TIMEOUT)
        port += 1
        try:
            assert ex.kind == expect, (
                f'rank {rank}: asked for {kind}, got {ex.kind}, expected {expect}')
            assert (ex.rank, ex.world) == (rank, world)
            if out_dir and ex.kind == 'host':   # where its segments go, for the test to check
                with open(os.path.join(out_dir, f'prefixes{rank}.txt'), 'a') as f:
                    f.write(ex._plane._prefix + '\n')
            # any order of summation gives the same result for these values; rank order (p2p,
            # host) is exact for gaussian ones too, and so is any order with two replicas
            backend = exchange_backends.get(ex.kind)
            rank_order = issubclass(backend.plane_class(), RankOrderAverage)
            gaussian_exact = world == 2 or rank_order
            state = torch.empty(100_003, device=device)        # e.g. params + momentum
            grads = torch.empty(37, device=device)
            for step in range(4):
                for buf, gaussian in ((state, False), (grads, gaussian_exact)):
                    parts = [_data(r, step, buf.numel(), gaussian, device) for r in range(world)]
                    buf.copy_(parts[rank])
                    if step % 2:    # started, then finished: the overlapped form
                        pending = ex.start_average_(buf)
                        pending.wait()
                    else:
                        ex.average_(buf)
                    ref = _reference(parts, world)
                    assert torch.equal(buf, ref), (
                        f'{ex.kind} rank {rank} step {step}: max |error| '
                        f'{(buf - ref).abs().max().item():g}')
                # a buffer allocated anew every step (registration again, or the same address)
                fresh = _data(rank, step, 513, False, device)
                ex.average_(fresh)
                ref = _reference([_data(r, step, 513, False, device) for r in range(world)], world)
                assert torch.equal(fresh, ref), f'{ex.kind} rank {rank}: fresh buffer wrong'
            assert ex.all_sum([rank, 0.5, 2]) == [world * (world - 1) / 2, 0.5 * world, 2.0 * world]
            assert ex.all_sum([]) == []
            ex.check_identical(state)
            ex.barrier()
            state[17] += 1.0 if rank == world - 1 else 0.0
            try:
                ex.check_identical(state, 'weights')
            except exchange.ExchangeError as e:
                text = str(e)
                assert ('weights differ' in text
                        and f'rank {world - 1} differs from rank 0' in text), text
            else:
                raise AssertionError(f'rank {rank}: check_identical did not notice the '
                                     'difference')
            with_bad = torch.zeros(8, dtype=torch.float64, device=device)
            try:
                ex.average_(with_bad)
            except ValueError as e:
                assert 'float32' in str(e)
            else:
                raise AssertionError('average_ accepted a float64 buffer')
            if 'bf16' not in backend.wires():
                try:
                    ex.average_(grads, torch.bfloat16)
                except ValueError as e:
                    assert f'bf16 average needs the nccl or gloo exchange, not {ex.kind}' in str(
                        e), str(e)
                else:
                    raise AssertionError(f'{ex.kind} averaged in bfloat16')
            if rank_order:                      # replicas disagreeing on the size: both told
                odd = torch.zeros(200_000 if rank == 0 else 100, device=device)
                try:
                    ex.average_(odd)
                except exchange.ExchangeError as e:
                    assert 'different sizes' in str(e) and 'rank 0: 200000' in str(e), str(e)
                else:
                    raise AssertionError('buffers of different sizes were averaged')
        finally:
            ex.close()


@pytest.mark.slow
@pytest.mark.parametrize('world', [2, 3])
def test_host_and_gloo_average_exactly(tmp_path, world):
    launch.spawn(_w_average, world, args=(('host', 'gloo', 'p2p', 'copying', 'refusing'), 'cpu',
                                          ('host', 'gloo', 'host', 'copying', 'host'),
                                          launch.free_port(), str(tmp_path)), timeout=180)
    assert not _shm_segments(_read_pids(str(tmp_path))), 'shared-memory segments left behind'
    # the leak checks here find a run's segments by rank 0's pid in their names: a segment
    # named otherwise would go unseen
    with open(tmp_path / 'pid0') as f:
        pid0 = int(f.read())
    for r in range(world):
        prefixes = (tmp_path / f'prefixes{r}.txt').read_text().split()
        assert len(prefixes) == 3, prefixes        # host, and p2p and refusing as host
        for prefix in prefixes:
            assert re.fullmatch(rf'/dev/shm/xchg-{pid0}-[0-9a-f]{{16}}', prefix), prefix


def test_world_of_one_is_a_no_op():
    import torch
    from alexnet_lib import exchange, exchange_backends
    for kind in exchange_backends.NAMES:
        ex = exchange.make_exchanger(kind, 0, 1, 'cpu', port=1)
        t = torch.arange(5.0)
        ex.average_(t)
        assert torch.equal(t, torch.arange(5.0))
        assert ex.all_sum([1, 2.5]) == [1.0, 2.5]
        ex.check_identical(t)
        ex.barrier()
        ex.close()
    with pytest.raises(ValueError, match='unknown exchange kind'):
        exchange.make_exchanger('mpi', 0, 2, 'cpu', port=1)
    with pytest.raises(ValueError, match='nccl exchange needs CUDA'):
        exchange.make_exchanger('nccl', 0, 2, 'cpu', port=1)
    ex = exchange.make_exchanger('host', 0, 1, 'cpu', port=1)
    with pytest.raises(ValueError, match='1-D contiguous float32'):
        ex.average_(torch.zeros(3, 3))


def test_p2p_registration_messages_are_checked():
    """The checks of a p2p registration (no GPU needed to check them): malformed or out-of-place
    handles are refused with a clear error."""
    from alexnet_lib import exchange, exchange_p2p
    good = {'gen': 3, 'from': 1, 'numel': 20, 'tensor_offset': 0, 'device': 1,
            'handle': (b'h' * 64).hex(), 'size_bytes': 2 << 20,
            'offset_bytes': 0, 'ref_counter_handle': b'/torch_1_2'.hex(),
            'ref_counter_offset': 0, 'event_handle': None, 'event_sync_required': False}

    def check(body, sender=1):
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        return exchange_p2p._check_handle(payload, sender, rank=0, world=2, gen=3, numel=20)

    body = check(good)
    assert body['handle'] == b'h' * 64 and body['from'] == 1
    cases = [
        (b'{not json', 'not JSON'),
        (dict(good, extra=1), 'unexpected fields'),
        (dict(good, gen=2), 'generation 2'),
        (dict(good, numel=-4), 'not a non-negative integer'),
        (dict(good, numel=True), 'not a non-negative integer'),
        (dict(good, numel=40), 'announces 40 elements'),
        (dict(good, **{'from': 0}), 'from rank 0'),
        (dict(good, **{'from': 5}), 'from rank 5'),
        (dict(good, size_bytes=8), 'does not fit'),
        (dict(good, handle='***'), 'not hex'),
        (dict(good, handle=''), 'has 0 bytes'),
        (dict(good, event_sync_required='yes'), 'not a boolean'),
        ([1, 2], 'unexpected fields'),
    ]
    for body, complaint in cases:
        with pytest.raises(exchange.ExchangeError, match=complaint):
            check(body)


# ----------------------------------------------------------------------------------------------
# the table of backends, its rules, and what reads it

def test_every_backend_is_complete_and_its_plane_importable():
    from alexnet_lib import exchange_backends as xb
    from alexnet_lib.exchange_control import Plane
    assert xb.NAMES == ('p2p', 'nccl', 'gloo', 'host') and xb.ORIGINAL in xb.NAMES
    for b in xb.BACKENDS.values():
        assert b.description and '\n' not in b.description, b
        assert b.averages and set(b.averages) <= set(xb.AVERAGES), b
        for wires in b.averages.values():
            assert 'fp32' in wires and set(wires) <= set(xb.WIRE_DTYPES), b
        if b.fallback:      # a fallback that itself needs no fallback, and says when
            assert not xb.get(b.fallback).fallback and b.fallback_when, b
        assert issubclass(b.plane_class(), Plane), b
    assert xb.get('p2p').fallback == 'host'
    assert [n for n, b in xb.BACKENDS.items() if 'bf16' in b.wires()] == ['nccl', 'gloo']
    assert [n for n, b in xb.BACKENDS.items() if b.needs_gpus] == ['p2p', 'nccl']
    assert [n for n, b in xb.BACKENDS.items() if b.across_nodes] == ['nccl', 'gloo']
    with pytest.raises(ValueError, match="unknown exchange kind 'mpi': expected one of p2p, "
                                         "nccl, gloo, host"):
        xb.get('mpi')


def test_the_rules_are_one_line_each():
    from alexnet_lib import exchange_backends as xb
    cpus = ['cpu', 'cpu']
    assert xb.run_problem('p2p', 'weights', 'fp32', cpus) == (
        "exchange: p2p needs GPUs, and ['cpu', 'cpu'] includes the CPU; use exchange: host or "
        "exchange: gloo")
    assert xb.run_problem('nccl', 'weights', 'fp32', ['cuda:0', 'cpu'],
                          lambda n: f'--exchange {n}').endswith(
        'includes the CPU; use --exchange gloo or --exchange host')
    for name in ('host', 'p2p'):
        assert xb.run_problem(name, 'gradients', 'bf16', cpus) == (
            f'exchange_dtype: bf16 averages gradients through nccl or gloo; this run has '
            f'average: gradients, exchange: {name}')
    assert xb.run_problem('gloo', 'weights', 'bf16', cpus).startswith(
        'exchange_dtype: bf16 averages gradients through nccl or gloo; this run has average: '
        'weights')
    assert xb.run_problem('gloo', 'gradients', 'bf16', cpus) == ''
    assert xb.run_problem('nccl', 'gradients', 'bf16', ['cuda:0', 'cuda:1']) == ''
    assert xb.run_problem('host', 'weights', 'fp32', cpus) == ''
    assert xb.node_problem('host', '4', '8') == (
        'exchange: host works within one node (LOCAL_WORLD_SIZE=4, WORLD_SIZE=8); use '
        'exchange: nccl or exchange: gloo across nodes')
    assert xb.node_problem('p2p', 8, 8) == xb.node_problem('nccl', 4, 8) == ''
    assert xb.wire_problem('p2p', 'bf16') == (
        'a bf16 average needs the nccl or gloo exchange, not p2p')
    assert xb.wire_problem('gloo', 'bf16') == ''


def test_the_config_the_scripts_and_help_read_the_table(monkeypatch):
    import dual_mlp
    import train_2gpu
    from alexnet_lib import config, exchange_backends as xb
    assert config.CONFIG_KEYS['exchange'] == xb.NAMES
    assert config.CONFIG_KEYS['average'] == xb.AVERAGES
    assert config.CONFIG_KEYS['exchange_dtype'] == xb.WIRE_DTYPES
    with pytest.raises(config.ConfigError) as info:
        config.load_config('spec_2gpu.yaml', ['gpu0=cpu', 'gpu1=cpu', 'exchange=p2p'])
    assert str(info.value) == xb.run_problem('p2p', 'weights', 'fp32', ['cpu', 'cpu'])
    text = config.help_text('spec_2gpu.yaml', 'usage')
    assert '\n'.join(xb.help_lines()) in text
    option = next(a for a in dual_mlp.build_parser()._actions if a.dest == 'exchange')
    assert option.choices == ['auto', *xb.NAMES]
    assert all(b.description in option.help for b in xb.BACKENDS.values())
    assert [dual_mlp.auto_exchange('auto', d) for d in (['0', '1'], ['cpu', 'cpu'], ['0', 'cpu'])
            ] == ['p2p', 'host', 'host']
    # under torchrun across nodes, before anything starts
    for k, v in dict(RANK='0', WORLD_SIZE='4', MASTER_ADDR='127.0.0.1',
                     LOCAL_WORLD_SIZE='2').items():
        monkeypatch.setenv(k, v)
    cfg = config.load_config('spec_2gpu.yaml', ['gpu0=cpu', 'gpu1=cpu', 'exchange=host'])
    with pytest.raises(config.ConfigError, match=r'exchange: host works within one node '
                                                 r'\(LOCAL_WORLD_SIZE=2, WORLD_SIZE=4\); use '
                                                 r'exchange: nccl or exchange: gloo across nodes'):
        train_2gpu.run(cfg)
    from alexnet_lib import exchange
    with pytest.raises(ValueError, match='the host exchange works within one node'):
        exchange.make_exchanger('host', 0, 4, 'cpu', port=1)


def test_the_table_is_read_without_torch():
    code = ('import sys, alexnet_lib.exchange_backends, alexnet_lib.config; '
            'assert "torch" not in sys.modules, "torch imported"')
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# a peer that dies or hangs

def _w_peer_fails(rank, world, rdv, out_dir, kind, mode, timeout):
    os.environ[launch.RENDEZVOUS_ENV] = rdv
    _write_pid(out_dir, rank)
    import torch
    from alexnet_lib import exchange
    torch.set_num_threads(1)
    ex = exchange.make_exchanger(kind, rank, world, 'cpu', port=4321, timeout=timeout)
    buf = torch.ones(1000)
    for _ in range(3):
        ex.average_(buf)
    if rank == world - 1:
        if mode == 'killed':
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(300)                            # stuck: the test kills it
    start = time.monotonic()
    try:
        for _ in range(1000):
            ex.average_(buf)
        message = 'no error'
    except exchange.ExchangeError as e:
        message = str(e)
    seconds = time.monotonic() - start
    try:
        ex.average_(buf)
        again = 'no error'
    except exchange.ExchangeError as e:
        again = str(e)
    with open(os.path.join(out_dir, f'r{rank}.json'), 'w') as f:
        json.dump({'message': message, 'seconds': seconds, 'again': again}, f)
    ex.close()


@pytest.mark.slow
@pytest.mark.parametrize('kind,mode,world', [('host', 'killed', 3), ('gloo', 'stuck', 2)])
def test_failed_peer_gives_clear_error_and_no_orphans(tmp_path, kind, mode, world):
    timeout = 4.0
    rdv = tmp_path / 'rdv'
    rdv.mkdir()
    ctx = mp.get_context('spawn')
    procs = [ctx.Process(target=_w_peer_fails,
                         args=(r, world, str(rdv), str(tmp_path), kind, mode, timeout))
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        for p in procs[:-1]:
            p.join(60)
        survivors = [p.exitcode for p in procs[:-1]]
        if mode == 'stuck':
            assert procs[-1].is_alive()
            procs[-1].kill()
        procs[-1].join(10)
        assert survivors == [0] * (world - 1), survivors
        assert procs[-1].exitcode == -signal.SIGKILL
        for r in range(world - 1):
            with open(tmp_path / f'r{r}.json') as f:
                got = json.load(f)
            msg = got['message']
            if mode == 'killed':
                assert f'rank {world - 1} stopped responding' in msg, msg
                assert 'has exited' in msg, msg
                assert got['seconds'] < timeout, got
            else:
                assert 'stopped responding' in msg and 'within 4 s' in msg, msg
                assert timeout * 0.5 <= got['seconds'] < timeout * 3, got
            assert 'unusable after an earlier failure' in got['again'], got['again']
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    assert _wait_gone([p.pid for p in procs], 5) == []
    assert not _shm_segments([p.pid for p in procs]), 'shared-memory segments left behind'


def test_host_exchange_without_room_in_dev_shm_is_one_line_naming_it(tmp_path):
    """A container's 64 MB /dev/shm (here a mount of that size, private to the run) cannot hold
    the host exchange's segments: one line naming it and what to do, not a SIGBUS."""
    from conftest import make_dataset
    data = make_dataset(str(tmp_path / 'data'), n_train_files=1, file_rows=8, val_sizes=(4,))
    run = ' '.join([sys.executable, str(ROOT / 'train_2gpu.py'), 'gpus=[cpu,cpu]',
                    'exchange=host', 'batch_size=4', 'n_epochs=1', 'compile=False',
                    f'weights_dir={tmp_path}/w', *data])
    r = subprocess.run(['unshare', '-m', '--propagation', 'private', 'sh', '-c',
                        f'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {run}'],
                       capture_output=True, text=True, timeout=300)
    if 'mount' in r.stderr.split(':')[0] or 'unshare' in r.stderr.split(':')[0]:
        pytest.skip(f'cannot mount a small /dev/shm here: {r.stderr.strip()}')
    assert r.returncode == 1, r.stderr[-3000:]
    assert 'exchange: host needs' in r.stderr and 'of shared memory per replica in /dev/shm' \
        in r.stderr and 'use exchange: gloo' in r.stderr, r.stderr[-3000:]
    assert 'SIGBUS' not in r.stderr and 'Traceback' not in r.stderr


# ----------------------------------------------------------------------------------------------
# launch.spawn

def _w_fail(rank, world, out_dir, mode):
    _write_pid(out_dir, rank)
    if rank == 1:
        if mode == 'raise':
            raise ValueError('boom from rank 1')
        if mode == 'kill':
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == 'exit':
            sys.exit(3)
        return
    time.sleep(120)


@pytest.mark.parametrize('mode,expect', [('raise', 'exit code 1: ValueError: boom from rank 1'),
                                         ('kill', 'signal SIGKILL'), ('exit', 'exit code 3')])
def test_spawn_names_the_failed_rank_and_stops_the_others(tmp_path, mode, expect):
    start = time.monotonic()
    with pytest.raises(launch.WorkerFailed) as info:
        launch.spawn(_w_fail, 3, args=(str(tmp_path), mode), timeout=60, grace=2)
    assert time.monotonic() - start < 30
    msg = str(info.value)
    assert 'worker rank 1' in msg and expect in msg, msg
    assert info.value.rank == 1
    assert _wait_gone(_read_pids(str(tmp_path)), 5) == []


def _w_ok(rank, world, out_dir):
    _write_pid(out_dir, rank)


def _w_sleep(rank, world, out_dir):
    _write_pid(out_dir, rank)
    time.sleep(120)


def test_spawn_success_and_timeout(tmp_path):
    launch.spawn(_w_ok, 2, args=(str(tmp_path),), timeout=60)
    assert len(_read_pids(str(tmp_path))) == 2
    with pytest.raises(launch.WorkerFailed, match='still running after the 2 s timeout'):
        launch.spawn(_w_sleep, 2, args=(str(tmp_path),), timeout=2, grace=1)
    assert _wait_gone(_read_pids(str(tmp_path)), 5) == []


def _w_preempted(rank, world, out_dir):
    """Rank 1 is preempted at once (a trainer that SIGTERM reached alone: its snapshot written,
    exit 143); the others are preempted when SIGTERM reaches them."""
    _write_pid(out_dir, rank)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if rank == 1:
        while len(_read_pids(out_dir)) < world:     # every worker ready for SIGTERM
            time.sleep(0.01)
        sys.exit(128 + signal.SIGTERM)
    time.sleep(120)


def test_a_worker_stopped_by_sigterm_stops_the_run_as_the_launchers_sigterm(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        launch.spawn(_w_preempted, 3, args=(str(tmp_path),), timeout=60, grace=10)
    assert info.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err.startswith('launcher: rank 1 stopped by SIGTERM, workers stopped (rank 0: exit '
                          'code 143, rank 1: exit code 143, rank 2: exit code 143)'), err
    assert _wait_gone(_read_pids(str(tmp_path)), 5) == []


def _w_finishing(rank, world, out_dir):
    """A worker at the end of its work when SIGTERM comes: it finishes and exits 0."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _write_pid(out_dir, rank)
    time.sleep(2)


def test_a_sigterm_after_the_work_is_done_is_no_failure(tmp_path):
    proc, pids = _start_launcher(str(tmp_path), 2, '_w_finishing')
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert _wait_gone(pids, 5) == []


def _start_launcher(out_dir, world, worker='_w_sleep'):
    code = ('from alexnet_lib import launch; import test_exchange; '
            f'launch.spawn(test_exchange.{worker}, {world:d}, args=({out_dir!r},))')
    # the workers import this module by name: its folder goes on their path
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(Path(__file__).parent)]))
    proc = subprocess.Popen([sys.executable, '-c', code], env=env)
    deadline = time.monotonic() + 60
    while len(_read_pids(out_dir)) < world:
        assert proc.poll() is None, f'the launcher exited early with {proc.returncode}'
        assert time.monotonic() < deadline, 'the workers did not start'
        time.sleep(0.05)
    return proc, _read_pids(out_dir)


@pytest.mark.parametrize('how', ['SIGKILL', 'SIGTERM'])
def test_workers_end_with_their_launcher(tmp_path, how):
    proc, pids = _start_launcher(str(tmp_path), 2)
    try:
        if how == 'SIGKILL':
            proc.kill()
            proc.wait(10)
        else:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 128 + signal.SIGTERM
        assert _wait_gone(pids, 10) == [], f'workers outlived their launcher ({how})'
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        _kill_all(pids)


# ----------------------------------------------------------------------------------------------
# GPU: p2p and nccl between two GPUs

def _w_gpu_timing(rank, world, kind, port, n):
    import torch
    from alexnet_lib import exchange
    device = torch.device('cuda', rank)
    ex = exchange.make_exchanger(kind, rank, world, device, port=port, timeout=TIMEOUT)
    try:
        buf = torch.full((n,), float(rank), device=device)
        ex.average_(buf)
        for _ in range(3):
            ex.average_(buf)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        reps = 20
        for _ in range(reps):
            ex.average_(buf)
        torch.cuda.synchronize(device)
        ms = (time.perf_counter() - start) / reps * 1e3
        assert torch.all(buf == 0.5).item()
        if rank == 0:
            print(f'{ex.kind} exchange of {n * 4 / 1e6:.0f} MB between cuda:0 and cuda:1: '
                  f'{ms:.2f} ms per average_', flush=True)
    finally:
        ex.close()


def _expected_p2p():
    import torch
    return 'p2p' if torch.cuda.can_device_access_peer(0, 1) else 'host'


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.skipif('not __import__("torch").cuda.device_count() >= 2',
                    reason='needs two CUDA GPUs')
def test_p2p_average_on_two_gpus():
    expect = _expected_p2p()
    launch.spawn(_w_average, 2, args=(('p2p', 'gloo', 'host'), 'cuda', (expect, 'gloo', 'host'),
                                      launch.free_port()), timeout=300)
    launch.spawn(_w_gpu_timing, 2, args=('p2p', launch.free_port(), 122_000_000), timeout=300)


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.skipif('not __import__("torch").cuda.device_count() >= 2',
                    reason='needs two CUDA GPUs')
def test_nccl_average_on_two_gpus():
    launch.spawn(_w_average, 2, args=(('nccl',), 'cuda', ('nccl',), launch.free_port()),
                 timeout=300)
    launch.spawn(_w_gpu_timing, 2, args=('nccl', launch.free_port(), 122_000_000), timeout=300)
