"""What a new user meets first: every script answers -h and --help, and the original's own
config.yaml and spec files are accepted, a missing folder in them reported as one line."""
import concurrent.futures
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_SCRIPTS = ['train.py', 'train_2gpu.py', 'validate.py', 'classify.py', 'bench.py']
SCRIPTS = CONFIG_SCRIPTS + [
    'plot.py', 'dual_mlp.py', 'proc_load.py', 'pretrained/import_params.py',
    'preprocessing/make_train_val_txt.py', 'preprocessing/make_hkl.py',
    'preprocessing/make_labels.py', 'preprocessing/make_toy_imagenet.py',
    'preprocessing/bench_preprocess.py', 'bench/bench_loader.py', 'bench/bench_precision.py',
    'bench/profile_step.py', 'bench/bench_update.py', 'bench/probe_loading.py',
    'bench/bench_convs.py',
    'quickstart.sh', 'run_tests.sh', 'setup.sh', 'preprocessing/generate_data.sh',
    'preprocessing/generate_toy_data.sh', 'bench/gpu_session.sh']


def run(script, *args, cwd=ROOT):
    cmd = ['bash'] if script.endswith('.sh') else [sys.executable]
    return subprocess.run(cmd + [os.path.join(ROOT, script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope='module')
def helps():
    """(script, flag) -> result, two at a time."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = {(s, f): pool.submit(run, s, f) for s in SCRIPTS for f in ('-h', '--help')}
        return {k: j.result() for k, j in jobs.items()}


@pytest.mark.slow
@pytest.mark.parametrize('script', SCRIPTS)
def test_every_script_answers_help(helps, script):
    for flag in ('-h', '--help'):
        r = helps[script, flag]
        assert r.returncode == 0, f"{script} {flag}: exit {r.returncode}\n{r.stderr[-2000:]}"
        assert len(r.stdout.splitlines()) >= 3, f"{script} {flag}: {r.stdout!r}"
        assert 'Traceback' not in r.stdout + r.stderr
    if script.endswith('.py'):
        # a command continued with a backslash shows on the lines the docstring has it on
        with open(os.path.join(ROOT, script), encoding='utf-8') as f:
            continued = [line.strip() for line in f.read().split('"""')[1].splitlines()
                         if line.endswith(' \\')]
        shown = [line.strip() for line in helps[script, '--help'].stdout.splitlines()]
        assert not [line for line in continued if line not in shown], script
    if script in CONFIG_SCRIPTS:
        # every key with its default and comment, from the yaml files
        out = helps[script, '--help'].stdout
        assert 'learning_rate = 0.01' in out, out[-3000:]
        line = next(x for x in out.splitlines() if x.strip().startswith('exchange = '))
        assert 'p2p' in line and 'nccl' in line, line
        assert 'batch_size = ' in out


def test_every_python_script_in_the_repository_is_checked():
    """A new script is not forgotten: every tracked .py file with a __main__ block outside
    tests/ is in SCRIPTS."""
    r = subprocess.run(['git', 'ls-files', '*.py'], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip('not a git checkout')
    found = []
    for rel in r.stdout.split():
        if rel.startswith('tests/') or not os.path.isfile(os.path.join(ROOT, rel)):
            continue
        with open(os.path.join(ROOT, rel), encoding='utf-8') as f:
            if "if __name__ == '__main__'" in f.read():
                found.append(rel)
    assert 'bench/profile_step.py' in found
    missing = sorted(set(found) - set(SCRIPTS))
    assert not missing, f"scripts not in SCRIPTS: {missing}"


@pytest.mark.slow
def test_profile_step_says_how_to_run_it(helps):
    out = helps['bench/profile_step.py', '--help'].stdout
    assert 'bench_results/profile_step.py' not in out, out
    assert 'python3 bench/profile_step.py' in out, out
    for word in ('base', 'eager', 'torchpool', 'DEV=cpu'):
        assert word in out, word


# the original's files (its keys and defaults; paths on its authors' /scratch)
ORIGINAL_CONFIG = """\
# training related configs
resume_train: False
load_epoch: 20
n_epochs: 60
learning_rate: 0.01
lr_policy: step  # auto or step
lr_adapt_threshold: 0.01
lr_step: [20, 40]
# data related configs
use_data_layer: False
rand_crop: True
shuffle: False
para_load: True
batch_crop_mirror: False
# momentum related configs
use_momentum: True
use_nesterov_momentum: False
momentum: 0.9
weight_decay: 0.0005
label_folder: /scratch/ilsvrc12/labels/
mean_file: /scratch/ilsvrc12/misc/img_mean.npy
weights_dir: ./models/
lib_conv: cudnn  # cudaconvnet or cudnn
snapshot_freq: 1
print_train_error: True
print_freq: 20
"""
ORIGINAL_SPEC_1GPU = """\
gpu: 'gpu0'
sock_data: 5001
batch_size: 256
train_folder: /scratch/ilsvrc12/train_hkl_b256_b_256/
val_folder: /scratch/ilsvrc12/val_hkl_b256_b_256/
"""
ORIGINAL_SPEC_2GPU = """\
gpu0: 'gpu0'
gpu1: 'gpu1'
sock_gpu: 5000
sock_data0: 5001
sock_data1: 5002
batch_size: 128
train_folder: /scratch/ilsvrc12/train_hkl_b256_b_128/
val_folder: /scratch/ilsvrc12/val_hkl_b256_b_128/
"""


@pytest.mark.slow
def test_the_originals_config_files_give_one_line_from_both_scripts(tmp_path):
    for name, text in (('config.yaml', ORIGINAL_CONFIG), ('spec_1gpu.yaml', ORIGINAL_SPEC_1GPU),
                       ('spec_2gpu.yaml', ORIGINAL_SPEC_2GPU)):
        (tmp_path / name).write_text(text)
    one = run('train.py', 'gpu=cpu', cwd=tmp_path)
    two = run('train_2gpu.py', cwd=tmp_path)
    for r, folder in ((one, '/scratch/ilsvrc12/val_hkl_b256_b_256'),
                      (two, '/scratch/ilsvrc12/val_hkl_b256_b_128')):
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
        assert len(lines) == 1 and lines[0].startswith('error: batch folder'), r.stderr
        assert folder in lines[0]
    # the half batches of the original's two GPUs: one set of full batches serves any number
    assert "'/scratch/ilsvrc12/val_hkl_b256_b_256'" in two.stderr and 'val_folder' in two.stderr
    assert 'any number of GPUs' in two.stderr
    # before any trainer started
    assert 'worker rank' not in two.stderr and 'trainers on' not in two.stdout
