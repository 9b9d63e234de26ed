"""The exchange rules (exchange_rules.py: elastic, gossip, outer) with real processes exchanging
through gloo (and host where the rule takes it), 2 and 4 replicas.

Each replica makes its own deterministic local change to its weights and momentum before every
step's exchange; each rule's result after several exchanges, in every replica and in the rule's
shared state, equals a NumPy reference of the update written from the papers' definitions (EASGD:
Zhang, Choromanska and LeCun 2015, the synchronous rule; GoSGD: Blot et al. 2016, messages merged
one at a time; DiLoCo's outer Nesterov step: Douillard et al. 2023), in float64, within float32
rounding. outer with outer_lr 1 and outer_momentum 0 is bit for bit the every-step average of
weights and momentum; gossip with gossip_p 0 changes nothing. The real training loop runs the
rules in tests/test_multi.py.

Workers are module-level functions: spawned processes import this module by name.
"""
import numpy as np
import pytest

from alexnet_lib import launch

N = 1003                       # elements of a replica's weights (and of its momentum)
STEPS = 12
SEED = 1234
GOSSIP_STREAM = 0x905519       # the gossip draws' stream, as docs/exchange_rules.md states it
CASES = (('elastic', dict(every=3, elastic_alpha=0.2)), ('gossip', dict(gossip_p=0.5)),
         ('outer', dict(every=4, outer_lr=0.7, outer_momentum=0.9)))


def local_change(rank, step):
    """What replica `rank`'s step `step` does to its weights and momentum (float32)."""
    rng = np.random.default_rng([rank, step, 99])
    return (rng.normal(0, 0.01, N).astype(np.float32),
            rng.normal(0, 0.001, N).astype(np.float32))


def start_state():
    rng = np.random.default_rng(5)
    return rng.normal(0, 0.1, N).astype(np.float32), np.zeros(N, np.float32)


# -- the references: every replica at once, float64 --------------------------------------------

def elastic_exchange(x, centre, alpha):
    """EASGD's synchronous exchange: each x_i moves alpha (x_i - c) towards the centre, the centre
    alpha * sum_i (x_i - c) towards them, all of the values before it."""
    diffs = [xi - centre for xi in x]
    return [xi - alpha * d for xi, d in zip(x, diffs)], centre + alpha * sum(diffs)


def gossip_draws(world, p, epoch, step, seed=SEED):
    """Who sends after step `step` of `epoch`, and to whom (docs/exchange_rules.md)."""
    rng = np.random.default_rng([seed, epoch, step, GOSSIP_STREAM])
    u = rng.random(world)
    other = rng.integers(world - 1, size=world)
    return [(s, int(other[s] + (other[s] >= s))) for s in range(world) if u[s] < p]


def gossip_round(x, a, pushes):
    """GoSGD: every sender halves its mixing weight and pushes (x_s, a_s) to its target; then
    each receiver merges its messages one at a time, weighted."""
    x, a = list(x), list(a)
    queues = {j: [] for j in range(len(x))}
    for s, target in pushes:
        a[s] /= 2
        queues[target].append((x[s].copy(), a[s]))
    for j, messages in queues.items():
        for xs, as_ in messages:
            x[j] = (a[j] * x[j] + as_ * xs) / (a[j] + as_)
            a[j] += as_
    return x, a


def outer_exchange(x, v, theta, m, outer_lr, mu):
    """The outer step: the outer gradient theta - mean(x), Nesterov SGD on theta; replicas
    restart from theta with the mean momentum."""
    delta = theta - sum(x) / len(x)
    m = mu * m + delta
    theta = theta - outer_lr * (delta + mu * m)
    return [theta.copy() for _ in x], [sum(v) / len(v) for _ in v], theta, m


def simulate(world, average, kw):
    """Every replica's STEPS local changes, the rule's exchanges between them."""
    x0, v0 = start_state()
    x = [x0.astype(np.float64) for _ in range(world)]
    v = [v0.astype(np.float64) for _ in range(world)]
    centre, a = x0.astype(np.float64), [1.0 / world] * world
    theta, m = x0.astype(np.float64), np.zeros(N)
    for t in range(STEPS):
        for r in range(world):
            dx, dv = local_change(r, t)
            x[r] = x[r] + dx
            v[r] = v[r] + dv
        if average == 'gossip':
            x, a = gossip_round(x, a, gossip_draws(world, kw['gossip_p'], 1, t))
        elif (t + 1) % kw['every']:
            continue
        elif average == 'elastic':
            x, centre = elastic_exchange(x, centre, kw['elastic_alpha'])
        else:
            x, v, theta, m = outer_exchange(x, v, theta, m, kw['outer_lr'], kw['outer_momentum'])
    shared = {'elastic': {'centre': centre}, 'gossip': {'mixing_weights': np.array(a)},
              'outer': {'weights': theta, 'momentum': m}}[average]
    return x, v, shared


