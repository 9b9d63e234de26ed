"""A researcher's own run (CPU, real train.py processes): the data folders must belong together,
weights_dir is checked before the first step and owned by one run, the start block says where
the run writes, and a run with few classes trains, validates and classifies."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from alexnet_lib.config import ConfigError, load_config
from alexnet_lib.provenance import make_record, write_record
from conftest import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['gpu=cpu', 'batch_size=8', 'para_load=False', 'n_epochs=1', 'print_freq=1']


def script(name, *args, timeout=300, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def opts(data):
    return dict(a.split('=', 1) for a in data)


def last_line(r):
    return r.stderr.strip().splitlines()[-1]


def recorded_dataset(root, train_order='a', seed=0):
    """make_dataset's folders with the record preprocessing writes into each of them."""
    data = make_dataset(root, n_train_files=1, file_rows=8, val_sizes=(5,), seed=seed)
    o = opts(data)
    record = make_record([f'{train_order}{i}.JPEG' for i in range(8)], 1,
                         [f'val{i}.JPEG' for i in range(5)], 1, batch_size=8)
    for key in ('train_folder', 'val_folder', 'label_folder'):
        write_record(o[key], record)
    write_record(os.path.dirname(o['mean_file']), record)
    return data


@pytest.fixture(scope='module')
def two_outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp('outputs')
    return (recorded_dataset(str(root / 'one'), 'a', 0),
            recorded_dataset(str(root / 'two'), 'b', 1))


# -- the data belongs together -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('key', ['label_folder', 'mean_file', 'val_folder'])
def test_data_of_another_preprocessing_output_is_refused_before_a_step(two_outputs, tmp_path,
                                                                       key):
    one, two = two_outputs
    mixed = dict(opts(one), **{key: opts(two)[key]})
    t0 = time.time()
    r = script('train.py', *[f'{k}={v}' for k, v in mixed.items()], *FAST,
               f'weights_dir={tmp_path}/w')
    assert r.returncode == 2, r.stderr
    line = last_line(r)
    assert line.startswith(f"config error: {key} comes from another preprocessing output"), line
    assert 'Traceback' not in r.stderr and 'iter ' not in r.stdout
    assert time.time() - t0 < 30
    assert not os.path.exists(tmp_path / 'w')       # nothing written before the data is good


def test_a_mean_from_elsewhere_goes_with_any_output_and_a_wrong_path_is_named(two_outputs,
                                                                            tmp_path):
    """The original's released mean image, in a folder without a record, serves any
    preprocessing output; a path to nothing is named as missing, not as another output's."""
    from alexnet_lib.data import RunData
    from alexnet_lib.errors import UserError
    one, _ = two_outputs
    released = tmp_path / 'weights'
    released.mkdir()
    shutil.copy(opts(one)['mean_file'], released / 'img_mean.npy')
    cfg = load_config('spec_1gpu.yaml', one + FAST + [f'mean_file={released}/img_mean.npy'])
    assert RunData(cfg).record is not None
    root = os.path.dirname(opts(one)['label_folder'])
    for key, typo, says in [
            ('mean_file', 'mics/img_mean.npy', "mean file '{}' not found"),
            ('val_folder', 'val_hkl', "batch folder '{}' does not exist"),
            ('label_folder', 'lables', "label file '{}/val_labels.npy' not found")]:
        wrong = os.path.join(root, typo)
        cfg = load_config('spec_1gpu.yaml', one + FAST + [f'{key}={wrong}'])
        with pytest.raises(UserError) as e:   # one line, no traceback
            RunData(cfg, for_training=False)
        assert str(e.value).startswith(says.format(wrong)), (key, str(e.value))


@pytest.fixture(scope='module')
def run_on_one(two_outputs, tmp_path_factory):
    """A run of one epoch on the first output: (weights_dir, train.py's result)."""
    one, _ = two_outputs
    wd = tmp_path_factory.mktemp('run_on_one')
    return wd, script('train.py', *one, *FAST, f'weights_dir={wd}')


