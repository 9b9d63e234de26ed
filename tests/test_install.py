"""The install: every script runs its own checkout's code, whichever checkout this Python has
installed; the installed distribution puts nothing in site-packages but alexnet_lib; a wheel
(no checkout beside it) refuses in one line. Real processes on the CPU, outside any checkout."""
import concurrent.futures
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
MARK = 'MARKER-OF-CHECKOUT-B'


def run(args, cwd, env=None, timeout=120):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope='module')
def checkout_b(tmp_path_factory):
    """A second checkout (a clone of this one's committed HEAD) whose alexnet_lib and alex_net
    say when they are imported."""
    if not os.path.isdir(os.path.join(ROOT, '.git')) or shutil.which('git') is None:
        pytest.skip('not a git checkout')
    b = str(tmp_path_factory.mktemp('second') / 'B')
    r = run(['git', 'clone', '--quiet', ROOT, b], cwd=os.path.dirname(b))
    assert r.returncode == 0, r.stderr
    for module in ('alexnet_lib/__init__.py', 'alex_net.py'):
        with open(os.path.join(b, module), 'a') as f:
            f.write(f"\nimport sys as _s\n_s.stderr.write('{MARK} {module}\\n')\n")
    return b


@pytest.mark.slow
def test_scripts_of_a_second_checkout_run_that_checkout(checkout_b, tmp_path):
    """This Python has this checkout installed (editable); the scripts in the second checkout's
    subfolders import the second checkout's alexnet_lib and alex_net and read its paths.yaml."""
    b = checkout_b
    py = sys.executable
    jobs = {
        'preprocessing': [py, os.path.join(b, 'preprocessing', 'make_train_val_txt.py')],
        'preprocessing --help': [py, os.path.join(b, 'preprocessing', 'make_labels.py'),
                                 '--help'],
        'bench': [py, os.path.join(b, 'bench', 'bench_loader.py'), '--help'],
        'pretrained': [py, os.path.join(b, 'pretrained', 'import_params.py'), '--help'],
        # where the package finds the checkout's files, imported from a script folder
        'roots': [py, '-c', 'import alex_net, layers\n'
                            'from alexnet_lib import config, imagenet, parallel\n'
                            'for p in (config.ROOT, imagenet.PREPROCESSING, '
                            'parallel.LOADER_SCRIPT, alex_net.__file__, layers.__file__):\n'
                            '    print(p)'],
    }
    cwds = {k: str(tmp_path) for k in jobs}
    cwds['roots'] = os.path.join(b, 'bench')
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        res = {k: pool.submit(run, cmd, cwds[k]) for k, cmd in jobs.items()}
        res = {k: f.result() for k, f in res.items()}
    for k, r in res.items():
        assert 'Traceback' not in r.stderr, f'{k}:\n{r.stderr[-3000:]}'
        assert f'{MARK} alexnet_lib/__init__.py' in r.stderr, \
            f"{k}: not the second checkout's alexnet_lib\n{r.stderr[-3000:]}"
    for k in ('pretrained', 'roots'):     # those that import alex_net themselves
        assert f'{MARK} alex_net.py' in res[k].stderr, \
            f"{k}: not the second checkout's alex_net\n{res[k].stderr[-3000:]}"
    for k in ('preprocessing --help', 'bench', 'pretrained'):
        assert res[k].returncode == 0 and 'usage:' in res[k].stdout, k
    # the default paths file is the second checkout's
    r = res['preprocessing']
    assert r.returncode == 1, r.stderr
    assert f"(set in {os.path.join(b, 'preprocessing', 'paths.yaml')})" in r.stderr, r.stderr
    real = os.path.realpath(b)
    assert [os.path.realpath(p) for p in res['roots'].stdout.split()] == [
        real, os.path.join(real, 'preprocessing'), os.path.join(real, 'proc_load.py'),
        os.path.join(real, 'alex_net.py'), os.path.join(real, 'layers.py')], res['roots'].stdout


def test_shell_scripts_of_a_second_checkout_use_its_scripts(checkout_b, tmp_path):
    r = run(['bash', os.path.join(checkout_b, 'preprocessing', 'generate_toy_data.sh')],
            cwd=str(tmp_path), env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert f'{MARK} alexnet_lib/__init__.py' in r.stderr, r.stderr
    assert os.path.join(checkout_b, 'preprocessing', 'paths.yaml') in r.stderr, r.stderr


def test_the_environment_has_no_generic_top_level_module(tmp_path):
    """Outside any checkout, this Python finds neither alex_net nor layers (the editable install
    of a checkout adds alexnet_lib only)."""
    r = run([sys.executable, '-c', 'import importlib.util as u\n'
                                   'print(u.find_spec("alex_net"), u.find_spec("layers"))'],
            cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ['None', 'None'], \
        f'{r.stdout} (an install of an older checkout? bash setup.sh installs this one)'


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    """The project built as a wheel, offline, from a copy of this checkout's files."""
    tmp = tmp_path_factory.mktemp('wheel')
    src = tmp / 'src'
    src.mkdir()
    for name in os.listdir(ROOT):
        path = os.path.join(ROOT, name)
        if os.path.isfile(path) and (name.endswith('.py') or name in ('pyproject.toml',
                                                                       'README.md')):
            shutil.copy(path, src / name)
    shutil.copytree(os.path.join(ROOT, 'alexnet_lib'), src / 'alexnet_lib',
                    ignore=shutil.ignore_patterns('__pycache__'))
    r = run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation',
             '-w', str(tmp / 'out'), str(src)], cwd=str(tmp),
            env=dict(os.environ, PIP_NO_INDEX='1'), timeout=300)
    if r.returncode != 0:
        pytest.skip(f'cannot build a wheel offline here: {r.stderr[-500:]}')
    (whl,) = (tmp / 'out').iterdir()
    return whl


@pytest.mark.slow
def test_the_wheel_holds_no_top_level_module_but_alexnet_lib(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top = {n.split('/')[0] for n in names if not n.split('/')[0].endswith('.dist-info')}
        (top_level,) = [n for n in names if n.endswith('.dist-info/top_level.txt')]
        assert z.read(top_level).decode().split() == ['alexnet_lib']
    assert top == {'alexnet_lib'}, sorted(top)


def test_the_wheel_refuses_in_one_line(wheel, tmp_path):
    site = tmp_path / 'site'
    r = run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-index',
             '--target', str(site), str(wheel)], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    r = run([sys.executable, '-c', 'import alexnet_lib; print("imported")'], cwd=str(tmp_path),
            env=dict(os.environ, PYTHONPATH=str(site)))
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode != 0 and 'imported' not in r.stdout, r.stdout + r.stderr
    assert len(lines) == 1 and 'Traceback' not in r.stderr, r.stderr
    assert 'pip install -e' in lines[0] and 'setup.sh' in lines[0], lines[0]