# -- the workers ---------------------------------------------------------------------------------

class Buffers:
    """A network's flat buffers as the rules see them: state = params then momentum."""

    def __init__(self, torch):
        x0, v0 = start_state()
        self.state = torch.from_numpy(np.concatenate([x0, v0]))
        self.params, self.momentum = self.state[:N], self.state[N:]


def _rule(average, net, ex, **kw):
    from alexnet_lib.exchange_rules import make_rule
    args = dict(seed=SEED, every=1, elastic_alpha=0.5, gossip_p=0.0, outer_lr=1.0,
                outer_momentum=0.0)
    args.update(kw)
    return make_rule(average, net, ex, **args)


def _run(rule, net, rank, torch):
    for t in range(STEPS):
        dx, dv = local_change(rank, t)
        net.params.add_(torch.from_numpy(dx))
        net.momentum.add_(torch.from_numpy(dv))
        rule.after_step(1, t)


def _close(got, want, what):
    got = np.asarray(got, np.float64)
    scale = np.abs(want).max()
    err = np.abs(got - want).max()
    assert err <= 1e-5 * scale, f'{what}: max |error| {err:.3g} of {scale:.3g}'


def _w_rules(rank, world, port, backends):
    import torch
    from alexnet_lib import exchange
    torch.set_num_threads(1)
    for backend in backends:
        ex = exchange.make_exchanger(backend, rank, world, 'cpu', port=port, timeout=30.0)
        port += 1
        try:
            for average, kw in CASES:
                if average == 'gossip' and backend == 'host':
                    continue
                net = Buffers(torch)
                rule = _rule(average, net, ex, **kw)
                _run(rule, net, rank, torch)
                x, v, shared = simulate(world, average, kw)
                where = f'{average} over {backend}, {world} replicas, rank {rank}'
                _close(net.params.numpy(), x[rank], f'{where}: weights')
                _close(net.momentum.numpy(), v[rank], f'{where}: momentum')
                for name, t in rule.shared_state().items():
                    _close(t.numpy(), shared[name], f'{where}: {name}')
                with rule.result():          # the model: the centre, the mixed or outer weights
                    model = net.params.numpy().copy()
                want = {'elastic': lambda: shared['centre'], 'outer': lambda: shared['weights'],
                        'gossip': lambda: sum(a * xi for a, xi in
                                              zip(shared['mixing_weights'], x))}[average]()
                _close(model, want, f'{where}: its model')
                _close(net.params.numpy(), x[rank], f'{where}: weights after the model')
            # outer_lr 1, outer_momentum 0 every 2 steps: the every-step average, bit for bit
            net, plain = Buffers(torch), Buffers(torch)
            rule = _rule('outer', net, ex, every=2)
            for t in range(STEPS):
                for b in (net, plain):
                    dx, dv = local_change(rank, t)
                    b.params.add_(torch.from_numpy(dx))
                    b.momentum.add_(torch.from_numpy(dv))
                rule.after_step(1, t)
                if (t + 1) % 2 == 0:
                    ex.average_(plain.state)
                assert torch.equal(net.state, plain.state), f'outer(1, 0) step {t} over {backend}'
            # gossip_p 0: every replica trains as if alone
            if backend != 'host':
                net = Buffers(torch)
                rule = _rule('gossip', net, ex, gossip_p=0.0)
                _run(rule, net, rank, torch)
                alone = Buffers(torch)
                for t in range(STEPS):
                    dx, dv = local_change(rank, t)
                    alone.params.add_(torch.from_numpy(dx))
                    alone.momentum.add_(torch.from_numpy(dv))
                assert torch.equal(net.state, alone.state)
                assert rule.shared_state()['mixing_weights'].tolist() == [1 / world] * world
        finally:
            ex.close()


@pytest.mark.parametrize('world', [2, 4])
def test_rules_equal_their_references(world):
    launch.spawn(_w_rules, world, args=(launch.free_port(), ('gloo', 'host')), timeout=180)


def test_reference_rules_move_replicas():
    """The references are not trivially equal to doing nothing: each rule moved every replica
    away from where local steps alone take it, and gossip sent some messages."""
    alone = [sum(local_change(r, t)[0].astype(np.float64) for t in range(STEPS))
             + start_state()[0] for r in range(2)]
    for average, kw in CASES:
        x, _, shared = simulate(2, average, kw)
        assert all(np.abs(xi - ai).max() > 1e-3 for xi, ai in zip(x, alone)), average
    weights = simulate(4, 'gossip', {'gossip_p': 0.5})[2]['mixing_weights']
    assert weights.sum() == pytest.approx(1) and len(set(weights.tolist())) > 1
