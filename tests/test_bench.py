"""bench.py's small CPU run (the GPU figures are in BENCHMARKS.md)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow   # real training runs: the full suite, not the fast tier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_cpu_prints_table_1_and_writes_every_figure(small_dataset, tmp_path):
    """With the data named in a yaml file of the user's, as train.py takes it."""
    out = tmp_path / 'bench.json'
    mine = tmp_path / 'mine.yaml'
    mine.write_text(''.join(f"{kv.replace('=', ': ', 1)}\n" for kv in small_dataset))
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py'), '--cpu', '--iters', '2',
                        '--warmup', '1', '--out', str(out), str(mine)],
                       cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert 'batch files of spec_toy.yaml' not in r.stderr     # the yaml's data, not the toy's
    res = json.loads(out.read_text())
    assert res['machine'].startswith('CPU (small')
    rows = res['rows']
    for name in ('1 CPU process, parallel loading', '1 CPU process, serial loading',
                 '2 CPU processes, parallel loading', '2 CPU processes, serial loading',
                 'model step alone (data on the device)',
                 'peer: this network in plain PyTorch'):
        assert rows[name]['s_per_20_iter'] > 0 and rows[name]['images_per_s'] > 0, name
    table = r.stdout[r.stdout.index('s/20 iter') - 50:]
    assert 'CPU (small' in r.stdout and '1 CPU process, parallel loading' in table


def test_bench_precision_compares_seeds_of_two_precisions(small_dataset, tmp_path):
    """bench_precision.py: two precisions x two seeds, real train.py runs (on the CPU, fp32 and
    tf32 compute the same); every run's final error lands in the JSON and the summary."""
    out = tmp_path / 'prec'
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'bench_precision.py'),
                        '--spec', 'spec_1gpu.yaml', '--precisions', 'fp32,tf32', '--seeds', '1,2',
                        '--parallel', '2', '--out', str(out), *small_dataset, 'gpu=cpu',
                        'batch_size=8', 'n_epochs=1', 'para_load=False'],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((out / 'precision.json').read_text())
    assert sorted(res['runs']) == ['fp32_seed1', 'fp32_seed2', 'tf32_seed1', 'tf32_seed2']
    for p in ('fp32', 'tf32'):
        errs = [res['runs'][f'{p}_seed{s}']['val_top1_error'] for s in (1, 2)]
        assert res['summary'][p]['errors'] == errs and all(0 <= e <= 1 for e in errs)
    # on the CPU tf32 is fp32: the same seed gives the same error
    assert res['summary']['fp32']['errors'] == res['summary']['tf32']['errors']
    assert res['difference']['mean'] == 0 and res['difference']['within_noise']
    assert 'within noise' in r.stdout and 'NOT within' not in r.stdout
