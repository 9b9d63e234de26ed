"""Scratch (not committed): which part of the compiled step breaks CUDA graph capture."""
import sys, time, traceback
import torch
from alexnet_lib.config import load_config
from alexnet_lib.loop import Replica
from alexnet_lib.data import dropout_masks
from alex_net import FIRST_FC, N_WEIGHTS
B = 256
cfg = load_config('spec_1gpu.yaml', ['gpu=cuda:0', f'batch_size={B}', 'compile=True', 'cuda_graph=False'])
rep = Replica(cfg)
dev = rep.device
g = torch.Generator(device=dev).manual_seed(0)
images = torch.randint(0, 256, (B, 256, 256, 3), dtype=torch.uint8, device=dev, generator=g)
labels = torch.randint(0, 1000, (B,), device=dev)
offs = torch.randint(0, 30, (B, 2), device=dev)
mirr = torch.rand(B, device=dev) < 0.5
masks = dropout_masks(1, B, 0, B, dev)
t = time.time()
for s in range(3):
    rep.step(images, labels, offs, mirr, masks, 0.01, s)
torch.cuda.synchronize(); print(f"warm-up {time.time()-t:.0f} s", flush=True)
net = rep.net
def fwd():
    return rep.features_fn(net.layer_params[:FIRST_FC], images, rep.mean, offs, mirr, rep.amp_dtype)
def fwd_cls():
    f = fwd(); cut = f.detach().requires_grad_()
    return rep.classifier_fn(net.layer_params[FIRST_FC:], cut, labels, masks, rep.amp_dtype)
def fwd_bwd():
    f = fwd(); cut = f.detach().requires_grad_()
    loss, err = rep.classifier_fn(net.layer_params[FIRST_FC:], cut, labels, masks, rep.amp_dtype)
    loss.backward(); f.backward(cut.grad); return loss
def upd():
    rep.update_fn(net.params, net.grad, net.momentum, 0.01, N_WEIGHTS, 0.9, 0.0005, True, False)
def whole():
    return rep.step(images, labels, offs, mirr, masks, 0.01, 5)
for name, fn in [('features', fwd), ('features+classifier', fwd_cls), ('fwd+bwd', fwd_bwd), ('update', upd), ('whole step', whole)]:
    for mode in ('global', 'thread_local', 'relaxed'):
        try:
            gr = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(gr, capture_error_mode=mode):
                fn()
            gr.replay(); torch.cuda.synchronize()
            print(f"{name:22s} {mode:12s} OK", flush=True)
        except Exception as e:
            print(f"{name:22s} {mode:12s} FAILED {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
            tb = traceback.format_exc().splitlines()
            print('   ', ' | '.join(l.strip() for l in tb[-12:-6])[:700], flush=True)
            torch.cuda.synchronize()
