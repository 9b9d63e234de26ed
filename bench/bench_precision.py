"""Does bf16 train as well as fp32? The toy run, several seeds per precision, compared.

    python bench/bench_precision.py                     # spec_toy.yaml, seeds 1-4, bf16 vs fp32
    python bench/bench_precision.py --seeds 1,2,3 --parallel 3      # three runs at a time
    python bench/bench_precision.py --precisions bf16,tf32 n_epochs=3   # any key=value

Each (precision, seed) is an ordinary `train.py` run in its own weights_dir under --out; the
seed moves every random draw of training (crops, mirrors, dropout masks, file order), while the
initial weights stay the original's. The final validation top-1 error of each run is read from
its metrics.csv. The table gives, per precision, the mean and standard deviation over seeds; the
difference of two means is within noise when it is at most twice its standard error,
sqrt(s_a^2/n_a + s_b^2/n_b). Every figure goes to --out/precision.json.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # train.py's folder


def final_row(weights_dir):
    with open(os.path.join(weights_dir, 'metrics.csv'), newline='') as f:
        return list(csv.DictReader(f))[-1]


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument('--spec', default='spec_toy.yaml')
    ap.add_argument('--precisions', default='bf16,fp32')
    ap.add_argument('--seeds', default='1,2,3,4')
    ap.add_argument('--parallel', type=int, default=4, help='runs at a time')
    ap.add_argument('--out', default='bench_out/precision')
    ap.add_argument('--timeout', type=float, default=3600, help='seconds per run')
    a, overrides = ap.parse_known_args(argv)
    precisions = a.precisions.split(',')
    seeds = [int(s) for s in a.seeds.split(',')]
    jobs = [(p, s) for p in precisions for s in seeds]
    os.makedirs(a.out, exist_ok=True)
    running, results, failed = [], {}, []
    t0 = time.time()

    def finish(job, proc, log, started):
        try:
            proc.wait(timeout=max(1.0, a.timeout - (time.time() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        wd = os.path.join(a.out, f'{job[0]}_seed{job[1]}')
        if proc.returncode != 0:
            failed.append(f"{job}: exit {proc.returncode}, see {wd}.log")
            return
        row = final_row(wd)
        results[job] = {'val_top1_error': float(row['val_top1_error']),
                        'val_top5_error': float(row['val_top5_error']),
                        'val_loss': float(row['val_loss']), 'epochs': int(row['epoch'])}
        print(f"{job[0]} seed {job[1]}: {results[job]}", flush=True)

    for job in jobs:
        if len(running) >= a.parallel:
            finish(*running.pop(0))
        p, s = job
        wd = os.path.join(a.out, f'{p}_seed{s}')
        log = open(wd + '.log', 'w')
        cmd = [sys.executable, os.path.join(ROOT, 'train.py'), a.spec, *overrides,
               f'precision={p}', f'seed={s}', f'weights_dir={os.path.abspath(wd)}']
        running.append((job, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                              cwd=ROOT), log, time.time()))
    for r in running:
        finish(*r)
    if failed:
        print("failed runs:\n  " + "\n  ".join(failed), file=sys.stderr)
        raise SystemExit(1)
    summary = {}
    for p in precisions:
        errs = [results[(p, s)]['val_top1_error'] for s in seeds]
        summary[p] = {'mean': statistics.mean(errs),
                      'std': statistics.stdev(errs) if len(errs) > 1 else float('nan'),
                      'n': len(errs), 'errors': errs}
    out = {'date': time.strftime('%Y-%m-%d'), 'argv': argv, 'wall_s': time.time() - t0,
           'runs': {f'{p}_seed{s}': r for (p, s), r in results.items()}, 'summary': summary}
    print(f"\nvalidation top-1 error after the last epoch, {len(seeds)} seeds each "
          f"({time.time() - t0:.0f} s)")
    for p, r in summary.items():
        print(f"  {p:5s} mean {r['mean']:.4f}  std {r['std']:.4f}  "
              f"runs {' '.join(f'{e:.4f}' for e in r['errors'])}")
    if len(precisions) == 2 and len(seeds) > 1:
        x, y = (summary[p] for p in precisions)
        diff = x['mean'] - y['mean']
        se = (x['std'] ** 2 / x['n'] + y['std'] ** 2 / y['n']) ** 0.5
        out['difference'] = {'mean': diff, 'standard_error': se,
                             'within_noise': abs(diff) <= 2 * se}
        print(f"  {precisions[0]} - {precisions[1]}: {diff:+.4f} (standard error {se:.4f}): "
              f"{'within' if abs(diff) <= 2 * se else 'NOT within'} noise (|diff| <= 2 SE)")
    with open(os.path.join(a.out, 'precision.json'), 'w') as f:
        json.dump(out, f, indent=1)
    print(f"wrote {os.path.join(a.out, 'precision.json')}")
    return out


if __name__ == '__main__':
    main(sys.argv[1:])
