"""train.py, validate.py and plot.py end to end on small real batch files (CPU)."""
import contextlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from alexnet_lib.config import ConfigError, load_config, parse_device
from conftest import assert_same_change
from alexnet_lib import loop as train_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(2)


def cfg_for(data, tmp, *extra):
    return load_config('spec_1gpu.yaml', data + [
        'gpu=cpu', 'batch_size=8', 'print_freq=2', 'para_load=False',
        f'weights_dir={tmp}', *extra])


def run_script(script, *args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def two_epochs(small_dataset, tmp_path_factory):
    d = tmp_path_factory.mktemp('straight')
    rep = train_loop.train(cfg_for(small_dataset, d, 'n_epochs=2', 'shuffle=True'),
                           progress=False)
    return d, rep.net.state.clone()


@pytest.mark.slow
def test_two_epochs_equal_one_plus_resume(small_dataset, two_epochs, tmp_path):
    d, straight = two_epochs
    train_loop.train(cfg_for(small_dataset, tmp_path, 'n_epochs=1', 'shuffle=True'),
                     progress=False)
    rep = train_loop.train(cfg_for(small_dataset, tmp_path, 'n_epochs=2', 'shuffle=True',
                                   'resume_train=True', 'load_epoch=1'), progress=False)
    assert torch.equal(rep.net.state, straight)  # weights and momentum, bit for bit
    assert np.array_equal(np.load(tmp_path / 'val_record.npy'), np.load(d / 'val_record.npy'))
    assert (tmp_path / 'metrics.csv').read_text() .count('\n') == 3  # header + 2 epochs


@pytest.mark.slow
def test_outputs_of_a_run(two_epochs):
    d, _ = two_epochs
    rec = np.load(d / 'val_record.npy')
    assert rec.shape == (2, 2) and np.all((rec[:, 0] >= 0) & (rec[:, 0] <= 1))
    for e in (1, 2):
        assert (d / f'W_0_{e}.npy').exists() and (d / f'W1_4_{e}.npy').exists()
        assert (d / f'mom_21_{e}.npy').exists() and (d / f'lr_{e}.npy').exists()
    header = (d / 'metrics.csv').read_text().splitlines()[0]
    assert header == ('epoch,lr,train_loss,val_top1_error,val_top5_error,val_loss,'
                      'images_per_s,wall_time_s')


@pytest.mark.slow
def test_validate_and_plot_scripts(small_dataset, two_epochs):
    d, _ = two_epochs
    r = run_script('validate.py', *small_dataset, 'gpu=cpu', 'batch_size=8', 'para_load=False',
                   f'weights_dir={d}', 'load_epoch=2')
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res['images'] == 21 and set(res) == {'top1_error', 'top5_error', 'loss', 'images'}
    rec = np.load(d / 'val_record.npy')
    assert (res['top1_error'] == pytest.approx(rec[1, 0])
            and res['loss'] == pytest.approx(rec[1, 1], rel=1e-5))
    assert 'notice' not in r.stderr       # a snapshot of a whole epoch
    r = run_script('plot.py', str(d))
    assert r.returncode == 0, r.stderr
    assert (d / 'plot.png').read_bytes()[:4] == b'\x89PNG'


def test_each_replica_slice_of_the_draws_is_the_global_draw():
    from alexnet_lib.data import step_draws
    full = step_draws(5, 2, 7, 16)
    again = step_draws(5, 2, 7, 16)
    assert np.array_equal(full[0], again[0]) and np.array_equal(full[1], again[1])
    assert full[0].min() >= 0 and full[0].max() <= 29
    other = step_draws(5, 2, 8, 16)
    assert not np.array_equal(full[0], other[0])
    one = step_draws(5, 2, 7, 16, batch_crop_mirror=True)
    assert (one[0] == one[0][0]).all() and (one[1] == one[1][0]).all()
    centre = step_draws(5, 2, 7, 4, rand_crop=False)
    assert (centre[0] == 14).all() and not centre[1].any()


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda:0', marks=pytest.mark.gpu)])
def test_crop_mirror_is_the_original_crop_of_image_minus_mean(device):
    """The crop of (image - mean), mirrored where asked: on a GPU fused_layers' kernel, on the
    CPU one gather; both in float32 bit for bit, and channels-last."""
    from alexnet_lib.step import crop_mirror
    rng = np.random.RandomState(0)
    img = rng.randint(0, 256, (3, 256, 256, 3)).astype(np.uint8)
    mean = rng.rand(256, 256, 3).astype(np.float32) * 255
    offs = np.array([[3, 29], [0, 14], [29, 0]])
    mirror = np.array([True, False, True])
    got = crop_mirror(*(torch.from_numpy(a).to(device) for a in (img, mean, offs, mirror)))
    assert got.is_contiguous(memory_format=torch.channels_last)
    got = got.cpu().numpy()
    for i in range(3):
        want = (img[i].astype(np.float32) - mean)[offs[i, 0]:offs[i, 0] + 227,
                                                  offs[i, 1]:offs[i, 1] + 227]
        if mirror[i]:
            want = want[:, ::-1]
        np.testing.assert_array_equal(got[i], want.transpose(2, 0, 1))


# -- configuration errors ---------------------------------------------------------------------
def test_batch_files_are_taken_in_their_numbers_order(tmp_path):
    """Batch i's labels are labels[i*B:(i+1)*B]: 10.hkl comes after 2.hkl (a text sort puts it
    before, and its images would take another file's labels)."""
    from alexnet_lib.batch_files import list_batch_files
    for name in ('10.hkl', '2.hkl', '0.hkl', '1.hkl', '0003.hkl', 'extra.hkl', 'notes.txt'):
        (tmp_path / name).write_bytes(b'')
    assert [os.path.basename(f) for f in list_batch_files(str(tmp_path))] == [
        '0.hkl', '1.hkl', '2.hkl', '0003.hkl', '10.hkl', 'extra.hkl']


def test_unknown_key_names_the_closest_key():
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rat'.*'learning_rate'"):
        load_config('spec_1gpu.yaml', ['learning_rat=0.1'])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match='n_epochs'):
        load_config('spec_1gpu.yaml', ['n_epochs=ten'])
    with pytest.raises(ConfigError, match='rand_crop'):
        load_config('spec_1gpu.yaml', ['rand_crop=maybe'])
    with pytest.raises(ConfigError, match='lr_step'):
        load_config('spec_1gpu.yaml', ['lr_step=[a, b]'])


