"""Configuration: config.yaml merged with a spec file, extra yaml files and key=value overrides.

The values (defaults) live in the yaml files; this module knows each key's type and checks them:
an unknown key is an error naming the closest known key, a value of the wrong type an error
naming the key, and a combination that makes no sense an error saying why.

    cfg = load_config('spec_1gpu.yaml', ['n_epochs=2', 'gpu=cpu'])
    cfg['batch_size'], cfg['gpu']         # 256, 'cpu'

The repository's config.yaml and spec file give every key its default; files of the same name in
the current directory (the original's, say) are merged over them, then extra yaml files and the
key=value words. Relative paths are relative to the folder of the file that set them (the
current directory for command-line overrides). cfg.sources says which files were merged and
why, cfg.set_by which of them set each key (the start of a run prints both).

One yaml file serves both training scripts: the keys of the other script's spec file (gpu for
train.py; gpus, gpu0, gpu1 for train_2gpu.py) are ignored with a notice.
"""
import difflib
import math
import os
import re
import sys

import yaml

from alexnet_lib import exchange_backends
from alexnet_lib.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # the yaml files

CONFIG_KEYS = {
    'resume_train': 'bool_or_auto', 'load_epoch': 'int', 'overwrite': 'bool', 'n_epochs': 'int',
    'learning_rate': 'float',
    'lr_policy': ('step', 'auto'), 'lr_adapt_threshold': 'float', 'lr_step': 'int_list',
    'lr_warmup_epochs': 'float',
    'use_data_layer': 'bool', 'rand_crop': 'bool', 'shuffle': 'bool', 'para_load': 'bool',
    'batch_crop_mirror': 'bool', 'prefetch': 'int', 'label_folder': 'data_path',
    'mean_file': 'data_path', 'n_classes': 'int',
    'use_momentum': 'bool', 'use_nesterov_momentum': 'bool', 'momentum': 'float',
    'weight_decay': 'float', 'weights_dir': 'path', 'snapshot_freq': 'int',
    'keep_snapshots': 'int_or_all',
    'print_train_error': 'bool', 'print_freq': 'int', 'lib_conv': 'str',
    'precision': ('auto', 'bf16', 'tf32', 'fp32'), 'compile': 'bool_or_auto',
    'cuda_graph': 'bool_or_auto', 'seed': 'int',
    'exchange': exchange_backends.NAMES, 'average': exchange_backends.AVERAGES,
    'exchange_freq': 'int', 'exchange_dtype': exchange_backends.WIRE_DTYPES,
    'elastic_alpha': 'float', 'gossip_p': 'float', 'outer_lr': 'float', 'outer_momentum': 'float',
}
SPEC_1GPU_KEYS = {'gpu': 'device', 'sock_data': 'int', 'batch_size': 'int',
                  'train_folder': 'data_path', 'val_folder': 'data_path'}
SPEC_2GPU_KEYS = {'gpu0': 'device', 'gpu1': 'device', 'gpus': 'device_list', 'sock_gpu': 'int',
                  'sock_data0': 'int', 'sock_data1': 'int', 'batch_size': 'int',
                  'train_folder': 'data_path', 'val_folder': 'data_path'}
SPECS = {'spec_1gpu.yaml': SPEC_1GPU_KEYS, 'spec_2gpu.yaml': SPEC_2GPU_KEYS}
DEVICE_KEYS = {'spec_1gpu.yaml': 'gpu', 'spec_2gpu.yaml': 'gpus (or gpu0 and gpu1)'}
# keys of the original that are accepted and do nothing here: (the original's default, why)
_PRIVATE_SOCKET = 'each loader talks to its trainer over a private ipc:// socket, not a port'
NO_EFFECT = {'lib_conv': ('cudnn', 'PyTorch chooses the convolution library'),
             'sock_data': (5001, _PRIVATE_SOCKET), 'sock_data0': (5001, _PRIVATE_SOCKET),
             'sock_data1': (5002, _PRIVATE_SOCKET)}
POSITIVE = ('n_epochs', 'batch_size', 'snapshot_freq', 'print_freq', 'exchange_freq',
            'keep_snapshots')
DATA_KEYS = ('train_folder', 'val_folder', 'label_folder', 'mean_file')   # preprocessing's output


class Config(dict):
    """The merged settings; sources: [(file or 'the command line', why it was read)];
    set_by: {key: the source that set it}."""
    sources = ()
    set_by = {}


