"""Plot a run's validation top-1/top-5 error and losses per epoch to a PNG.

    python plot.py models                 # writes models/plot.png
    python plot.py models -o curves.png

Reads WEIGHTS_DIR/metrics.csv (written by train.py every epoch); a run of the original code,
which has only val_record.npy ([val_error, val_loss] per epoch), is plotted from that. A run
that has not finished its first epoch has nothing to plot: one line says so (exit status 1).
"""
import argparse
import csv
import os
import sys

import numpy as np


class NoCurves(Exception):
    """The folder has no curves to plot; the message says why and what to do."""


def read_curves(weights_dir):
    """{column: list of floats} per epoch, from metrics.csv or else val_record.npy. Raises
    NoCurves when neither holds an epoch."""
    if not os.path.isdir(weights_dir):
        raise NoCurves(f"folder {weights_dir} does not exist: give the weights_dir of a run")
    path = os.path.join(weights_dir, 'metrics.csv')
    rec_path = os.path.join(weights_dir, 'val_record.npy')
    if os.path.exists(path):
        curves = _read_metrics(path)
        if curves:
            return curves
    if os.path.exists(rec_path):
        try:
            rec = np.load(rec_path, allow_pickle=False).reshape(-1, 2)
        except (OSError, ValueError, EOFError) as e:
            raise NoCurves(f"cannot read {rec_path}: {e}") from None
        if len(rec):
            return {'epoch': list(range(1, len(rec) + 1)), 'val_top1_error': rec[:, 0].tolist(),
                    'val_loss': rec[:, 1].tolist()}
    if os.path.exists(path):
        raise NoCurves(f"{path} holds no epoch yet (train.py writes a row after each epoch): "
                       "plot again once the run has finished its first epoch")
    if os.path.exists(rec_path):
        raise NoCurves(f"{rec_path} holds no epoch yet: plot again once the run has finished "
                       "its first epoch")
    raise NoCurves(f"{weights_dir} has neither metrics.csv nor val_record.npy: is it a "
                   "weights_dir of a run that finished an epoch?")


def _read_metrics(path):
    """metrics.csv's columns as lists of floats (an empty cell, a value not measured: NaN, which
    the plot leaves out); {} when it has no row."""
    try:
        with open(path, newline='') as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise NoCurves(f"cannot read {path}: {e}") from None
    if not rows:
        return {}
    if 'epoch' not in reader.fieldnames:
        raise NoCurves(f"{path} has no 'epoch' column (its header: "
                       f"{','.join(reader.fieldnames)}): is it train.py's metrics.csv?")
    curves = {k: [] for k in reader.fieldnames}
    for line, row in enumerate(rows, 2):
        for k in reader.fieldnames:
            try:
                curves[k].append(float(row[k]) if row[k] not in ('', None) else np.nan)
            except (TypeError, ValueError):
                raise NoCurves(f"{path}, line {line}: {k} is {row[k]!r}, not a number "
                               "(a damaged file: remove that line)") from None
    return curves


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
    out = a.output or os.path.join(a.weights_dir, 'plot.png')
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    if os.path.splitext(out)[1][1:].lower() not in formats:
        print(f"error: cannot write a plot to {out}: name a file ending in one of "
              f"{', '.join('.' + f for f in sorted(formats))} (.png for a picture)",
              file=sys.stderr)
        raise SystemExit(1)
    try:
        out = plot(a.weights_dir, out)
    except NoCurves as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as e:
        print(f"error: cannot write {e.filename or 'the plot'}: {e.strerror or e}",
              file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {out}")


if __name__ == '__main__':
    main(sys.argv[1:])