@pytest.mark.parametrize('value,want', [('gpu0', 'cuda:0'), ('0', 'cuda:0'), ('cuda:0', 'cuda:0'),
                                        ('cpu', 'cpu'), ('gpu3', 'cuda:3')])
def test_gpu_forms(value, want):
    assert parse_device(value) == want
    assert load_config('spec_1gpu.yaml', [f'gpu={value}'])['gpu'] == want


def test_bad_device_and_combinations_are_refused():
    with pytest.raises(ConfigError, match='gpu'):
        load_config('spec_1gpu.yaml', ['gpu=tpu0'])
    with pytest.raises(ConfigError, match='use_momentum'):
        load_config('spec_1gpu.yaml', ['use_momentum=False', 'use_nesterov_momentum=True'])
    with pytest.raises(ConfigError, match='exchange_freq'):
        load_config('spec_2gpu.yaml', ['average=gradients', 'exchange_freq=3'])
    with pytest.raises(ConfigError, match='needs GPUs'):
        load_config('spec_2gpu.yaml', ['gpu0=cpu', 'gpu1=cpu', 'exchange=p2p'])
    with pytest.raises(ConfigError, match='prefetch'):
        load_config('spec_1gpu.yaml', ['prefetch=1'])
    with pytest.raises(ConfigError, match='exchange_dtype: bf16 averages gradients'):
        load_config('spec_2gpu.yaml', ['gpu0=cpu', 'gpu1=cpu', 'exchange=host',
                                       'average=gradients', 'exchange_dtype=bf16'])
    with pytest.raises(ConfigError, match='exchange_dtype'):
        load_config('spec_2gpu.yaml', ['exchange_dtype=fp16'])


def test_lib_conv_notice(capsys):
    load_config('spec_1gpu.yaml', ['lib_conv=cudaconvnet'])
    assert 'lib_conv' in capsys.readouterr().err


