"""Tiny learners and state probes shared by the reliability tests (test_interrupts, test_determinism, test_precision,
test_nan, test_distributed). Not a test file (leading underscore): pytest puts tests/ on sys.path, so `from _tiny import`."""
import torch
from torch import nn
from fastai.layers import ResBlock
from fastai.vision.models.xresnet import XResNet
from fastai.vision.learner import vision_learner
from fastboost.data import digits_tensors, tensor_dls
from fastboost.boost import BoostResNetCallback
from fastboost.freezeout import FreezeOutCallback
from fastboost.snapshot import SnapshotEnsembleCallback

def tiny(pretrained=False, **kw):
    "XResNet with one ResBlock per stage: 5 blocks (stem + 4 units), ~20k parameters"
    return XResNet(ResBlock, 1, [1,1,1,1], stem_szs=(8,16,64), widen=0.25, **kw)

_DATA = {}
def tiny_dls(n=128, n_valid=64, bs=32, size=16):
    "Digits at 16 px: 128 training images (4 batches of 32), 64 validation images (one batch)"
    key = (n, n_valid, bs, size)
    if key not in _DATA:
        xt, yt, xv, yv = digits_tensors(size)
        _DATA[key] = (xt[:n], yt[:n], xv[:n_valid], yv[:n_valid])
    xt, yt, xv, yv = _DATA[key]
    return tensor_dls(xt, yt, xv, yv, bs=bs, device='cpu', vocab=[str(i) for i in range(10)])

def tiny_learner(dls=None, **kw):
    "A `vision_learner` on `tiny` (pretrained=False), progress bar and logging off"
    dls = dls if dls is not None else tiny_dls()
    learn = vision_learner(dls, tiny, pretrained=False, n_out=dls.c, **kw)
    learn.remove_cb(learn.progress) if hasattr(learn, 'progress') else None
    learn.logger = lambda *a, **k: None
    return learn

# The three callbacks, configured for a 3-epoch fit of 4 iterations (12 iterations):
#  BoostResNet: stages of [3,3,2,2,2] iterations; FreezeOut (cubic, t0=0.8): blocks freeze at iterations [7,8,9,11,12];
#  snapshots: 2 cycles of 6 iterations. So at iteration 9 (epoch 2, batch 1) every callback is mid-way.
CBS = {
    'boost': lambda: BoostResNetCallback(),
    'freezeout': lambda: FreezeOutCallback(timing=False),
    'snapshot': lambda: SnapshotEnsembleCallback(n_cycles=2),
}

def model_state(model):
    "Everything a callback may change on the model and must put back: requires_grad, train/eval modes, hooks"
    hooks = {}
    for n, m in model.named_modules():
        for a in ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks'):
            d = getattr(m, a, None)
            if d: hooks[(n, a)] = len(d)
    for n, p in model.named_parameters():
        if getattr(p, '_backward_hooks', None): hooks[(n, 'param')] = len(p._backward_hooks)
    return dict(grads={n: p.requires_grad for n, p in model.named_parameters()},
                modes={n: m.training for n, m in model.named_modules()}, hooks=hooks)

def weights(model):
    "A detached copy of every parameter and buffer"
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

def max_diff(a, b):
    "Largest absolute difference between two state dicts of floats (ints compared exactly)"
    assert a.keys() == b.keys()
    d = 0.
    for k in a:
        if a[k].is_floating_point(): d = max(d, (a[k].float() - b[k].float()).abs().max().item())
        elif not torch.equal(a[k], b[k]): return float('inf')
    return d
