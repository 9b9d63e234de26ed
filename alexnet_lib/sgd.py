"""The original update rule and learning-rate policies (docs/design.md), over flat buffers.

Weights W: g' = g + wd*W, step lr. Biases b: g' = g, step 2*lr, no weight decay.
momentum:  v <- mu*v - lr_eff*g';              w <- w + v
Nesterov:  v <- mu^2*v - (1+mu)*lr_eff*g';     w <- w + v
none:      w <- w - lr_eff*g'
Momentum stores the step itself, so a learning-rate change does not rescale it (unlike
torch.optim.SGD). The buffers hold every weight first, then every bias (alex_net's layout), so
each rule is a few whole-buffer operations.
"""
import torch


@torch.no_grad()
def sgd_update_(params, grad, momentum, lr, n_weights, mu, weight_decay, use_momentum=True,
                nesterov=False):
    """One update in place. params, grad, momentum: flat float32 buffers; the first n_weights
    elements are weights, the rest biases."""
    W, b = params[:n_weights], params[n_weights:]
    gW = grad[:n_weights].add(W, alpha=weight_decay)
    gb = grad[n_weights:]
    if not use_momentum:
        W.add_(gW, alpha=-lr)
        b.add_(gb, alpha=-2 * lr)
        return
    vW, vb = momentum[:n_weights], momentum[n_weights:]
    decay, scale = (mu * mu, 1 + mu) if nesterov else (mu, 1.0)
    vW.mul_(decay).add_(gW, alpha=-scale * lr)
    vb.mul_(decay).add_(gb, alpha=-scale * 2 * lr)
    W.add_(vW)
    b.add_(vb)


@torch.no_grad()
def sgd_step_(params, grad, momentum, lr, n_weights, mu, weight_decay, use_momentum=True,
              nesterov=False):
    """sgd_update_, then the gradient buffer zeroed for the next backward pass; compiled, the
    two are one pass over the buffers."""
    sgd_update_(params, grad, momentum, lr, n_weights, mu, weight_decay, use_momentum, nesterov)
    grad.zero_()


def adjust_learning_rate(cfg, epoch, lr, val_errors):
    """The lr for the epoch after ``epoch``. step: divide by 10 when epoch is in lr_step.
    auto: after epoch 5, divide by 10 when the val error of three epochs ago minus the current
    one is below lr_adapt_threshold (val_errors: one per epoch so far, the current one last)."""
    if cfg['lr_policy'] == 'step':
        if epoch in cfg['lr_step']:
            lr = lr / 10
    elif epoch > 5 and len(val_errors) >= 3:
        if val_errors[-3] - val_errors[-1] < cfg['lr_adapt_threshold']:
            lr = lr / 10
    return lr