@pytest.mark.slow
def test_a_run_on_one_output_says_so_and_data_without_a_record_is_a_notice(run_on_one,
                                                                           small_dataset,
                                                                           tmp_path):
    wd, r = run_on_one
    assert r.returncode == 0, r.stderr
    assert 'one preprocessing output: 8 training, 5 validation images' in r.stdout
    assert json.loads((wd / 'trained_on.json').read_text())['train_images'] == 8
    # no snapshot needed here: the block is printed before the first step
    r = script('train.py', *small_dataset, *FAST, 'snapshot_freq=5', f'weights_dir={tmp_path}')
    assert r.returncode == 0, r.stderr
    assert 'notice: these data folders carry no preprocessing record' in r.stdout


@pytest.mark.slow
def test_validation_refuses_data_other_than_the_runs(two_outputs, run_on_one):
    _, two = two_outputs
    wd, _ = run_on_one
    r = script('validate.py', *two, 'gpu=cpu', 'batch_size=8', f'weights_dir={wd}',
               'load_epoch=1')
    assert r.returncode == 2 and 'trained on another preprocessing output' in last_line(r)


@pytest.mark.slow
def test_label_files_longer_than_the_rule_allows_are_refused(tmp_path):
    """60 validation images in one partial file: nothing was dropped, so no extra label."""
    data = make_dataset(str(tmp_path / 'd'), n_train_files=1, file_rows=8, val_sizes=(60,))
    labels = opts(data)['label_folder']
    np.save(os.path.join(labels, 'val_labels.npy'), np.arange(70) % 10)
    r = script('validate.py', *data, 'gpu=cpu', f'weights_dir={tmp_path}/w', 'load_epoch=1')
    assert r.returncode == 1
    assert 'has 70 labels, but the validation batch files hold 60 images' in last_line(r)


def test_unset_data_keys_are_named():
    with pytest.raises(ConfigError, match='train_folder, val_folder, label_folder, mean_file '
                                          'not set'):
        from alexnet_lib.data import RunData
        RunData(load_config('spec_1gpu.yaml', ['gpu=cpu']))


# -- weights_dir -------------------------------------------------------------------------------

@pytest.mark.slow
def test_weights_dir_that_is_a_file_is_one_line_at_once(small_dataset, tmp_path):
    f = tmp_path / 'afile'
    f.write_text('x')
    t0 = time.time()
    r = script('train.py', *small_dataset, *FAST, f'weights_dir={f}')
    assert time.time() - t0 < 10 + 5            # start-up of Python and torch included
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert last_line(r) == (f"error: weights_dir {f} cannot be written: it is a file, not a "
                            f"folder; choose another weights_dir")


@pytest.mark.slow
def test_weights_dir_on_a_read_only_mount_is_one_line_at_once(small_dataset, tmp_path):
    ro = tmp_path / 'ro'
    ro.mkdir()
    inner = (f"mount -t tmpfs -o ro none {ro} && exec {sys.executable} "
             f"{os.path.join(ROOT, 'train.py')} {' '.join(small_dataset + FAST)} "
             f"weights_dir={ro}/w")
    probe = subprocess.run(['unshare', '-rm', 'sh', '-c', f'mount -t tmpfs -o ro none {ro}'],
                           capture_output=True)
    if probe.returncode:
        pytest.skip(f"no user namespaces here to mount a read-only file system: "
                    f"{probe.stderr.decode().strip()}")
    t0 = time.time()
    r = subprocess.run(['unshare', '-rm', 'sh', '-c', inner], capture_output=True, text=True,
                       timeout=120)
    assert time.time() - t0 < 15
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert last_line(r) == (f"error: weights_dir {ro}/w cannot be written: Read-only file "
                            f"system; choose another weights_dir")


def complete_snapshot(wd, epoch, n_classes=1000):
    from alex_net import AlexNet
    from alexnet_lib.snapshot import save_array, save_snapshot
    save_snapshot(str(wd), epoch, AlexNet('cpu', n_classes=n_classes), 0.01)
    save_array(os.path.join(wd, 'val_record.npy'), np.full((epoch, 2), 0.5, np.float32))


