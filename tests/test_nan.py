"""A NaN loss at iteration 9 of 12. By then BoostResNet has completed blocks 0-2, FreezeOut has frozen blocks 0-2 and
the snapshot callback has taken snapshot 1. The NaN batch's optimizer step makes the trained weights NaN (fastai steps
before `after_batch`), so what must survive is what was finished: those blocks and that snapshot.

- with fastai's `TerminateOnNaNCallback` (raises CancelFitException in after_batch): the fit ends cleanly, the learner
  is restored, the finished blocks/snapshots are intact (passes for all three);
- without it: does each callback stop by itself and keep only finite results? (documented gap, xfail)"""
import pytest, torch
from fastai.callback.core import Callback
from fastai.callback.tracker import TerminateOnNaNCallback
from fastboost.blocks import body_blocks
from _tiny import tiny_learner, tiny_dls, CBS, model_state

@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

NAN_AT = 9           # iteration index of the NaN loss (the 10th of 12)
DONE = [0, 1, 2]     # blocks finished (BoostResNet) / frozen (FreezeOut) before it

class NaNLoss:
    "The learner's loss, NaN at training call NAN_AT (calls with grad enabled: not validation)"
    def __init__(self, loss): self.loss, self.n = loss, 0
    def __call__(self, *args):
        l = self.loss(*args)
        if torch.is_grad_enabled():
            self.n += 1
            if self.n == NAN_AT + 1: l = l * float('nan')
        return l
    def __getattr__(self, k):
        if k in ('loss', 'n'): raise AttributeError(k)
        return getattr(self.loss, k)

class BlockCopy(Callback):
    "Copy of every block's weights just before the NaN batch (after FreezeOut froze its blocks for that batch)"
    order = 100
    def before_batch(self):
        if self.training and self.train_iter == NAN_AT:
            self.saved = [{k: v.detach().clone() for k, v in b.state_dict().items()} for b in self.blocks]

def run(name, terminate):
    learn = tiny_learner(tiny_dls(n=64, n_valid=32, bs=16))
    learn.loss_func = NaNLoss(learn.loss_func)
    model, before = learn.model, model_state(learn.model)
    copy = BlockCopy(); copy.blocks = body_blocks(model)
    cb = CBS[name]()
    learn.fit(3, 1e-2, cbs=[cb, copy] + ([TerminateOnNaNCallback()] if terminate else []))
    return learn, cb, copy, model, before

def finished_intact(name, cb, copy):
    "The finished blocks equal their state before the NaN batch; the snapshots kept are finite"
    if name in ('boost', 'freezeout'):
        for i in DONE:
            now = copy.blocks[i].state_dict()
            assert all(torch.equal(now[k], v) for k, v in copy.saved[i].items()), f"block {i} changed after the NaN"
    if name == 'boost':
        assert len(cb.records) >= len(DONE)
        for r in cb.records[:len(DONE)]: assert all(r[c] == r[c] for c in ('train_loss', 'valid_loss')), r   # not NaN
    if name == 'snapshot':
        assert [s['cycle'] for s in cb.snapshots][:1] == [1]
        for s in cb.snapshots:
            sd = cb.load_snapshot(s['cycle'])
            assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()), f"snapshot {s['cycle']} has NaN weights"

@pytest.mark.parametrize('name', list(CBS))
def test_nan_with_terminate_on_nan(name):
    learn, cb, copy, model, before = run(name, terminate=True)
    assert learn.train_iter == NAN_AT + 1   # stopped right after the NaN batch
    assert learn.model is model and model_state(model)['grads'] == before['grads']
    finished_intact(name, cb, copy)
    if name == 'snapshot':
        p, _ = cb.get_preds()   # the ensemble of the finished snapshots still predicts
        assert torch.isfinite(p).all()

NAN_GAPS = {   # callbacks that do not check the loss yet: without TerminateOnNaNCallback the fit runs on NaN weights
}

# Where each callback stops (learn.train_iter): right after the NaN batch, except FreezeOut, which checks the weights
# (not the loss) at each freeze event and epoch end: no device sync per batch, the same answer on every DDP rank, and no
# false alarm when a mixed-precision GradScaler skips an inf step. Here that is block 3's freeze, at iteration 11.
STOP_AT = {'freezeout': 11}

@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=NAN_GAPS[n])) if n in NAN_GAPS else n
                                  for n in CBS])
def test_nan_stops_without_terminate_on_nan(name, recwarn):
    learn, cb, copy, model, before = run(name, terminate=False)
    assert learn.model is model and model_state(model)['grads'] == before['grads']
    finished_intact(name, cb, copy)
    stop = STOP_AT.get(name, NAN_AT + 1)
    assert learn.train_iter == stop, f"the fit went on for {learn.train_iter - stop} iterations after the NaN"
    if name == 'freezeout':   # block 3 (due at iteration 11) was not frozen with NaN weights; the warning says why it stopped
        assert cb.n_frozen == len(DONE)
        assert any('NaN or infinite' in str(w.message) for w in recwarn), [str(w.message) for w in recwarn]
