"""The exchange backends and their rules: the one table that the configuration checks, the
scripts (train_2gpu.py, dual_mlp.py), make_exchanger and --help all read.

    from alexnet_lib import exchange_backends as xb
    xb.NAMES                                     # ('p2p', 'nccl', 'gloo', 'host')
    xb.get('nccl').across_nodes                  # True
    xb.run_problem('p2p', 'weights', 'fp32', ['cpu', 'cpu'])   # one line saying why not, or ''

Each rule returns one line saying what is wrong and what to do instead, or '' when all is well;
the caller raises its own error (ConfigError, a usage error, ValueError). `say` turns a
backend's name into the caller's own words for choosing it ('exchange: host' in a config,
'--exchange host' on dual_mlp.py's command line).

Torch-free (config.py imports it): a backend's data plane is named by its module and class
and imported only when an exchanger is made (Backend.plane). Adding a backend: its plane class
(the interface is in exchange.py's docstring), one Backend entry here, its test in
tests/test_exchange.py (docs/design.md, "Adding an exchange backend").
"""
import dataclasses
import importlib

# how the replicas combine (the config key `average`): weights and momentum averaged after the
# step, or the gradients during the backward pass; or one of the rules of exchange_rules.py
# (elastic averaging, gossip, an outer optimizer)
AVERAGES = ('weights', 'gradients', 'elastic', 'gossip', 'outer')
# how the buffers travel (the config key `exchange_dtype`): float32, or bfloat16 (half the
# bytes; the buffers themselves stay float32)
WIRE_DTYPES = ('fp32', 'bf16')


@dataclasses.dataclass(frozen=True)
class Backend:
    """One exchange backend: what it needs, what it takes, and how to make its data plane."""
    name: str
    description: str       # one line: what moves the bytes
    needs_gpus: bool       # its buffers must be CUDA tensors
    across_nodes: bool     # False: every replica on one host
    averages: dict         # each average it takes -> the wire dtypes it takes for that average
    constructor: str       # 'module:Class' of its data plane, made as Class(ctl, device)
    fallback: str = ''     # the backend make_exchanger uses instead, with a warning, where this
                           # one cannot run (a CPU device, or the plane's unavailable() says
                           # why); '': that is an error
    fallback_when: str = ''    # where the fallback is used, in the user's words (for --help)
    nccl_group: bool = False   # its data travel in an NCCL process group beside the control one
    own_gpu: bool = False      # each replica needs a GPU of its own (NCCL refuses two ranks on
                               # one GPU); the others let replicas share one

    def plane_class(self):
        """The class of its data plane (its module imported now: torch comes with it)."""
        module, cls = self.constructor.split(':')
        return getattr(importlib.import_module(module), cls)

    def plane(self, ctl, device):
        """A new data plane of this backend."""
        return self.plane_class()(ctl, device)

    def wires(self):
        """Every wire dtype it takes, for some average."""
        return tuple(w for w in WIRE_DTYPES if any(w in ws for ws in self.averages.values()))


# the rank-order averages (p2p, host) have no point-to-point sends: no gossip
_RANK_ORDER = {a: ('fp32',) for a in AVERAGES if a != 'gossip'}
_COLLECTIVE = {**{a: ('fp32',) for a in AVERAGES}, 'gradients': ('fp32', 'bf16')}

BACKENDS = {b.name: b for b in (
    Backend('p2p', 'CUDA IPC handles and device-to-device peer copies, summed in rank order '
            '(the original)', needs_gpus=True, across_nodes=False, averages=_RANK_ORDER,
            constructor='alexnet_lib.exchange_p2p:P2P', fallback='host',
            fallback_when='the GPUs lack peer access'),
    Backend('nccl', 'NCCL all-reduce, averaging in the reduction; gradients travel while the '
            'backward pass runs', needs_gpus=True, across_nodes=True, averages=_COLLECTIVE,
            constructor='alexnet_lib.exchange:Nccl', nccl_group=True, own_gpu=True),
    Backend('gloo', 'torch.distributed all-reduce with gloo, through host memory',
            needs_gpus=False, across_nodes=True, averages=_COLLECTIVE,
            constructor='alexnet_lib.exchange:Gloo'),
    Backend('host', 'shared host-memory segments, summed in rank order (CPU runs)',
            needs_gpus=False, across_nodes=False, averages=_RANK_ORDER,
            constructor='alexnet_lib.exchange_rank_order:Host'),
)}
NAMES = tuple(BACKENDS)
ORIGINAL = 'p2p'           # the original's exchange (config.yaml's default)


