"""bench.py's small CPU run (the GPU figures are in BENCHMARKS.md)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_cpu_prints_table_1_and_writes_every_figure(small_dataset, tmp_path):
    out = tmp_path / 'bench.json'
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py'), '--cpu', '--iters', '2',
                        '--warmup', '1', '--out', str(out), *small_dataset],
                       cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res['machine'].startswith('CPU (small')
    rows = res['rows']
    for name in ('1 CPU process, parallel loading', '1 CPU process, serial loading',
                 '2 CPU processes, parallel loading', '2 CPU processes, serial loading',
                 'model step alone (data on the device)',
                 'peer: plain eager PyTorch of this network'):
        assert rows[name]['s_per_20_iter'] > 0 and rows[name]['images_per_s'] > 0, name
    table = r.stdout[r.stdout.index('s/20 iter') - 50:]
    assert 'CPU (small' in r.stdout and '1 CPU process, parallel loading' in table
