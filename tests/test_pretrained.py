"""pretrained/import_params.py and classify.py on a zip in the released format (CPU).

    python -m pytest tests/test_pretrained.py -q

No network here: the 'release' is written by the tests from generated parameters, in the
format of parameters_releasing.zip (W_{i}_65.npy / b_{i}_65.npy, W0_/W1_/b0_/b1_ for the
two-group layers, original layouts, inside a folder), so its sha1 is not the release's and
imports need --skip-checksum.
"""
import csv
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import plot
import validate
from alex_net import PARAMS, AlexNet
from alexnet_lib import loop as train_loop
from alexnet_lib.batch_files import write_batch
from alexnet_lib.config import load_config
from alexnet_lib.data import mean_image_hwc
from alexnet_lib.images import load_image_256
from alexnet_lib.snapshot import load_snapshot, mom_file, param_file
from alexnet_lib.step import eval_batch
from conftest import make_dataset
from preproc_tree import write_meta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORT = os.path.join(ROOT, 'pretrained', 'import_params.py')
RUN_CONFIG = os.path.join(ROOT, 'pretrained', 'alexnet', 'config.yaml')
RELEASE_SHA1 = '58950804f50f8d1a76705e1b28d3546e12ea8a81'
FOLDER = 'parameters_releasing'
torch.set_num_threads(2)

_spec = importlib.util.spec_from_file_location('import_params', IMPORT)
import_params = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_params)