def get(name):
    """The Backend called `name`; ValueError naming the known ones otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown exchange kind {name!r}: expected one of {', '.join(NAMES)}")
    return BACKENDS[name]


def _config_words(name):
    return f'exchange: {name}'


def _either(names, say):
    return ' or '.join(say(n) for n in names)


def cpu_alternatives(name):
    """What to use instead of `name` on the CPU: its fallback first, then the others that run
    there, in the table's order."""
    first = [get(name).fallback] if get(name).fallback else []
    return first + [n for n, b in BACKENDS.items() if not b.needs_gpus and n not in first]


def gpu_problem(name, devices, say=_config_words):
    """`name` needs GPUs and `devices` ('cpu', 'cuda:0', ...) include the CPU."""
    if get(name).needs_gpus and any(str(d) == 'cpu' for d in devices):
        return (f"{say(name)} needs GPUs, and {list(devices)} includes the CPU; use "
                f"{_either(cpu_alternatives(name), say)}")
    return ''


def average_problem(name, average, wire, say=_config_words):
    """`name` does not take this average, or not in this wire dtype."""
    b = get(name)
    if average not in b.averages:
        takers = [n for n, x in BACKENDS.items() if average in x.averages]
        return f"average: {average} needs {_either(takers, say)}, not {say(name)}"
    if wire not in b.averages[average]:
        pairs = [(n, a) for n, x in BACKENDS.items() for a, ws in x.averages.items() if wire in ws]
        avgs = ' or '.join(dict.fromkeys(a for _, a in pairs))
        names = ' or '.join(dict.fromkeys(n for n, _ in pairs))
        return (f"exchange_dtype: {wire} averages {avgs} through {names}; this run has "
                f"average: {average}, {say(name)}")
    return ''


def wire_problem(name, wire):
    """`name` takes `wire` for no average at all (Exchanger.average_'s own check)."""
    if wire in get(name).wires():
        return ''
    takers = [n for n, b in BACKENDS.items() if wire in b.wires()]
    return f"a {wire} average needs the {' or '.join(takers)} exchange, not {name}"


def node_problem(name, local_world, world, say=_config_words):
    """`name` works within one node and the replicas span several (local_world of world on
    this node, as torchrun's LOCAL_WORLD_SIZE and WORLD_SIZE say)."""
    if get(name).across_nodes or int(local_world) == int(world):
        return ''
    takers = [n for n, b in BACKENDS.items() if b.across_nodes]
    return (f"{say(name)} works within one node (LOCAL_WORLD_SIZE={local_world}, "
            f"WORLD_SIZE={world}); use {_either(takers, say)} across nodes")


def replicas_problem(average, elastic_alpha, replicas):
    """The rule cannot run with this many replicas: elastic moves the centre by elastic_alpha x
    replicas of its distance to their mean, so above 1 it overshoots the mean."""
    pull = elastic_alpha * replicas
    if average != 'elastic' or pull <= 1:
        return ''
    return (f"average: elastic with {replicas} replicas moves the centre by elastic_alpha x "
            f"replicas = {pull:g} of its distance to their mean, past it; set elastic_alpha to "
            f"at most {1 / replicas:g}")


def shared_gpu_problem(name, devices, say=_config_words):
    """`devices` name a GPU twice and `name` needs a GPU per replica."""
    gpus = [str(d) for d in devices if str(d) != 'cpu']
    if len(set(gpus)) == len(gpus) or not get(name).own_gpu:
        return ''
    takers = [n for n, b in BACKENDS.items() if not b.own_gpu]
    return (f"the GPU list {list(devices)} names a GPU twice, and {say(name)} needs a GPU per "
            f"replica; replicas can share a GPU through {_either(takers, say)}")


def run_problem(name, average, wire, devices, say=_config_words):
    """Every rule a run of several replicas on `devices` must pass: the first that fails."""
    return (average_problem(name, average, wire, say) or gpu_problem(name, devices, say)
            or shared_gpu_problem(name, devices, say))


def help_lines():
    """The table for --help, after the settings: each backend, what it needs and takes."""
    out = ['', 'Exchange backends (the key exchange; average and exchange_dtype as above):']
    for b in BACKENDS.values():
        takes = []
        for w in b.wires():
            avgs = ' or '.join(a for a, ws in b.averages.items() if w in ws)
            takes.append(f"{avgs} in {w}{' too' if takes else ''}")
        facts = (f"{'GPUs' if b.needs_gpus else 'CPU or GPUs'} on "
                 f"{'one node or several' if b.across_nodes else 'one node'}; {', '.join(takes)}"
                 + (f'; {b.fallback} where {b.fallback_when}' if b.fallback else ''))
        out += [f'  {b.name:5s} {b.description}', f"  {'':5s} {facts}"]
    return out