@pytest.mark.slow
def test_script_reports_config_errors_in_one_line():
    r = run_script('train.py', 'n_epoch=2', timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "config error: unknown key 'n_epoch' in the command line; did you mean 'n_epochs'?"]


@pytest.mark.slow
def test_missing_batch_folder_and_label_file(small_dataset, tmp_path):
    r = run_script('train.py', *small_dataset, 'gpu=cpu', 'para_load=False',
                   f'train_folder={tmp_path}/nowhere', timeout=120)
    assert r.returncode == 1 and 'nowhere' in r.stderr and 'does not exist' in r.stderr
    assert 'Traceback' not in r.stderr
    labels = tmp_path / 'labels'
    labels.mkdir()
    r = run_script('train.py', *small_dataset, 'gpu=cpu', 'para_load=False',
                   f'label_folder={labels}', timeout=120)
    assert r.returncode == 1 and 'val_labels.npy' in r.stderr and 'not found' in r.stderr


def test_batch_size_must_divide_the_batch_files(small_dataset, tmp_path):
    with pytest.raises(ConfigError, match='batch_size 6 must divide the 16 images'):
        train_loop.train(cfg_for(small_dataset, tmp_path, 'batch_size=6'), progress=False)
    with pytest.raises(ConfigError, match='is more than the 32 training images'):
        train_loop.Replica(cfg_for(small_dataset, tmp_path, 'batch_size=16', 'resume_train=True'),
                           0, 3, 'cpu')


@pytest.mark.parametrize('world,batch,shuffle', [
    (1, 16, False), (2, 4, True), (2, 16, True),
    pytest.param(4, 8, False, marks=pytest.mark.slow),
    pytest.param(3, 8, True, marks=pytest.mark.slow)])
def test_every_training_image_once_per_epoch_in_order(small_dataset, tmp_path, world, batch,
                                                      shuffle):
    """The steps run over the epoch's files as one sequence, also when a global batch spans
    files (2 x 16 over files of 16): every image at most once, in the file order, all but a
    remainder of less than a step; replica r reads the r-th slice of each step."""
    cfg = cfg_for(small_dataset, tmp_path, f'batch_size={batch}', f'shuffle={shuffle}',
                  'resume_train=True')    # resume_train: no initial draw, nothing else loaded
    plans = [train_loop.Replica(cfg, r, world, 'cpu').data for r in range(world)]
    rows = plans[0].file_rows
    for epoch in (1, 2):
        order = plans[0].file_order(epoch)
        per_rank = [plan.train_requests(epoch) for plan in plans]
        seen = []
        for step in zip(*per_rank):
            for path, lo, hi, label_off in step:
                fi = plans[0].train_files.index(path)
                assert label_off == fi * rows and hi - lo == batch and hi <= rows
                seen += [fi * rows + i for i in range(lo, hi)]
        want = [fi * rows + i for fi in order for i in range(rows)]
        n = len(want) // (world * batch) * world * batch
        assert seen == want[:n]


@pytest.mark.slow
def test_parallel_loading_trains_bit_identically(small_dataset, two_epochs, tmp_path):
    """para_load: True (a real loader process over ZeroMQ, shared-memory buffers) gives the same
    weights and momentum as serial loading, bit for bit."""
    _, straight = two_epochs
    rep = train_loop.train(cfg_for(small_dataset, tmp_path, 'n_epochs=2', 'shuffle=True',
                                   'para_load=True', 'prefetch=3'), progress=False)
    assert torch.equal(rep.net.state, straight)


@contextlib.contextmanager
def same_cudnn_algorithms(rep):
    """Within the block, cuDNN runs the algorithms its heuristics choose, deterministic ones,
    instead of the fastest it times (configure_device's benchmark mode): two runs compared
    element by element then use the same convolution algorithms; timed choices differ between
    runs, and with them the summation order of the convolutions' gradients."""
    if rep.device.type != 'cuda':
        yield
        return
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


_FIRST_STEPS = {}


def first_step(cfg):
    """Each parameter and its momentum (PARAMS order), before and after the epoch's first step
    of the real training loop. Computed once per device, precision and compile setting (one
    step is never captured as a graph, and the data are the session's small dataset): the two
    tests below compare the same steps."""
    key = (cfg['gpu'], cfg['precision'], cfg['compile'], cfg['train_folder'])
    if key not in _FIRST_STEPS:
        _FIRST_STEPS[key] = _first_step(cfg)
    return _FIRST_STEPS[key]


