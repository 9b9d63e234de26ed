"""Small cases users met: classify.py given a folder of images, plot.py on a run that has not
finished an epoch. Each bad input ends in one line on stderr and an exit status, no traceback."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import classify
import plot
from conftest import call_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_line(rc, out, lines, status=1):
    assert rc == status, (rc, out[-2000:], lines)
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    return lines[0]


def _image_bytes(fmt, color, size=(40, 30)):
    buf = io.BytesIO()
    Image.new('RGB', size, color).save(buf, fmt)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# plot.py

def test_plot_of_a_run_with_only_the_header_says_no_epoch_yet(tmp_path, capsys):
    (tmp_path / 'metrics.csv').write_text('epoch,train_loss,val_loss,val_top1_error,'
                                          'val_top5_error\n')
    line = _one_line(*call_main(plot.main, [str(tmp_path)], capsys))
    assert str(tmp_path / 'metrics.csv') in line and 'no epoch yet' in line, line
    assert 'neither' not in line, line
    assert not (tmp_path / 'plot.png').exists()


def test_plot_of_an_empty_metrics_file_says_no_epoch_yet(tmp_path, capsys):
    (tmp_path / 'metrics.csv').write_text('')
    line = _one_line(*call_main(plot.main, [str(tmp_path)], capsys))
    assert 'metrics.csv' in line and 'no epoch yet' in line, line


def test_plot_of_a_folder_that_does_not_exist_names_it(tmp_path, capsys):
    line = _one_line(*call_main(plot.main, [str(tmp_path / 'nowhere')], capsys))
    assert str(tmp_path / 'nowhere') in line and 'does not exist' in line, line


def test_plot_of_a_damaged_row_names_the_file_and_line(tmp_path, capsys):
    (tmp_path / 'metrics.csv').write_text('epoch,val_loss,val_top1_error\n1,2.5,0.9\n2,#,0.8\n')
    line = _one_line(*call_main(plot.main, [str(tmp_path)], capsys))
    assert 'metrics.csv' in line and 'line 3' in line and "'#'" in line, line


def test_plot_of_one_epoch_writes_the_png(tmp_path, capsys):
    (tmp_path / 'metrics.csv').write_text('epoch,train_loss,val_loss,val_top1_error,'
                                          'val_top5_error\n1,6.9,6.8,0.99,0.95\n2,,6.7,0.98,\n')
    rc, out, lines = call_main(plot.main, [str(tmp_path)], capsys)
    assert rc == 0 and not lines, lines
    assert (tmp_path / 'plot.png').stat().st_size > 0


# ----------------------------------------------------------------------------------------------
# classify.py: the images of a folder

def test_a_folder_gives_its_images_sorted(tmp_path):
    d = tmp_path / 'photos'
    d.mkdir()
    (d / 'b.png').write_bytes(_image_bytes('PNG', 'red'))
    (d / 'a.JPG').write_bytes(_image_bytes('JPEG', 'blue'))
    (d / 'c.jpeg').write_bytes(_image_bytes('JPEG', 'green'))
    (d / 'notes.txt').write_text('not an image')
    (d / '.hidden.jpg').write_bytes(_image_bytes('JPEG', 'green'))
    (d / 'sub').mkdir()
    (d / 'sub' / 'deeper.jpg').write_bytes(_image_bytes('JPEG', 'green'))
    single = tmp_path / 'single.png'
    single.write_bytes(_image_bytes('PNG', 'white'))
    files, notes = classify.image_files([str(single), str(d)])
    assert files == [str(single)] + [str(d / n) for n in ('a.JPG', 'b.png', 'c.jpeg')]
    assert len(notes) == 1 and 'notes.txt' in notes[0] and 'sub' in notes[0], notes


@pytest.mark.parametrize('content', [None, 'notes.txt'])
def test_a_folder_without_images_is_one_line(tmp_path, content, capsys):
    d = tmp_path / 'empty'
    d.mkdir()
    if content:
        (d / content).write_text('not an image')
    line = _one_line(*call_main(classify.main, [str(d), 'gpu=cpu'], capsys))
    assert str(d) in line and 'holds no image' in line, line
    assert 'not found' not in line, line


@pytest.fixture(scope='module')
def snapshot(tmp_path_factory):
    """A snapshot 1 (untrained parameters) and a mean image."""
    from alex_net import AlexNet
    from alexnet_lib.snapshot import save_snapshot
    d = tmp_path_factory.mktemp('snap')
    save_snapshot(str(d), 1, AlexNet('cpu'), 0.01)
    mean = d / 'img_mean.npy'
    np.save(mean, np.full((3, 256, 256), 120.0, np.float32))
    return ['gpu=cpu', f'weights_dir={d}', 'load_epoch=1', f'mean_file={mean}',
            'precision=fp32', 'batch_size=2']


@pytest.mark.slow
def test_classify_a_folder_of_images(tmp_path, snapshot):
    import json
    d = tmp_path / 'photos'
    d.mkdir()
    for name, fmt, color in (('b.png', 'PNG', 'red'), ('a.jpg', 'JPEG', 'blue'),
                             ('c.JPEG', 'JPEG', 'green')):
        (d / name).write_bytes(_image_bytes(fmt, color))
    (d / 'readme.txt').write_text('not an image')
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'classify.py'), str(d), *snapshot],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert [x['image'] for x in result['results']] == [
        str(d / n) for n in ('a.jpg', 'b.png', 'c.JPEG')]
    assert all(len(x['top5']) == 5 for x in result['results'])
    assert f'{d}: 3 images' in r.stdout and 'readme.txt' in r.stdout, r.stdout