@pytest.mark.slow
def test_a_folder_of_another_run_is_refused_and_overwrite_replaces_it(small_dataset, tmp_path):
    complete_snapshot(tmp_path, 1)
    (tmp_path / 'metrics.csv').write_text('epoch\n1\n')
    r = script('train.py', *small_dataset, *FAST, f'weights_dir={tmp_path}')
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert last_line(r) == (
        f"error: weights_dir {tmp_path} already holds another run (snapshot 1): resume it "
        f"(resume_train=True load_epoch=1, or resume_train=auto), write to another "
        f"weights_dir, or replace it with overwrite=True")
    before = np.load(tmp_path / 'W_0_1.npy')
    r = script('train.py', *small_dataset, *FAST, f'weights_dir={tmp_path}', 'overwrite=True')
    assert r.returncode == 0, r.stderr
    assert 'replacing the' in r.stdout
    assert not np.array_equal(np.load(tmp_path / 'W_0_1.npy'), before)   # the new run's
    assert (tmp_path / 'metrics.csv').read_text().count('\n') == 2     # header + its epoch


@pytest.mark.slow
def test_resume_auto_resumes_the_latest_snapshot_or_starts_afresh(small_dataset, tmp_path):
    r = script('train.py', *small_dataset, *FAST, f'weights_dir={tmp_path}',
               'resume_train=auto')
    assert r.returncode == 0, r.stderr
    assert 'a new run (resume_train: auto found no snapshot)' in r.stdout
    r = script('train.py', *small_dataset, *FAST, f'weights_dir={tmp_path}',
               'resume_train=auto', 'n_epochs=2')
    assert r.returncode == 0, r.stderr
    assert 'resuming from snapshot 1' in r.stdout and 'epoch 2:' in r.stdout
    assert 'epoch 1:' not in r.stdout
    r = script('train.py', *small_dataset, *FAST, f'weights_dir={tmp_path}',
               'resume_train=auto', 'n_epochs=2')
    assert r.returncode == 0 and 'epoch ' not in r.stdout
    assert r.stdout.strip().splitlines()[-1] == (
        f"nothing to train: snapshot 2 in {tmp_path} already ends this run (n_epochs: 2); to "
        f"train more, raise n_epochs (n_epochs=12 resume_train=True load_epoch=2)")


@pytest.mark.slow
def _take_lock(barrier, folders, wins):
    from alexnet_lib.run_folder import Lock, RunFolderError
    for folder in folders:
        barrier.wait()
        try:
            Lock(folder).acquire()      # held until the process ends
            wins.put(folder)
        except RunFolderError:
            pass
        barrier.wait()


def test_of_two_runs_started_at_once_one_takes_the_folder(tmp_path):
    """Two processes take the lock of the same new folders at the same instant, 100 times:
    one of them gets each folder (a lock file is never seen empty, as a dead run's)."""
    import multiprocessing as mp
    ctx = mp.get_context('fork')
    folders = [str(tmp_path / f'run{i}') for i in range(100)]
    for folder in folders:
        os.makedirs(folder)
    barrier, wins = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_take_lock, args=(barrier, folders, wins)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    won = [wins.get(timeout=10) for _ in range(wins.qsize())]
    assert sorted(won) == sorted(folders)      # each folder once, none twice, none without


def test_a_second_run_into_a_live_runs_folder_is_refused(small_dataset, tmp_path):
    wd = tmp_path / 'w'
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *small_dataset,
                              *FAST, 'n_epochs=50', f'weights_dir={wd}'], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:
            if line.startswith('training on'):
                break
        r = script('train.py', *small_dataset, *FAST, f'weights_dir={wd}', 'overwrite=True')
        assert r.returncode == 1
        assert last_line(r) == (f"error: weights_dir {wd} is in use by a live run (pid "
                                f"{first.pid} on {os.uname().nodename}); wait for it to end "
                                f"or choose another weights_dir")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the dead run's lock is taken over
    r = script('train.py', *small_dataset, *FAST, f'weights_dir={wd}')
    assert r.returncode == 0, r.stderr
    assert not (wd / '.run.lock').exists()