def _first_step(cfg):
    from alex_net import N_PARAMS, PARAMS
    rep = train_loop.Replica(cfg, 0, 1)

    def arrays():
        state = rep.net.state.cpu().numpy().copy()
        return [state[off + p.offset:off + p.offset + p.size] for off in (0, N_PARAMS)
                for p in PARAMS]
    start = arrays()
    with rep.make_loader() as loader, same_cudnn_algorithms(rep):
        rep.train_epoch(1, cfg['learning_rate'], loader, progress=False,
                        requests=rep.data.train_requests(1)[:1])
    return start, arrays()


@pytest.mark.slow
def test_compiled_step_is_the_eager_step(small_dataset, tmp_path):
    """compile: True (augmentation, forward and backward, the max pool by window codes, the
    update) makes the same training step as eager on the CPU, element by element within float32
    rounding (~1e-6 of each change). One step: over several, rounding grows (flipped ReLU and
    pooling choices of near-equal values move the small conv gradients by a few percent). On a
    GPU the same flips happen within one step (other convolution and reduction orders: a few
    elements of a conv weight off by ~1% of its largest change, others in each run), so there
    each step is compared with the float64 step instead (below), as bf16 is."""
    cfg = {c: cfg_for(small_dataset, tmp_path, 'gpu=cpu', 'precision=fp32', f'compile={c}',
                      'batch_size=4') for c in (False, True)}
    start, eager = first_step(cfg[False])
    _, compiled = first_step(cfg[True])
    assert_same_change(compiled, eager, start, 1e-4)


def reference_first_step(cfg, device):
    """The loop's first step computed again in float64 on the CPU, from the same initial
    weights, images, crops, mirrors and dropout masks (drawn on `device`, as the run drew
    them): the change of each parameter and of its momentum, in PARAMS order."""
    from alex_net import AlexNet, PARAMS, forward
    from alexnet_lib.batch_files import read_rows
    from alexnet_lib.data import dropout_masks, mean_image_hwc, step_draws
    from alexnet_lib.step import crop_mirror
    rep = train_loop.Replica(dict(cfg, gpu='cpu', compile=False), 0, 1)
    data = rep.data
    path, lo, hi, label_off = data.train_requests(1)[0]
    images = torch.from_numpy(read_rows(path, lo, hi))
    labels = data.train_labels[label_off + lo:label_off + hi]
    offsets, mirror, mask_seed = step_draws(cfg['seed'], 1, 0, data.global_batch,
                                            cfg['rand_crop'], cfg['batch_crop_mirror'])
    masks = dropout_masks(mask_seed, data.global_batch, 0, hi - lo, device).cpu().double()
    mean = mean_image_hwc(cfg['mean_file'], 'cpu').double()
    x = crop_mirror(images, mean, torch.from_numpy(offsets), torch.from_numpy(mirror))
    net = AlexNet('cpu')
    params = [tuple(t.detach().double().requires_grad_() for t in pair)
              for pair in net.layer_params]
    loss = torch.nn.functional.cross_entropy(forward(params, x, masks), labels)
    loss.backward()
    lr, wd = cfg['learning_rate'], cfg['weight_decay']
    steps = {}
    for i, (W, b) in enumerate(params):        # momentum starts at zero: v = -lr_eff g'
        steps[i] = (-lr * (W.grad + wd * W.detach()), -2 * lr * b.grad)
    out = []
    for p in PARAMS:                           # our layout's views, as first_step gives them
        w_or_b = steps[p.layer][0 if p.is_weight else 1]
        halves = 2 if p.name[1] in '01' else 1
        part = int(p.name[1]) if halves == 2 else 0
        chunk = w_or_b.chunk(halves, dim=0 if w_or_b.dim() != 2 or not p.is_weight else 1)
        out.append(chunk[part].reshape(-1).numpy())
    return out + out                           # the parameters' changes, then the momentum's