class ConfigError(UserError):
    """A configuration problem; the message names the key or file and says what to do."""
    prefix = 'config error'
    exit_status = 2


def _read_yaml(path, why=''):
    """why: how the file came to be read, when the user did not name it."""
    name = f"{path!r}{f' ({why})' if why else ''}"
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {name} not found") from None
    except (OSError, UnicodeDecodeError) as e:      # a folder, no permission, binary
        raise ConfigError(f"cannot read config file {name}: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {name} is not valid yaml: "
                          f"{' '.join(str(e).split())}") from None   # one line
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {name} must hold 'key: value' lines")
    return data


def _find(name):
    """A config file in the current directory, else beside this module."""
    if os.path.isabs(name) or os.path.exists(name):
        return os.path.abspath(name)
    return os.path.join(ROOT, name)


def parse_device(value, key='gpu'):
    """'gpu0', 0, 'cuda:0', 'cpu' -> 'cuda:0' / 'cpu' (a string: torch is not imported here).
    The one device parser: the config, dual_mlp.py and the exchange all name devices so."""
    s = str(value).strip().lower()
    if s == 'cpu':
        return 'cpu'
    m = re.fullmatch(r'(?:gpu|cuda:?)?(\d+)', s)
    if m is None:
        raise ConfigError(f"{key}: {value!r} is not a device; use gpu0, 0, cuda:0 or cpu")
    return f'cuda:{int(m.group(1))}'


def resolve_device(value, key='gpu', cpu_hint=None):
    """The torch.device for a device name (or a torch.device; 'cuda' alone: the current GPU),
    checked against the GPUs this process can see. cpu_hint: how to ask for the CPU instead, in
    the caller's own words (default: key=cpu)."""
    import torch
    if str(value) == 'cuda':
        value = torch.cuda.current_device() if torch.cuda.is_available() else 0
    device = torch.device(parse_device(value, key))
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device} asked for, but no CUDA GPU is visible; use "
                              f"{cpu_hint or key + '=cpu'}")
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device} asked for, but only "
                              f"{torch.cuda.device_count()} GPU(s) are visible")
    return device


_NUMBER = re.compile(r'[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?')


def _check_type(key, kind, value):
    def bad(want):
        return ConfigError(f"{key}: {value!r} is not {want}")
    if isinstance(kind, tuple):
        if value not in kind:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(kind)}")
        return value
    if kind == 'bool':
        if not isinstance(value, bool):
            raise bad("True or False")
        return value
    if kind == 'bool_or_auto':
        if not isinstance(value, bool) and value != 'auto':
            raise bad("True, False or auto")
        return value
    if kind == 'int':
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a whole number")
        return value
    if kind == 'float':
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)     # YAML 1.1 reads 1e-3 and 1.0e6 as strings
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if kind == 'int_or_all':
        if value == 'all':
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a whole number or all")
        return value
    if kind == 'int_list':
        if isinstance(value, int) and not isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is a number, not a list of epochs: write "
                              f"{key}=[{value}] for one step after epoch {value}")
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int)
                                              for v in value):
            raise bad("a list of whole numbers, e.g. [20, 40]")
        return value
    if kind == 'data_path' and value is None:
        return None                  # not set: an error where the data is used
    if kind in ('str', 'path', 'data_path'):
        if not isinstance(value, str) or not value:
            raise bad("a non-empty string")
        return value
    if kind == 'device':
        return parse_device(value, key)
    if kind == 'device_list':
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise bad("a count of GPUs (at least 1), a GPU, or a list of them")
            return [f'cuda:{i}' for i in range(value)]     # a count: the first `value` GPUs
        if isinstance(value, str):
            return [parse_device(value, key)]               # one GPU: gpu2, cuda:2, cpu
        if not isinstance(value, list) or not value:
            raise bad("a count of GPUs (4), one GPU (gpu2) or a list ([0, 1, 2, 3]), or null")
        return [parse_device(v, key) for v in value]
    raise AssertionError(kind)


def parse_overrides(args):
    """Command-line words: 'key=value' (value read as yaml) or extra '*.yaml' files."""
    files, overrides = [], {}
    for a in args:
        if a.endswith(('.yaml', '.yml')) and os.path.isfile(a):   # 'sweep/lr=0.1/run.yaml' too
            files.append(a)
        elif '=' in a:
            k, v = a.split('=', 1)
            try:
                overrides[k.strip()] = yaml.safe_load(v) if v.strip() else ''
            except yaml.YAMLError:
                overrides[k.strip()] = v
        elif a.endswith(('.yaml', '.yml')):
            files.append(a)
        else:
            raise ConfigError(f"unexpected argument {a!r}: give settings as key=value "
                              f"(e.g. n_epochs=2) or a yaml file of them")
    return files, overrides