@pytest.mark.slow
def test_the_start_block_says_what_was_merged_and_where_the_run_writes(small_dataset,
                                                                       tmp_path):
    here = tmp_path / 'project'
    here.mkdir()
    (here / 'config.yaml').write_text('momentum: 0.8\n')      # another project's config.yaml
    (here / 'mine.yaml').write_text('weights_dir: runs/first\nkeep_snapshots: 3\n')
    # the block comes before the first step: stop the run after it
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), 'mine.yaml',
                          *small_dataset, *FAST, 'n_epochs=10', 'snapshot_freq=2'],
                         cwd=str(here), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    lines = []
    try:
        for line in p.stdout:
            if line.startswith('training on'):
                break
            lines.append(line.rstrip('\n'))
    finally:
        p.kill()
        p.wait()
    block = '\n'.join(lines)
    assert lines[0] == (f"config: {ROOT}/config.yaml (the defaults); {ROOT}/spec_1gpu.yaml (the "
                        f"defaults); {here}/config.yaml (found in the current folder); "
                        f"{here}/mine.yaml (named); the command line (key=value)"), block
    assert (f"weights_dir: {here}/runs/first (set in {here}/mine.yaml, relative to its folder): "
            f"a new run") in block
    assert "a snapshot takes 465 MiB; this run keeps up to 4 (1.8 GiB; keep_snapshots: 3" in block