@pytest.mark.slow
@pytest.mark.parametrize('device, precision, floor, cap', [
    ('cpu', 'fp32', 1e-4, 1e-2),
    pytest.param('cuda:0', 'fp32', 1e-3, 1e-2, marks=pytest.mark.gpu),
    pytest.param('cuda:0', 'bf16', 3e-2, 0.5, marks=pytest.mark.gpu)])
def test_compiled_and_eager_steps_against_float64(small_dataset, tmp_path, device, precision,
                                                  floor, cap):
    """Which of the two is off, when the compiled and the eager step differ: each against the
    same step in float64. ||change - reference|| / ||reference|| per array: the compiled step
    may be no further from the reference than the eager one (x2, or `floor`), and neither
    further than `cap` (bf16 at a batch of 4: conv1's change is ~25% off in both)."""
    from alex_net import PARAMS
    cfg = {c: cfg_for(small_dataset, tmp_path, f'gpu={device}', f'precision={precision}',
                      f'compile={c}', 'cuda_graph=False', 'batch_size=4') for c in (False, True)}
    start, eager = first_step(cfg[False])
    _, compiled = first_step(cfg[True])
    ref = reference_first_step(cfg[False], device)
    rows = []
    for k, (x0, e, c, r) in enumerate(zip(start, eager, compiled, ref)):
        scale = np.linalg.norm(r)
        err_e = np.linalg.norm((e - x0) - r) / scale
        err_c = np.linalg.norm((c - x0) - r) / scale
        name = PARAMS[k % len(PARAMS)].name + (' momentum' if k >= len(PARAMS) else '')
        rows.append((name, err_e, err_c))
    print('array, eager and compiled relative error against float64:',
          *(f'{n:16s} {e:.2e} {c:.2e}' for n, e, c in rows), sep='\n  ')
    bad = [(n, e, c) for n, e, c in rows if c > max(2 * e, floor)]
    assert not bad, f"compiled step further from float64 than eager: {bad}"
    assert max(max(e, c) for _, e, c in rows) < cap, rows