def command_line(spec, argv, usage):
    """load_config for a script's command line; -h or --help prints the script's usage and
    every setting (help_text), then exits with status 0."""
    if '-h' in argv or '--help' in argv:
        print(help_text(spec, usage))
        raise SystemExit(0)
    return load_config(spec, argv)


def help_text(spec, usage, config='config.yaml'):
    """usage, then every key of config.yaml and the spec file with its default and its comment
    there, in their groups: the yaml files are the one list of settings."""
    out = [usage.rstrip(), '', f"Settings: any key below as key=value on the command line, or "
           f"in a yaml file given as an argument; the defaults are those of {config} and {spec}."]
    for name in (config, spec):
        path = os.path.join(ROOT, name)
        here = _find(name)
        out += ['', f"{name} ({path}" + (f"; {here} is merged over it" if here != path else '')
                + "):"]
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError as e:
            out.append(f"  (cannot read it: {e.strerror or e})")
            continue
        last = None
        for line in lines:
            heading = re.fullmatch(r'#\s*--\s*(.+)', line.strip())
            entry = re.fullmatch(r'([A-Za-z_]\w*):\s*(.*?)\s*(?:#\s?(.*))?', line)
            if heading:
                out += ['', f"  {heading.group(1)}"]
                last = None
            elif entry:
                key, default, comment = entry.groups()
                last = f"    {key} = {default}"
                if len(last) > 34 and comment:     # a long value: its comment on the next line
                    out += [last, f"{'':35s}{comment}"]
                else:
                    out.append(f"{last:34s} {comment or ''}".rstrip())
            elif last is not None and re.fullmatch(r'\s+#.*', line):
                out.append(f"{'':35s}{line.strip()[1:].strip()}")
            else:
                last = None
    return '\n'.join(out + exchange_backends.help_lines())


