"""Exchange rules beyond every-step averaging: how replicas that train apart combine their
weights (the config key `average`; docs/exchange_rules.md states each rule, its choices and its
cost). The run calls a rule after each step's update:

    rule = make_rule('elastic', net, exchanger, seed=1234, every=10, elastic_alpha=0.5)
    rule.after_step(epoch, step)       # step: its index in the epoch
    with rule.result():                # net.params hold the run's model while inside
        validate(); save_snapshot()
    rule.shared_state()                # {name: tensor}, the same on every replica: snapshots

elastic  every `every` steps each replica moves elastic_alpha of the way to a centre, and the
         centre by elastic_alpha times the sum of the replicas' distances to it (EASGD, Zhang,
         Choromanska and LeCun 2015, synchronous form); the model is the centre.
gossip   after each step a replica sends, with probability gossip_p, its weights and half its
         mixing weight to a random other replica, which merges them weighted (GoSGD, Blot et al.
         2016); the draws come from (seed, epoch, step), the same on every replica, so every
         replica knows every mixing weight; the model is the mixing-weighted mean.
outer    every `every` steps the replicas' mean change since the last exchange is applied to
         the shared weights by SGD with outer_lr and Nesterov outer_momentum (the outer step of
         DiLoCo, Douillard et al. 2023); replicas restart from the result, their momentum
         averaged. outer_lr 1, outer_momentum 0 is average: weights.

Momentum stays each replica's own under elastic and gossip. Replicas differ between exchanges,
so a snapshot holds each replica's weights and momentum (loop.py) besides shared_state().
"""
import contextlib

import numpy as np
import torch

GOSSIP_STREAM = 0x905519      # the gossip draws' own stream beside the data's draws


class Rule:
    """A rule's defaults: nothing shared, the replica's own weights are the model."""
    name = ''

    def __init__(self, net, exchanger):
        self.params, self.momentum, self.state = net.params, net.momentum, net.state
        self.exchanger = exchanger
        self.rank, self.world = exchanger.rank, exchanger.world

    def after_step(self, epoch, step):
        raise NotImplementedError

    def model(self):
        """The run's model (a tensor like params): what is validated and snapshotted."""
        return self.params

    @contextlib.contextmanager
    def result(self):
        """net.params hold model() inside; the replica's own weights come back after."""
        model = self.model()
        if model is self.params:
            yield
            return
        own = self.params.clone()
        self.params.copy_(model)
        try:
            yield
        finally:
            self.params.copy_(own)

    def shared_state(self):
        """{name: tensor}: what the rule holds beyond the replicas, the same on every one."""
        return {}


class Elastic(Rule):
    name = 'elastic'

    def __init__(self, net, exchanger, every, alpha):
        super().__init__(net, exchanger)
        self.every, self.alpha = every, alpha
        self.centre = self.params.clone()        # the replicas start at the centre
        self.mean = torch.empty_like(self.params)

    def after_step(self, epoch, step):
        if (step + 1) % self.every:
            return
        self.mean.copy_(self.params)
        self.exchanger.average_(self.mean)
        # x_i <- x_i - alpha (x_i - c);  c <- c + alpha * sum_i (x_i - c), both of the old values
        self.params.lerp_(self.centre, self.alpha)
        self.centre.lerp_(self.mean, self.alpha * self.world)

    def model(self):
        return self.centre

    def shared_state(self):
        return {'centre': self.centre}


class Gossip(Rule):
    name = 'gossip'

    def __init__(self, net, exchanger, seed, p):
        super().__init__(net, exchanger)
        self.seed, self.p = seed, p
        # every replica's mixing weight, kept alike by every replica from the shared draws
        self.weights = torch.full((self.world,), 1 / self.world, dtype=torch.float64)
        self.inbox = []
        self.mixed = torch.empty_like(self.params)

    def draws(self, epoch, step):
        """(sends, target): whether each replica sends after this step, and to whom."""
        rng = np.random.default_rng([self.seed, epoch, step, GOSSIP_STREAM])
        sends = rng.random(self.world) < self.p
        other = rng.integers(self.world - 1, size=self.world)
        return sends, other + (other >= np.arange(self.world))

    def after_step(self, epoch, step):
        sends, target = self.draws(epoch, step)
        if not sends.any():
            return
        senders = np.flatnonzero(sends)
        self.weights[senders] /= 2               # a sender keeps half its weight, sends half
        me = self.rank
        mine = [int(s) for s in senders if target[s] == me]
        while len(self.inbox) < len(mine):
            self.inbox.append(torch.empty_like(self.params))
        self.exchanger.send_recv_([(int(target[me]), self.params)] if sends[me] else [],
                                  list(zip(mine, self.inbox)))
        # receivers merge what they got, weighted (a receiver that sent merges its own
        # weights as they were sent)
        new = self.weights.clone()
        for s in senders:
            new[target[s]] += self.weights[s]
        if mine:
            total = float(new[me])
            self.params.mul_(float(self.weights[me]) / total)
            for s, got in zip(mine, self.inbox):
                self.params.add_(got, alpha=float(self.weights[s]) / total)
        self.weights = new

    def model(self):
        # sum_r w_r x_r (the weights sum to 1): the mean of w_r * world * x_r
        self.mixed.copy_(self.params).mul_(float(self.weights[self.rank]) * self.world)
        self.exchanger.average_(self.mixed)
        return self.mixed

    def shared_state(self):
        return {'mixing_weights': self.weights}


class Outer(Rule):
    name = 'outer'

    def __init__(self, net, exchanger, every, lr, momentum):
        super().__init__(net, exchanger)
        self.every, self.lr, self.mu = every, lr, momentum
        self.shared = self.params.clone()
        self.outer_momentum = torch.zeros_like(self.params)
        self.change = torch.empty_like(self.params)

    def after_step(self, epoch, step):
        if (step + 1) % self.every:
            return
        self.exchanger.average_(self.state)      # weights and momentum, as average: weights
        # the outer gradient: shared - mean; m <- mu m + d; shared <- shared - lr (d + mu m),
        # written as mean + (1 - lr) d - lr mu m: the mean itself when lr is 1 and mu 0
        d = torch.sub(self.shared, self.params, out=self.change)
        self.outer_momentum.mul_(self.mu).add_(d)
        self.shared.copy_(self.params).add_(d, alpha=1 - self.lr)
        self.shared.add_(self.outer_momentum, alpha=-self.lr * self.mu)
        self.params.copy_(self.shared)

    def model(self):
        return self.shared

    def shared_state(self):
        return {'weights': self.shared, 'momentum': self.outer_momentum}


def make_rule(average, net, exchanger, *, seed, every, elastic_alpha, gossip_p, outer_lr,
              outer_momentum):
    """The rule object for `average` (elastic, gossip or outer), else None (weights and
    gradients are the training step's own)."""
    if average == 'elastic':
        return Elastic(net, exchanger, every, elastic_alpha)
    if average == 'gossip':
        return Gossip(net, exchanger, seed, gossip_p)
    if average == 'outer':
        return Outer(net, exchanger, every, outer_lr, outer_momentum)
    return None
