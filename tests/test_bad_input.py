"""Bad input to the three callbacks: each case fails with a clear message (the fragment checked below says what went
wrong or what to do), and leaves nothing half-changed: `learn.model` is the same object with the same weights, every
`requires_grad` flag and train/eval mode as before, no hooks, `learn.opt` the same optimizer with the same
hyper-parameters, `learn.loss_func` the same object.

Each case is a function of the learner that does its set-up and returns the call that must fail (a callback whose
constructor refuses its arguments fails in the set-up already, before the learner is involved). A case that fails
with a misleading message would be marked `xfail(strict=True)` with the cause; none is today. A damaged snapshot file at
load time is checked by `test_snapshot_file_damaged`; BoostResNet without a validation set, where it needs none, by
`test_boost_without_validation_set`."""
import pytest, torch
from torch import nn
from fastai.data.core import DataLoaders
from fastai.losses import MSELossFlat, BCEWithLogitsLossFlat
from fastai.learner import Learner
from fastai.layers import ConvLayer, Flatten
from fastboost.boost import BoostResNetCallback
from fastboost.freezeout import FreezeOutCallback
from fastboost.snapshot import SnapshotEnsembleCallback
from _tiny import tiny_learner, tiny_dls, model_state, weights, max_diff

@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def dls(valid=True):
    "4 training batches of 16; a validation set of 32 images, or none (an empty one, as `valid_pct=0` gives)"
    return tiny_dls(n=64, n_valid=32 if valid else 0, bs=16)

def mlp_learner():
    "A plain MLP: no body/head split, no residual unit"
    m = nn.Sequential(Flatten(), nn.Linear(3*16*16, 32), nn.ReLU(), nn.Linear(32, 10))
    return Learner(dls(), m)

def vgg_learner():
    "A VGG-like `Sequential(body, head)` as `vision_learner` builds it, but a body of plain convolutions"
    body = nn.Sequential(ConvLayer(3, 8, stride=2), ConvLayer(8, 16, stride=2), ConvLayer(16, 32, stride=2))
    return Learner(dls(), nn.Sequential(body, nn.Sequential(nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(32, 10))))

def fit(learn, *cbs, n_epoch=1): return lambda: learn.fit(n_epoch, cbs=list(cbs))   # lr=None: fit keeps the optimizer's lr

def snapshot_fitted(learn):
    "A finished snapshot run (set-up): the selection calls below must fail without changing the learner"
    cb = SnapshotEnsembleCallback(n_cycles=2)
    learn.fit(2, cbs=cb)
    return cb

# id: (learner factory, case(learn) -> call that must fail, message fragment, xfail reason or None)
CASES = {
    # unsupported models
    'boost-mlp': (mlp_learner, lambda l: fit(l, BoostResNetCallback()), 'body and a head', None),
    'boost-vgg': (vgg_learner, lambda l: fit(l, BoostResNetCallback()), 'No residual unit', None),
    'freezeout-mlp': (mlp_learner, lambda l: fit(l, FreezeOutCallback(timing=False)), 'No residual unit', None),
    'freezeout-vgg': (vgg_learner, lambda l: fit(l, FreezeOutCallback(timing=False)), 'No residual unit', None),
    # two of our callbacks in one fit (they all own the learning rate, two of them the model)
    'boost+freezeout': (None, lambda l: fit(l, BoostResNetCallback(), FreezeOutCallback(timing=False), n_epoch=3),
                        'cannot run in the same fit as', None),
    'freezeout+snapshot': (None, lambda l: fit(l, FreezeOutCallback(timing=False), SnapshotEnsembleCallback(2), n_epoch=3),
                           'cannot run in the same fit as', None),
    'boost+snapshot': (None, lambda l: fit(l, BoostResNetCallback(), SnapshotEnsembleCallback(2), n_epoch=3),
                       'cannot run in the same fit as', None),
    'boost+boost': (None, lambda l: fit(l, BoostResNetCallback(), BoostResNetCallback(), n_epoch=3),
                    'cannot run in the same fit as another BoostResNetCallback', None),
    'freezeout+freezeout': (None, lambda l: fit(l, FreezeOutCallback(timing=False), FreezeOutCallback(timing=False), n_epoch=3),
                            'Two FreezeOutCallbacks', None),
    'snapshot+snapshot': (None, lambda l: fit(l, SnapshotEnsembleCallback(2), SnapshotEnsembleCallback(2), n_epoch=3),
                          'cannot run in the same fit as another SnapshotEnsembleCallback', None),
    # budgets too short: 4 iterations for 5 blocks / 5 cycles
    'boost-budget': (None, lambda l: fit(l, BoostResNetCallback()), 'cannot train 5 blocks', None),
    'freezeout-budget': (None, lambda l: fit(l, FreezeOutCallback(timing=False)), 'for 5 blocks', None),
    'snapshot-budget': (None, lambda l: fit(l, SnapshotEnsembleCallback(n_cycles=5)), 'cannot hold 5 cycles', None),
    # arguments out of range
    'freezeout-t0=0': (None, lambda l: fit(l, FreezeOutCallback(t0=0.)), 't0=0.0', None),
    'freezeout-t0=1.5': (None, lambda l: fit(l, FreezeOutCallback(t0=1.5)), 't0=1.5', None),
    'snapshot-n_cycles=0': (None, lambda l: fit(l, SnapshotEnsembleCallback(n_cycles=0)), 'n_cycles=0', None),
    # loss='boost' is multi-class boosting: not for regression or multi-label losses
    'boost-loss-mse': (lambda: tiny_learner(dls(), loss_func=MSELossFlat()),
                       lambda l: fit(l, BoostResNetCallback(loss='boost'), n_epoch=3), 'single-label classification', None),
    'boost-loss-bce': (lambda: tiny_learner(dls(), loss_func=BCEWithLogitsLossFlat()),
                       lambda l: fit(l, BoostResNetCallback(loss='boost'), n_epoch=3), 'single-label classification', None),
    # no validation set where one is needed
    'boost-plateau-no-valid': (lambda: tiny_learner(dls(valid=False)),
                               lambda l: fit(l, BoostResNetCallback(stop='plateau'), n_epoch=3), 'validation set', None),
    'snapshot-best-no-valid': (lambda: tiny_learner(dls(valid=False)),
                               lambda l: (lambda cb: lambda: cb.get_preds(dl=l.dls.train, last='best'))(snapshot_fitted(l)),
                               'validation set', None),
    'snapshot-report-no-valid': (lambda: tiny_learner(dls(valid=False)),
                                 lambda l: (lambda cb: lambda: cb.report)(snapshot_fitted(l)), 'validation set', None),
}