@pytest.mark.gpu
def test_graphed_step_is_the_compiled_step(small_dataset, tmp_path):
    """cuda_graph: True (the compiled step captured after its warm-up steps and replayed) trains
    as the compiled step does, also when the learning rate changes on every step (a warm-up)
    and between epochs: the rate is a tensor the graph reads, so one graph serves them all.
    Over eight steps rounding alone moves single elements by a percent (flipped ReLU and
    pooling choices), so the measure is each array's distance ||a - b|| / ||change||, and the
    bound is the distance between two runs of the compiled step without a graph, measured here:
    a graph that lost an update or read a stale rate is tens of percent off."""
    from alex_net import N_PARAMS, PARAMS
    from alexnet_lib.sgd import warmup_factor

    def run(graph):
        cfg = cfg_for(small_dataset, tmp_path, 'gpu=cuda:0', 'precision=fp32', 'compile=True',
                      f'cuda_graph={graph}', 'batch_size=4', 'lr_warmup_epochs=1')
        rep = train_loop.Replica(cfg, 0, 1)
        start = rep.net.state.cpu().numpy().copy()
        with rep.make_loader() as loader, same_cudnn_algorithms(rep):
            reqs = rep.data.train_requests(1)
            rep.train_epoch(1, 0.01, loader, progress=False, requests=reqs[:6])  # warming up
            captured = rep.step.graph
            rep.train_epoch(2, 0.001, loader, progress=False, requests=reqs[:2])  # a new lr
        if graph:
            assert captured is not None and rep.step.graph is captured
            # the second call's last step: iteration 3 of the warm-up (2 steps per 'epoch')
            assert float(rep.step.lr) == pytest.approx(0.001 * warmup_factor(3, rep.warmup_steps))
        else:
            assert rep.step.graph is None
        change = rep.net.state.cpu().numpy() - start
        return [change[off + p.offset:off + p.offset + p.size] for off in (0, N_PARAMS)
                for p in PARAMS]

    compiled, again, graphed = run(False), run(False), run(True)
    rows = []
    for k, (c, c2, g) in enumerate(zip(compiled, again, graphed)):
        scale = np.linalg.norm(c)
        rows.append((PARAMS[k % len(PARAMS)].name + (' momentum' if k >= len(PARAMS) else ''),
                     np.linalg.norm(c2 - c) / scale, np.linalg.norm(g - c) / scale))
    print('array, run-to-run and graphed-to-compiled distance / change:',
          *(f'{n:16s} {noise:.2e} {d:.2e}' for n, noise, d in rows), sep='\n  ')
    # 4x the run-to-run distance, at least 1e-5 (runs that happen to agree bit for bit)
    bad = [row for row in rows if row[2] > max(4 * row[1], 1e-5)]
    assert not bad, f"the graphed run is further from the compiled one than run-to-run: {bad}"


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_step_writes_fc_weight_gradients_and_updates_as_the_rule_says(precision):
    """The step writes the fully connected weights' gradients into net.grad (they are not added
    to what is there: the part holds garbage before the step here) and then updates: the same
    parameters and momentum, bit for bit, as the rule written plainly (autocast's own casts,
    the whole backward added into a zeroed net.grad, one update over the flat buffers); after
    it net.grad holds zeros for the next backward pass to add to, and in the written part this
    step's gradients."""
    from alex_net import FIRST_FC, AlexNet
    from alexnet_lib.data import Batch
    from alexnet_lib.sgd import sgd_step_
    from alexnet_lib.step import (TrainStep, UpdateRule, amp_dtype_of, augmented_features,
                                  classifier_loss)
    gen = torch.Generator().manual_seed(5)
    n = 4
    batch = Batch(torch.randint(0, 256, (n, 256, 256, 3), dtype=torch.uint8, generator=gen),
                  torch.randint(0, 10, (n,), generator=gen),
                  torch.randint(0, 30, (n, 2), generator=gen),
                  torch.rand(n, generator=gen) < 0.5,
                  (torch.rand(2, n, 4096, generator=gen) < 0.5).float())
    mean = torch.rand(256, 256, 3, generator=gen) * 255
    ours, plain = AlexNet('cpu', n_classes=10), AlexNet('cpu', n_classes=10)
    # momentum from an earlier step, so that every term of the rule counts
    ours.momentum.copy_(torch.randn(ours.momentum.shape, generator=gen) * 1e-3)
    plain.momentum.copy_(ours.momentum)
    ours.grad[ours.arch.fc_weights] = float('nan')
    rule = UpdateRule(0.9, 0.0005)
    step = TrainStep(ours, mean, rule, precision=precision)
    step.set_lr(0.01)
    step(batch, 0)
    amp = amp_dtype_of(precision)
    feats = augmented_features(plain.layer_params[:FIRST_FC], batch.images, mean,
                               batch.offsets, batch.mirror, amp)
    cut = feats.detach().requires_grad_()
    loss, _ = classifier_loss(plain.layer_params[FIRST_FC:], cut, batch.labels, batch.masks,
                              amp)
    loss.backward()
    feats.backward(cut.grad)
    fc = plain.arch.fc_weights
    fc_grads = plain.grad[fc].clone()
    assert fc_grads.abs().sum() > 0
    sgd_step_(plain.params, plain.grad, plain.momentum, torch.tensor(0.01),
              plain.arch.n_weights, 0.9, 0.0005)
    assert torch.equal(ours.state, plain.state)
    assert torch.equal(ours.grad[fc], fc_grads)
    assert not ours.grad[:fc.start].any() and not ours.grad[fc.stop:].any()


@pytest.mark.parametrize('world, batch, first_step, says', [
    (1, 8, 3, None),        # the run that was stopped: the step after the snapshot's
    (1, 4, 6, None),        # the same 24 images, in steps of 4
    (2, 8, 1, 'images 16..23 are trained again'),   # steps of 16: the last 8 again, no more
    (3, 8, 1, 'no step of 24 images is left in it'),
])
def test_a_mid_epoch_snapshot_resumes_at_its_first_untrained_image(small_dataset, tmp_path,
                                                                   world, batch, first_step,
                                                                   says):
    """A snapshot taken after 3 steps of 8 of the 32 images (SIGTERM) resumes with another
    number of replicas or batch_size from the first image it did not train: no image twice
    but for the rest of a step, none left out."""
    rep = train_loop.Replica(cfg_for(small_dataset, tmp_path), 0, 1, 'cpu')
    rep.snapshot(1, 0.01, (3, 8))
    lines = []
    resumed = train_loop.Replica(
        cfg_for(small_dataset, tmp_path, f'batch_size={batch}', 'resume_train=True',
                'load_epoch=1'), 0, world, 'cpu', log=lines.append)
    assert resumed.resume_or_start()[:2] == (1, first_step)
    notices = [line for line in lines if line.startswith('notice:')]
    assert len(notices) == (says is not None) and all(says in n for n in notices), lines
    if first_step == resumed.data.steps_per_epoch:   # nothing left to train in the epoch
        assert all(math.isnan(x) for x in resumed.train_epoch(1, 0.01, None, False,
                                                              start_step=first_step))