def load_config(spec='spec_1gpu.yaml', argv=(), config='config.yaml'):
    """The merged, checked configuration: a Config (dict) of every key of config and spec."""
    schema = dict(CONFIG_KEYS, **SPECS[spec])
    other_keys = {k for name, keys in SPECS.items() if name != spec for k in keys} - set(schema)
    extra_files, overrides = parse_overrides(list(argv))
    cfg, origin, set_by, ignored = Config(), {}, {}, {}
    # the repository's files give every key its default; a config.yaml or spec file of the
    # same name in the current folder (the original's own, say) is merged over both of them
    layers = [(os.path.join(ROOT, name), 'the defaults') for name in (config, spec)]
    layers += [(_find(name), 'found in the current folder') for name in (config, spec)
               if _find(name) != os.path.join(ROOT, name)]
    layers += [(_find(f), 'named') for f in extra_files]
    layers.append((None, 'key=value'))
    sources = []
    for path, why in layers:
        src = path or 'the command line'
        data = overrides if path is None else _read_yaml(path, why if why != 'named' else '')
        if path is None and not data:
            continue
        sources.append((src, why))
        for k, v in data.items():
            if k in other_keys:
                ignored.setdefault(k, src)
                continue
            if k not in schema:
                close = difflib.get_close_matches(k, list(schema), n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                where = f"{src} ({why})" if why == 'found in the current folder' else src
                raise ConfigError(f"unknown key {k!r} in {where}{hint}")
            cfg[k] = v
            set_by[k] = src
            origin[k] = os.path.dirname(path) if path else os.getcwd()
    missing = [k for k in schema if k not in cfg]
    if missing:
        raise ConfigError(f"missing key(s) {', '.join(missing)}: add them to {config} or {spec}")
    for k, kind in schema.items():
        cfg[k] = _check_type(k, kind, cfg[k])
        if kind in ('path', 'data_path') and cfg[k] is not None:
            cfg[k] = os.path.normpath(os.path.join(origin[k], os.path.expanduser(cfg[k])))
    check_combination(cfg)
    for key, (default, why) in NO_EFFECT.items():
        if key in cfg and cfg[key] != default:
            print(f"notice: {key}={cfg[key]!r} has no effect ({why})", file=sys.stderr)
    if ignored:
        script = 'train.py' if spec == 'spec_1gpu.yaml' else 'train_2gpu.py'
        print(f"notice: {', '.join(f'{k} (in {src})' for k, src in ignored.items())} "
              f"ignored: {script} takes its devices from {DEVICE_KEYS[spec]}",
              file=sys.stderr)
    cfg.sources, cfg.set_by = sources, set_by
    return cfg


def require_data(cfg, keys):
    """The data keys a script needs must be set: the repository names no data of its own."""
    unset = [k for k in keys if cfg.get(k) is None]
    if unset:
        raise ConfigError(
            f"{', '.join(unset)} not set: point {'it' if len(unset) == 1 else 'them'} at your "
            f"preprocessing output (key=value or a yaml file; the quickstart's toy data: "
            f"spec_toy.yaml)")


def check_combination(cfg):
    """Refuse settings that make no sense together, saying why."""
    for k in POSITIVE:
        if k in cfg and cfg[k] != 'all' and cfg[k] < 1:
            raise ConfigError(f"{k}: {cfg[k]} must be at least 1")
    if cfg['prefetch'] < 2:
        raise ConfigError(f"prefetch: {cfg['prefetch']} must be at least 2 (one buffer trains "
                          f"while the loader fills another)")
    if cfg['use_nesterov_momentum'] and not cfg['use_momentum']:
        raise ConfigError("use_nesterov_momentum: True needs use_momentum: True")
    if cfg['learning_rate'] <= 0:
        raise ConfigError(f"learning_rate: {cfg['learning_rate']} must be positive")
    if cfg['lr_warmup_epochs'] < 0:
        raise ConfigError(f"lr_warmup_epochs: {cfg['lr_warmup_epochs']} must be 0 or more")
    if cfg['weight_decay'] < 0:
        raise ConfigError(f"weight_decay: {cfg['weight_decay']} must be 0 or more")
    if any(e < 1 for e in cfg['lr_step']):
        raise ConfigError(f"lr_step: {cfg['lr_step']} must hold epochs (1 or more)")
    if cfg['n_classes'] < 2:
        raise ConfigError(f"n_classes: {cfg['n_classes']} must be at least 2")
    if cfg['seed'] < 0:
        raise ConfigError(f"seed: {cfg['seed']} must be 0 or more")
    if cfg['load_epoch'] < 0:
        raise ConfigError(f"load_epoch: {cfg['load_epoch']} must be 0 or more")
    if not 0 <= cfg['momentum'] < 1:
        raise ConfigError(f"momentum: {cfg['momentum']} must be in [0, 1)")
    if cfg['average'] == 'gradients' and cfg['exchange_freq'] != 1:
        raise ConfigError("average: gradients needs exchange_freq: 1 (replicas that skip a "
                          "gradient average drift apart and are never pulled back together)")
    if cfg['average'] == 'gossip' and cfg['exchange_freq'] != 1:
        raise ConfigError("average: gossip draws after every step; exchange_freq must be 1 "
                          "(gossip_p sets how often a replica sends)")
    if not 0 < cfg['elastic_alpha'] <= 1:
        raise ConfigError(f"elastic_alpha: {cfg['elastic_alpha']} must be in (0, 1]")
    if not 0 <= cfg['gossip_p'] <= 1:
        raise ConfigError(f"gossip_p: {cfg['gossip_p']} must be a probability in [0, 1]")
    if cfg['outer_lr'] <= 0:
        raise ConfigError(f"outer_lr: {cfg['outer_lr']} must be positive")
    if not 0 <= cfg['outer_momentum'] < 1:
        raise ConfigError(f"outer_momentum: {cfg['outer_momentum']} must be in [0, 1)")
    if cfg['lr_step'] != sorted(cfg['lr_step']):
        raise ConfigError(f"lr_step: {cfg['lr_step']} must be increasing")
    devices = devices_of(cfg)
    if len(devices) > 1:
        problem = exchange_backends.run_problem(cfg['exchange'], cfg['average'],
                                                cfg['exchange_dtype'], devices)
        if problem:         # the backends' rules (exchange_backends): what they need and take
            raise ConfigError(problem)
        problem = exchange_backends.replicas_problem(cfg['average'], cfg['elastic_alpha'],
                                                     len(devices))
        if problem:
            raise ConfigError(problem)


def devices_of(cfg):
    """The device of each replica: gpu (1 GPU), or gpus / [gpu0, gpu1]."""
    if 'gpu' in cfg:
        return [cfg['gpu']]
    return cfg['gpus'] if cfg.get('gpus') else [cfg['gpu0'], cfg['gpu1']]