def params(cases):
    return [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=v[3])) if v[3] else k for k, v in cases.items()]

def state(learn):
    opt = learn.opt
    return dict(model=learn.model, loss_func=learn.loss_func, opt=opt, hypers=[dict(h) for h in opt.hypers],
                params=[[id(p) for p in g] for g in opt.param_lists], weights=weights(learn.model), **model_state(learn.model))

@pytest.mark.parametrize('case', params(CASES))
def test_bad_input(case):
    make, act, fragment, _ = CASES[case]
    learn = make() if make else tiny_learner(dls())
    learn.create_opt()
    call = None
    try: call = act(learn)
    except Exception as e: err = e   # the callback's constructor refused: also a clear failure
    before = state(learn)
    if call is not None:
        with pytest.raises(Exception) as ei: call()
        err = ei.value
    assert fragment in str(err), f"{type(err).__name__}: {err}"
    after = state(learn)
    assert after['model'] is before['model'] and after['loss_func'] is before['loss_func'] and after['opt'] is before['opt']
    assert max_diff(after.pop('weights'), before.pop('weights')) == 0
    for k in ('hypers', 'params', 'grads', 'modes', 'hooks'): assert after[k] == before[k], k

def test_boost_without_validation_set():
    "No validation set and no stop rule that needs one: the phase trains (shapes come from a training batch), validation numbers are NaN"
    learn = tiny_learner(dls(valid=False))
    w0 = weights(learn.model)
    for cache in (False, True):
        cb = BoostResNetCallback(cache=cache)
        learn.fit(5, 1e-2, cbs=cb)
        assert len(cb.report) == len(cb.blocks) and cb.report.valid_loss.isna().all() and cb.report.train_loss.notna().all()
    assert max_diff(weights(learn.model), w0) > 0

# A snapshot file that is missing, corrupt, cut short or written by another model at load time: the message names the
# file and what to do, and the learner's model keeps its weights (the snapshots are loaded into it in turn)
DAMAGE = {
    'missing': (lambda f: f.unlink(), 'is missing'),
    'corrupt': (lambda f: f.write_bytes(b'not a snapshot'), 'is corrupt or unreadable'),
    'truncated': (lambda f: f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2]), 'is corrupt or unreadable'),
    'other-model': (lambda f: torch.save(nn.Linear(2, 2).state_dict(), f), 'does not fit the trained model'),
}

@pytest.mark.parametrize('damage', list(DAMAGE))
def test_snapshot_file_damaged(tmp_path, damage):
    learn = tiny_learner(dls(), path=tmp_path)
    cb = SnapshotEnsembleCallback(n_cycles=2, save='disk')
    learn.fit(2, cbs=cb)
    f = cb.snapshots[0]['path']
    harm, fragment = DAMAGE[damage]
    harm(f)
    before = state(learn)
    for call in (lambda: cb.get_preds(), lambda: cb.ensemble(), lambda: cb.average_weights(), lambda: cb.report):
        with pytest.raises(Exception) as ei: call()
        assert fragment in str(ei.value) and str(f) in str(ei.value), f"{type(ei.value).__name__}: {ei.value}"
        assert 'which=' in str(ei.value)   # what to do: choose other snapshots (or train again)
    after = state(learn)
    assert after['model'] is before['model'] and max_diff(after['weights'], before['weights']) == 0
    assert len(cb.get_preds(which=[2])[0]) == 32   # the intact snapshot still predicts

def test_boost_loss_without_validation_set():
    "loss='boost' computes the paper's edges on the training set: every block trains, edge and alpha finite, with no validation set"
    import warnings
    no_valid = tiny_dls(n=64, n_valid=0, bs=16)
    for cache in (False, True):
        learn = tiny_learner(no_valid)
        cb = BoostResNetCallback(loss='boost', cache=cache)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            learn.fit(3, 1e-2, cbs=cb)
        assert not any('non-finite' in str(x.message) for x in w), [str(x.message) for x in w]
        r = cb.report
        assert len(r) == len(cb.blocks), f"stopped after {len(r)} of {len(cb.blocks)} blocks"
        assert r.edge.notna().all() and r.alpha.notna().all() and r.valid_edge.isna().all()