def generated_params(seed=0):
    """Parameters in the original layouts, scaled so that images give distinct, peaked
    softmax outputs (He-style weights, random biases)."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in PARAMS:
        if p.is_weight:
            fan_in = np.prod(p.original_shape[:-1])
            out[p.name] = rng.standard_normal(p.original_shape, np.float32) * np.float32(
                np.sqrt(2 / fan_in))
        else:
            out[p.name] = rng.standard_normal(p.original_shape, np.float32) * np.float32(0.1)
    return out


def npy_bytes(a):
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)  # lets a test write an object (pickled) array on purpose
    return buf.getvalue()


def write_zip(path, files, folder=FOLDER):
    """files: {file name: array}; members are FOLDER/name (or name when folder is '')."""
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
        if folder:
            zf.writestr(folder + '/', b'')
        for name, a in files.items():
            member = f'{folder}/{name}' if folder else name
            zf.writestr(member, a if isinstance(a, bytes) else npy_bytes(a))
    return str(path)


def release_files(params, epoch=65):
    return {f'{name}_{epoch}.npy': a for name, a in params.items()}


def run(script, *args, timeout=300):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def import_in_process(capsys, *args):
    """import_params.main in this process (no interpreter start-up): (exit status, stdout,
    stderr)."""
    try:
        import_params.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope='module')
def release(tmp_path_factory):
    """A zip like parameters_releasing.zip: parameters and the mean image inside a folder."""
    d = tmp_path_factory.mktemp('release')
    params = generated_params()
    mean = np.random.default_rng(1).uniform(90, 140, (3, 256, 256)).astype(np.float32)
    files = dict(release_files(params), **{'img_mean.npy': mean, 'readme.txt': b'release notes'})
    return write_zip(d / 'parameters_releasing.zip', files), params, mean


@pytest.fixture(scope='module')
def imported(release, tmp_path_factory):
    zip_path, params, mean = release
    wd = str(tmp_path_factory.mktemp('imported') / 'weights')
    r = run(IMPORT, zip_path, wd, '--skip-checksum')
    assert r.returncode == 0, r.stderr
    return wd, r.stdout


@pytest.mark.slow
def test_import_gives_snapshot_65(release, imported, capsys):
    _, params, mean = release
    wd, out = imported
    for p in PARAMS:  # the files, bit for bit
        assert np.array_equal(np.load(param_file(wd, p.name, 65), allow_pickle=False),
                              params[p.name])
    net = AlexNet(init=False)
    lr = load_snapshot(wd, 65, net)  # what validate.py and resume_train load
    assert all(np.array_equal(a, params[n]) for n, a in net.to_original().items())
    assert not net.momentum.any()
    assert lr == pytest.approx(1e-4) and np.load(os.path.join(wd, 'lr_65.npy')).dtype == np.float32
    assert np.array_equal(np.load(os.path.join(wd, 'img_mean.npy')), mean)
    rec = np.load(os.path.join(wd, 'val_record.npy'))
    assert rec.shape == (65, 2) and np.isnan(rec[:64]).all() and np.isnan(rec[64, 1])
    assert rec[64, 0] == pytest.approx(0.426)
    assert 'importing anyway' in out and 'wrote zeros' in out and 'wrote 0.0001' in out
    assert f"mean_file={os.path.join(wd, 'img_mean.npy')}" in out
    # importing again into the same folder is allowed (same files), a foreign folder is not
    assert import_in_process(capsys, release[0], wd, '--skip-checksum')[0] == 0


@pytest.mark.slow
def test_import_with_momentum_and_lr_at_top_level(tmp_path, capsys):
    params = generated_params(seed=2)
    files = release_files(params)
    mom = [params[p.name] * np.float32(0.5) for p in PARAMS]
    files.update({os.path.basename(mom_file('', k, 65)): m for k, m in enumerate(mom)})
    files['lr_65.npy'] = np.float32(0.00042)
    zip_path = write_zip(tmp_path / 'release.zip', files, folder='')
    wd = str(tmp_path / 'w')
    code, out, err = import_in_process(capsys, zip_path, wd, '--skip-checksum')
    assert code == 0, err
    assert 'momentum: from the zip' in out and 'mean image: not in the zip' in out
    net = AlexNet(init=False)
    assert load_snapshot(wd, 65, net) == pytest.approx(0.00042)
    assert all(np.array_equal(a, m) for a, m in zip(net.momentum_to_original(), mom))


@pytest.mark.slow
def test_wrong_checksum_is_refused(tmp_path):
    zip_path = write_zip(tmp_path / 'parameters_releasing.zip',
                         {'W_0_65.npy': np.zeros(3, np.float32)})
    actual = hashlib.sha1(open(zip_path, 'rb').read()).hexdigest()
    r = run(IMPORT, zip_path, str(tmp_path / 'w'))
    assert r.returncode == 1
    msg = r.stderr.strip()
    assert msg.startswith('error:') and len(msg.splitlines()) == 1 and 'Traceback' not in msg
    assert actual in msg and RELEASE_SHA1 in msg and '--skip-checksum' in msg
    assert not (tmp_path / 'w').exists()


def test_matching_checksum_passes_the_gate(tmp_path, capsys, monkeypatch):
    zip_path = write_zip(tmp_path / 'r.zip', {'W_0_65.npy': np.zeros(3, np.float32)})
    monkeypatch.setattr(import_params, 'RELEASE_SHA1',
                        hashlib.sha1(open(zip_path, 'rb').read()).hexdigest())
    code, out, err = import_in_process(capsys, zip_path, tmp_path / 'w')  # no --skip-checksum
    assert 'the release' in out and code == 1 and 'lacks 21 of the 22' in err


def test_missing_file_is_named(tmp_path, capsys):
    # placeholders: presence is checked before any file is read
    files = release_files({p.name: np.zeros(1, np.float32) for p in PARAMS})
    del files['W0_3_65.npy']
    code, _, err = import_in_process(capsys, write_zip(tmp_path / 'r.zip', files),
                                     tmp_path / 'w', '--skip-checksum')
    assert code == 1 and err.startswith('error:') and len(err.strip().splitlines()) == 1
    assert 'W0_3_65.npy' in err and 'lacks 1 of the 22' in err
    assert 'W1_3_65.npy' not in err
    assert not (tmp_path / 'w').exists()


def test_misshaped_wrong_dtype_and_pickled_files_are_named(release, tmp_path, capsys):
    params = dict(release[1])
    params['b_7'] = np.zeros(999, np.float32)                         # misshaped
    params['W_6'] = params['W_6'].astype(np.int32)                    # not floating point
    params['b1_4'] = np.array([object()] * 128, dtype=object)         # a pickle
    code, _, err = import_in_process(capsys, write_zip(tmp_path / 'r.zip', release_files(params)),
                                     tmp_path / 'w', '--skip-checksum')
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert '3 malformed' in err
    assert 'b_7_65.npy has shape (999,), expected (1000,)' in err
    assert 'W_6_65.npy has dtype int32' in err
    assert 'b1_4_65.npy holds pickled' in err
    assert 'W_0_65.npy' not in err
    assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('member', ['../W_0_65.npy', '/tmp/W_0_65.npy', 'a/../../b.npy'])
def test_path_traversal_member_is_refused(tmp_path, capsys, member):
    files = release_files({p.name: np.zeros(1, np.float32) for p in PARAMS})
    files[member] = np.zeros(1, np.float32)
    code, _, err = import_in_process(capsys, write_zip(tmp_path / 'r.zip', files, folder=''),
                                     tmp_path / 'w', '--skip-checksum')
    assert code == 1 and 'unsafe path' in err and repr(member) in err
    assert not (tmp_path / 'w').exists()


def test_foreign_weights_dir_is_refused(release, tmp_path, capsys):
    (tmp_path / 'w').mkdir()
    (tmp_path / 'w' / 'metrics.csv').write_text('epoch\n')
    code, _, err = import_in_process(capsys, release[0], tmp_path / 'w', '--skip-checksum')
    assert code == 1 and 'metrics.csv' in err and 'new or empty folder' in err


def test_import_again_over_an_imported_and_plotted_folder(release, tmp_path, capsys):
    wd = tmp_path / 'w'
    assert import_in_process(capsys, release[0], wd, '--skip-checksum')[0] == 0
    plot.main([str(wd)])   # plot.py's default output, wd/plot.png
    assert (wd / 'plot.png').is_file()
    code, _, err = import_in_process(capsys, release[0], wd, '--skip-checksum')
    assert code == 0, err


@pytest.mark.slow
def test_resume_from_imported_snapshot(imported, tmp_path):
    """train.py resume_train=True load_epoch=65 with the released run's config: one epoch."""
    wd = str(tmp_path / 'weights')
    shutil.copytree(imported[0], wd, copy_function=os.symlink)  # snapshots replace, not write
    data = make_dataset(str(tmp_path / 'data'), n_train_files=1, file_rows=4, val_sizes=(2,))
    plot.plot(wd, str(tmp_path / 'imported.png'))  # NaN rows of val_record plot as gaps
    cfg = load_config('spec_1gpu.yaml', [RUN_CONFIG] + data + [
        'gpu=cpu', 'batch_size=4', 'para_load=False', 'print_freq=1', f'weights_dir={wd}',
        'resume_train=True', 'n_epochs=66'])
    assert cfg['load_epoch'] == 65 and cfg['lr_step'] == [25, 45]
    train_loop.train(cfg, progress=False)
    rec = np.load(os.path.join(wd, 'val_record.npy'))
    assert rec.shape == (66, 2) and np.isfinite(rec[65]).all() and np.isnan(rec[:64]).all()
    assert float(np.load(os.path.join(wd, 'lr_66.npy'))) == pytest.approx(1e-4)
    with open(os.path.join(wd, 'metrics.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [int(r['epoch']) for r in rows] == [66] and float(rows[0]['lr']) == pytest.approx(1e-4)
    plot.plot(wd, str(tmp_path / 'after.png'))


def write_images(d):
    rng = np.random.default_rng(3)
    d.mkdir(exist_ok=True)
    y, x = np.mgrid[0:300, 0:400]
    png = np.dstack([(x * 0.6) % 256, (y * 0.8) % 256, rng.integers(0, 256, (300, 400)),
                     np.full((300, 400), 200)]).astype(np.uint8)
    Image.fromarray(png, 'RGBA').save(d / 'a.png')
    jpg = rng.integers(0, 256, (240, 320, 3)).astype(np.uint8)
    Image.fromarray(jpg, 'RGB').convert('CMYK').save(d / 'b.jpg', quality=90)
    return [str(d / 'a.png'), str(d / 'b.jpg')]


@pytest.mark.slow
def test_classify_equals_validation_forward(release, imported, tmp_path):
    wd = imported[0]
    misc = tmp_path / 'misc'
    misc.mkdir()
    shutil.copy(os.path.join(wd, 'img_mean.npy'), misc / 'img_mean.npy')
    words = [f'n{i:08d} class number {i}' for i in range(1000)]
    (misc / 'synset_words.txt').write_text(''.join(w + '\n' for w in words))
    images = write_images(tmp_path / 'img')
    r = run(os.path.join(ROOT, 'classify.py'), *images, RUN_CONFIG, 'gpu=cpu', f'weights_dir={wd}',
            f'mean_file={misc / "img_mean.npy"}')  # load_epoch: 65 from the run's config.yaml
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res['names'] == str(misc / 'synset_words.txt')
    assert [x['image'] for x in res['results']] == images
    top5 = [x['top5'] for x in res['results']]
    assert [t['label'] for t in top5[0]] != [t['label'] for t in top5[1]]
    for t in top5[0] + top5[1]:
        assert t['name'] == words[t['label']] and words[t['label']] in r.stdout

    # validation's own function, train_loop.eval_batch, on the rows the batch files would hold:
    # its loss for label l is -log p(l). Tolerance: float32 convolutions of a batch of 1 and of
    # 2 differ by ~1e-5 relative; a mirrored or shifted crop changes these p by 15-100%.
    net = AlexNet(init=False)
    load_snapshot(wd, 65, net, with_momentum=False)
    mean = mean_image_hwc(str(misc / 'img_mean.npy'), 'cpu')
    rows = np.stack([load_image_256(p) for p in images])
    for i, t5 in enumerate(top5):
        assert t5[0]['probability'] > 0.05
        for t in t5:
            loss = eval_batch(net.layer_params, torch.from_numpy(rows[i:i + 1]),
                                         torch.tensor([t['label']]), mean, None)[0]
            assert t['probability'] == pytest.approx(float(torch.exp(-loss)), rel=1e-4)

    # and validate.py itself on a validation batch file of those rows, labelled with the top-1
    data = make_dataset(str(tmp_path / 'data'), n_train_files=1, file_rows=8, val_sizes=(1,))
    val = tmp_path / 'val'
    val.mkdir()
    write_batch(str(val / '0000.hkl'), rows)
    labels = tmp_path / 'labels'
    labels.mkdir()
    np.save(labels / 'val_labels.npy', np.array([t5[0]['label'] for t5 in top5], np.int64))
    cfg = load_config('spec_1gpu.yaml', data + [
        'gpu=cpu', 'batch_size=8', 'para_load=False', f'weights_dir={wd}', 'load_epoch=65',
        f'val_folder={val}', f'label_folder={labels}', f'mean_file={misc / "img_mean.npy"}'])
    top1, _, loss, n = validate.evaluate(cfg)
    assert n == 2 and top1 == 0
    assert loss == pytest.approx(-np.mean([np.log(t5[0]['probability']) for t5 in top5]),
                                 rel=1e-4)


@pytest.mark.slow
def test_classify_names_from_devkit_and_errors(imported, tmp_path, capsys):
    import classify
    rng = np.random.default_rng(4)
    wnids = [f'n{rng.integers(10 ** 7, 10 ** 8)}{i:03d}' for i in range(1000)]
    ids = rng.permutation(1000) + 1  # devkit ids are not in WNID order
    meta = str(tmp_path / 'devkit' / 'meta_clsloc.mat')
    write_meta(meta, dict(zip(wnids, ids.tolist())))
    assert classify.split_args(['a.jpg', RUN_CONFIG, 'gpu=cpu', f'meta_clsloc_mat={meta}',
                                'b.png']) == (['a.jpg', 'b.png'], {'meta_clsloc_mat': meta},
                                              [RUN_CONFIG, 'gpu=cpu'])
    names = classify.names_from_devkit(meta)
    assert names == [f'{w} words of {w}' for w in sorted(wnids)]

    wd = imported[0]
    images = write_images(tmp_path / 'img')
    base = ['gpu=cpu', f'weights_dir={wd}', 'load_epoch=65',
            f'mean_file={os.path.join(wd, "img_mean.npy")}']
    bad = tmp_path / 'img' / 'broken.jpg'
    bad.write_bytes(open(images[1], 'rb').read()[:300])
    for args, expect in (
            ([images[0], str(bad)] + base, f'cannot read image {bad}'),
            ([images[0], str(tmp_path / 'nope.png')] + base, 'nope.png'),
            ([images[0], f'meta_clsloc_mat={tmp_path / "none.mat"}'] + base, 'none.mat'),
            ([images[0], f'synset_words={tmp_path / "none.txt"}'] + base, 'none.txt'),
            ([images[0]] + base[:-2] + ['load_epoch=64', base[-1]], 'W_0_64.npy')):
        with pytest.raises(SystemExit) as e:  # classify.main in this process
            classify.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 1, (args, err)
        assert err.startswith('error:') and expect in err and len(err.strip().splitlines()) == 1
    r = run(os.path.join(ROOT, 'classify.py'), images[0], 'gpu=cpu', 'load_epok=65')
    assert r.returncode == 2 and "did you mean 'load_epoch'" in r.stderr
    assert 'Traceback' not in r.stderr


def test_run_config_is_the_released_run():
    cfg = load_config('spec_1gpu.yaml', [RUN_CONFIG])
    defaults = load_config('spec_1gpu.yaml', [])
    assert cfg['n_epochs'] == 65 and cfg['lr_step'] == [25, 45] and cfg['load_epoch'] == 65
    assert cfg['weights_dir'] == os.path.join(ROOT, 'pretrained', 'alexnet', 'weights')
    differ = {k for k in cfg if cfg[k] != defaults[k]}
    assert differ == {'n_epochs', 'lr_step', 'load_epoch', 'weights_dir', 'mean_file'}
