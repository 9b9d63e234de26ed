"""The original update rule and learning-rate policies (docs/design.md), over flat buffers.

Weights W: g' = g + wd*W, step lr. Biases b: g' = g, step 2*lr, no weight decay.
momentum:  v <- mu*v - lr_eff*g';              w <- w + v
Nesterov:  v <- mu^2*v - (1+mu)*lr_eff*g';     w <- w + v
none:      w <- w - lr_eff*g'
Momentum stores the step itself, so a learning-rate change does not rescale it (unlike
torch.optim.SGD). The learning rate of each epoch comes from a policy (adjust_learning_rate),
that of each step from it and the warm-up (warmup_factor): a new per-step schedule is a function
here and a config key. The buffers hold every weight first, then every bias (alex_net's layout), so
each rule is a few whole-buffer operations.
"""
import torch


@torch.no_grad()
def sgd_update_(params, grad, momentum, lr, n_weights, mu, weight_decay, use_momentum=True,
                nesterov=False):
    """One update in place. params, grad, momentum: flat float32 buffers; the first n_weights
    elements are weights, the rest biases. lr: a number or a 0-d float32 tensor on the buffers'
    device (a tensor: compiled code and CUDA graphs take any rate without recompiling)."""
    if not torch.is_tensor(lr):
        lr = torch.tensor(lr, dtype=torch.float32, device=params.device)
    W, b = params[:n_weights], params[n_weights:]
    gW = grad[:n_weights].add(W, alpha=weight_decay)
    gb = grad[n_weights:]
    if not use_momentum:
        W.addcmul_(gW, lr, value=-1)
        b.addcmul_(gb, lr, value=-2)
        return
    vW, vb = momentum[:n_weights], momentum[n_weights:]
    decay, scale = (mu * mu, 1 + mu) if nesterov else (mu, 1.0)
    vW.mul_(decay).addcmul_(gW, lr, value=-scale)
    vb.mul_(decay).addcmul_(gb, lr, value=-scale * 2)
    W.add_(vW)
    b.add_(vb)


@torch.no_grad()
def sgd_step_(params, grad, momentum, lr, n_weights, mu, weight_decay, use_momentum=True,
              nesterov=False, written=(0, 0)):
    """sgd_update_, then the gradient buffer zeroed for the next backward pass to add into,
    except grad[written[0]:written[1]], which the next backward pass writes (it is left as it
    is: zeroing it would be a pass over it for nothing)."""
    sgd_update_(params, grad, momentum, lr, n_weights, mu, weight_decay, use_momentum, nesterov)
    grad[:written[0]].zero_()
    grad[written[1]:].zero_()


def warmup_factor(iteration, warmup_iterations):
    """Linear warm-up (Goyal et al. 2017, for large global batches): iteration i (0-based,
    counted from the run's first step) trains at (i + 1) / n of the scheduled rate for the
    first n iterations, then at the rate itself."""
    if iteration >= warmup_iterations:
        return 1.0
    return (iteration + 1) / warmup_iterations


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