@pytest.mark.slow
def test_a_config_yaml_in_the_current_folder_is_merged_over_the_repositorys_files(
        small_dataset, tmp_path, monkeypatch):
    """Its data keys, batch_size and gpu (keys of the repository's spec file too) are the run's;
    a yaml file named by a path with '=' in it (a sweep's folder) is a yaml file."""
    lines = [kv.replace('=', ': ', 1) for kv in small_dataset]
    (tmp_path / 'config.yaml').write_text('\n'.join(lines + ['batch_size: 4', 'gpu: cpu']))
    sweep = tmp_path / 'lr=0.001'
    sweep.mkdir()
    (sweep / 'run.yaml').write_text('learning_rate: 0.001\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config('spec_1gpu.yaml', ['lr=0.001/run.yaml'])
    assert cfg['batch_size'] == 4 and cfg['gpu'] == 'cpu' and cfg['learning_rate'] == 0.001
    assert [cfg[k] for k in ('train_folder', 'val_folder', 'label_folder', 'mean_file')] == \
        [v for _, v in (kv.split('=', 1) for kv in small_dataset)]


def test_another_projects_config_yaml_is_named_with_where_it_was_found(tmp_path):
    (tmp_path / 'config.yaml').write_text('learning_rat: 0.1\n')
    r = script('train.py', cwd=str(tmp_path), timeout=60)
    assert r.returncode == 2
    assert last_line(r) == (f"config error: unknown key 'learning_rat' in {tmp_path}/config.yaml "
                            f"(found in the current folder); did you mean 'learning_rate'?")


# -- one yaml, both scripts; smaller checks ----------------------------------------------------

@pytest.mark.slow
def test_one_yaml_drives_both_training_scripts(small_dataset, tmp_path, capsys):
    mine = tmp_path / 'mine.yaml'
    mine.write_text('gpu: cpu\nbatch_size: 4\n' + ''.join(f'{a.replace("=", ": ", 1)}\n'
                                                         for a in small_dataset))
    cfg = load_config('spec_2gpu.yaml', [str(mine), 'gpus=[cpu, cpu]', 'exchange=host'])
    assert cfg['gpus'] == ['cpu', 'cpu'] and 'gpu' not in cfg
    assert f"gpu (in {mine}) ignored: train_2gpu.py takes its devices from gpus" in \
        capsys.readouterr().err
    assert load_config('spec_2gpu.yaml', ['gpus=4'])['gpus'] == [f'cuda:{i}' for i in range(4)]
    assert load_config('spec_2gpu.yaml', ['gpus=gpu3'])['gpus'] == ['cuda:3']
    r = script('train_2gpu.py', str(mine), 'gpu0=cpu', 'gpu1=cpu', 'exchange=host',
               'n_epochs=1', 'para_load=False', f'weights_dir={tmp_path}/w', timeout=600)
    assert r.returncode == 0, r.stderr
    assert 'ignored: train_2gpu.py takes its devices from gpus' in r.stderr
    assert (tmp_path / 'w' / 'lr_1.npy').exists()


@pytest.mark.parametrize('word, says', [
    ('weight_decay=-1', 'weight_decay: -1.0 must be 0 or more'),
    ('lr_step=[-5]', 'lr_step: [-5] must hold epochs (1 or more)'),
    ('lr_step=1', 'lr_step: 1 is a number, not a list of epochs: write lr_step=[1]'),
    ('n_classes=1', 'n_classes: 1 must be at least 2'),
    ('keep_snapshots=0', 'keep_snapshots: 0 must be at least 1'),
    ('resume_train=maybe', "resume_train: 'maybe' is not True, False or auto"),
])
def test_values_that_make_no_sense_are_refused(word, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config('spec_1gpu.yaml', [word])


def test_keep_snapshots_keeps_the_last_and_the_best(tmp_path):
    """Every file of a snapshot, by name (small arrays stand for the 465 MiB of each)."""
    from alex_net import PARAMS
    from alexnet_lib.snapshot import (complete_snapshots, lr_file, mom_file, param_file,
                                      prune_snapshots, save_array)
    for e in range(1, 6):
        for k, p in enumerate(PARAMS):
            save_array(param_file(str(tmp_path), p.name, e), np.zeros(2, np.float32))
            save_array(mom_file(str(tmp_path), k, e), np.zeros(2, np.float32))
        save_array(lr_file(str(tmp_path), e), np.float32(0.01))
    save_array(os.path.join(tmp_path, 'val_record.npy'), np.full((5, 2), 0.5, np.float32))
    prune_snapshots(str(tmp_path), 2, [0.5, 0.2, 0.6, 0.7, 0.8])
    assert complete_snapshots(str(tmp_path)) == [2, 4, 5]
    assert sorted(os.listdir(tmp_path)) == sorted(
        f for f in os.listdir(tmp_path) if f.endswith(('_2.npy', '_4.npy', '_5.npy'))
        or f == 'val_record.npy')


# -- a 3-class run -----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_three_class_run_trains_validates_and_classifies(tmp_path):
    data = make_dataset(str(tmp_path / 'd'), n_train_files=1, file_rows=8, val_sizes=(6,))
    labels = opts(data)['label_folder']
    for name, n in (('train_labels.npy', 8), ('val_labels.npy', 6)):
        np.save(os.path.join(labels, name), np.arange(n) % 3)
    wd = tmp_path / 'w'
    r = script('train.py', *data, *FAST, 'n_classes=3', f'weights_dir={wd}')
    assert r.returncode == 0, r.stderr
    assert np.load(wd / 'W_7_1.npy').shape == (4096, 3) and 'top-5' not in r.stdout
    assert (wd / 'metrics.csv').read_text().splitlines()[1].split(',')[4] == ''
    r = script('validate.py', *data, 'gpu=cpu', 'n_classes=3', f'weights_dir={wd}',
               'load_epoch=1')
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res['top5_error'] is None and 'no top-5 error with 3 classes' in r.stdout
    image = tmp_path / 'x.png'
    from PIL import Image
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 50, 3)).astype(np.uint8)
                    ).save(image)
    r = script('classify.py', str(image), *data, 'gpu=cpu', 'n_classes=3', f'weights_dir={wd}',
               'load_epoch=1')
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    ranked = res['results'][0]['top5']
    assert sorted(t['label'] for t in ranked) == [0, 1, 2]
    r = script('validate.py', *data, 'gpu=cpu', f'weights_dir={wd}', 'load_epoch=1')
    assert r.returncode == 1
    assert 'has 3 classes' in last_line(r) and 'set n_classes=3' in last_line(r)
    shutil.rmtree(wd)
