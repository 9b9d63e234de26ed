"""Plot a run's validation top-1/top-5 error and losses per epoch to a PNG.

    python plot.py models                 # writes models/plot.png
    python plot.py models -o curves.png

Reads WEIGHTS_DIR/metrics.csv (written by train.py every epoch); a run of the original code,
which has only val_record.npy ([val_error, val_loss] per epoch), is plotted from that.
"""
import argparse
import csv
import os
import sys

import numpy as np


def read_curves(weights_dir):
    """{column: list of floats} per epoch, from metrics.csv or else val_record.npy."""
    path = os.path.join(weights_dir, 'metrics.csv')
    if os.path.exists(path):
        with open(path, newline='') as f:
            rows = list(csv.DictReader(f))
        if rows:
            return {k: [float(r[k]) for r in rows] for k in rows[0]}
    rec_path = os.path.join(weights_dir, 'val_record.npy')
    if os.path.exists(rec_path):
        rec = np.load(rec_path, allow_pickle=False).reshape(-1, 2)
        return {'epoch': list(range(1, len(rec) + 1)), 'val_top1_error': rec[:, 0].tolist(),
                'val_loss': rec[:, 1].tolist()}
    raise FileNotFoundError(f"{weights_dir} has neither metrics.csv nor val_record.npy: "
                            f"is it a weights_dir of a run that finished an epoch?")


def plot(weights_dir, out):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    c = read_curves(weights_dir)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (('val_top1_error', 'validation top-1 error'),
                       ('val_top5_error', 'validation top-5 error')):
        if key in c:
            ax1.plot(c['epoch'], c[key], marker='o', label=label)
    ax1.set(xlabel='epoch', ylabel='error', title='error', ylim=(0, 1))
    for key, label in (('val_loss', 'validation loss'), ('train_loss', 'training loss')):
        if key in c:
            ax2.plot(c['epoch'], c[key], marker='o', label=label)
    ax2.set(xlabel='epoch', ylabel='loss', title='loss')
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(os.path.abspath(weights_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument('weights_dir')
    ap.add_argument('-o', '--output', help='PNG to write (default WEIGHTS_DIR/plot.png)')
    a = ap.parse_args(argv)
    try:
        out = plot(a.weights_dir, a.output or os.path.join(a.weights_dir, 'plot.png'))
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    print(f"wrote {out}")


if __name__ == '__main__':
    main(sys.argv[1:])