@pytest.mark.slow
def test_sigterm_finishes_the_step_snapshots_and_resume_matches(small_dataset, two_epochs,
                                                                 tmp_path):
    """Preemption: SIGTERM mid-epoch -> the step finishes, a resumable snapshot is written, the
    run exits (143) saying how to resume; resuming ends with the uninterrupted run's weights."""
    import signal
    _, straight = two_epochs
    args = [*small_dataset, 'gpu=cpu', 'batch_size=8', 'print_freq=1', 'para_load=True',
            'shuffle=True', 'n_epochs=2', f'weights_dir={tmp_path}']
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *args], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in p.stdout:
        out.append(line)
        if 'iter 6 ' in line:         # epoch 2, step 2 of 4
            p.send_signal(signal.SIGTERM)
            break
    out.append(p.communicate(timeout=120)[0])
    text = ''.join(out)
    assert p.returncode == 143, text[-2000:]
    assert 'resume_train=True load_epoch=2' in text
    assert (tmp_path / 'progress_2.npy').exists() and (tmp_path / 'lr_2.npy').exists()
    done, per_step = np.load(tmp_path / 'progress_2.npy').tolist()
    assert 2 <= done < 4 and per_step == 8
    r = run_script('validate.py', *small_dataset, 'gpu=cpu', 'batch_size=8', 'para_load=False',
                   f'weights_dir={tmp_path}', 'load_epoch=2')
    assert r.returncode == 0, r.stderr
    assert (f'notice: snapshot 2 was written in the middle of epoch 2 (a run stopped after '
            f'{done} of its steps)') in r.stderr and 'resume_train=True load_epoch=2' in r.stderr
    assert set(json.loads(r.stdout.strip().splitlines()[-1])) == {'top1_error', 'top5_error',
                                                                  'loss', 'images'}
    rep = train_loop.train(cfg_for(small_dataset, tmp_path, 'n_epochs=2', 'shuffle=True',
                                   'resume_train=True', 'load_epoch=2'), progress=False)
    assert torch.equal(rep.net.state, straight)
    assert not (tmp_path / 'progress_2.npy').exists()   # epoch 2's snapshot is complete now
    assert np.load(tmp_path / 'val_record.npy').shape == (2, 2)


@pytest.mark.slow
def test_warm_up_rates_follow_the_linear_ramp_step_by_step(small_dataset, tmp_path, capsys):
    """lr_warmup_epochs: 0.75 of 4 steps per epoch: the real loop's steps train at 1/3, 2/3 and
    3/3 of the rate, then at the rate (the progress line reads the rate the step used, the
    tensor its update reads); and the run's weights differ from a run without warm-up."""
    cfg = cfg_for(small_dataset, tmp_path, 'n_epochs=1', 'print_freq=1',
                  'lr_warmup_epochs=0.75', 'snapshot_freq=5')
    rep = train_loop.train(cfg, progress=False)
    rates = [float(line.rsplit('| lr ', 1)[1]) for line in capsys.readouterr().out.splitlines()
             if line.startswith('iter ')]
    # 3 warm-up steps; the line prints six significant digits
    assert rates == pytest.approx([0.01 / 3, 0.02 / 3, 0.01, 0.01], rel=1e-5)
    plain = train_loop.train(cfg_for(small_dataset, tmp_path / 'plain', 'n_epochs=1',
                                     'snapshot_freq=5'), progress=False)
    assert not torch.equal(rep.net.state, plain.net.state)
