"""Interrupting a fit at any event, with any exception, leaves the learner as it was: the user's model object, every
`requires_grad` flag, uniform train/eval modes as fastai alone leaves them (`model.train()` in before_train,
`model.eval()` in before_validate: no block left behind in another mode), no hooks, the loss function and an
optimizer over the whole model; a following `fit` trains every parameter and `get_preds` works.

3 callbacks x 5 places (before_batch / after_backward / after_batch at iteration 9 of 12, after_epoch of epoch 1,
the loss function) x 4 exceptions, with the callback passed to `fit(cbs=...)` (how the `fit_*` helpers pass it)."""
import pytest, torch
from fastai.callback.core import Callback, CancelFitException, CancelEpochException
from _tiny import tiny_learner, tiny_dls, CBS, model_state

@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)   # tiny models: threads only add contention
    yield
    torch.set_num_threads(n)

EXCS = [CancelFitException, CancelEpochException, KeyboardInterrupt, RuntimeError]
EVENTS = ['before_batch', 'after_backward', 'after_batch', 'after_epoch', 'loss']
AT = (2, 1)   # (epoch, batch): the 10th of 12 training iterations (index 9)

class Raiser(Callback):
    "Raise `exc` once at `event`: at training batch `AT` for batch events, at the end of epoch 1 for after_epoch"
    order = 100   # after the library's callbacks and fastai's (Recorder 50, ProgressCallback 60)
    def __init__(self, event, exc): self.event, self.exc, self.fired = event, exc, False
    def _maybe(self, name):
        if name != self.event or self.fired: return
        if name == 'after_epoch': hit = self.learn.epoch == 1
        else: hit = self.learn.training and (self.learn.epoch, self.learn.iter) == AT
        if hit: self.fired = True; raise self.exc(f"test interrupt at {name}")
    def before_batch(self): self._maybe('before_batch')
    def after_backward(self): self._maybe('after_backward')
    def after_batch(self): self._maybe('after_batch')
    def after_epoch(self): self._maybe('after_epoch')

class RaisingLoss:
    "The learner's loss, raising `exc` once at the 10th training call (with grad enabled, so not in validation)"
    def __init__(self, loss, exc): self.loss, self.exc, self.n, self.fired = loss, exc, 0, False
    def __call__(self, *args):
        if torch.is_grad_enabled() and not self.fired:
            self.n += 1
            if self.n == 10: self.fired = True; raise self.exc("test interrupt in the loss")
        return self.loss(*args)
    def __getattr__(self, k):
        if k in ('loss', 'exc', 'n', 'fired'): raise AttributeError(k)
        return getattr(self.loss, k)   # activation, decodes: get_preds

def run_interrupted(name, event, exc, persistent=False):
    "A 3-epoch fit of callback `name`, interrupted at `event` with `exc`: (learner, callback, state before the fit)"
    learn = tiny_learner(tiny_dls(n=64, n_valid=32, bs=16))   # 4 training batches, 1 validation batch
    if event == 'loss': learn.loss_func = RaisingLoss(learn.loss_func, exc)
    model, loss_func = learn.model, learn.loss_func
    before = model_state(model)
    assert not before['hooks']   # modes are mixed here: vision_learner leaves the body in eval mode (dummy_eval)
    cb, raiser = CBS[name](), Raiser(event, exc)
    if persistent: learn.add_cb(cb)
    try: learn.fit(3, 1e-2, cbs=[raiser] if persistent else [cb, raiser])
    except exc: pass
    fired = learn.loss_func.fired if event == 'loss' else raiser.fired
    assert fired, "the interrupt did not happen: the test tests nothing"
    return learn, cb, before, model, loss_func

def check_restored(learn, before, model, loss_func):
    assert learn.model is model, f"learn.model is a {type(learn.model).__name__}, not the user's model"
    assert learn.loss_func is loss_func
    after = model_state(model)
    assert after['grads'] == before['grads'], [n for n, g in after['grads'].items() if g != before['grads'][n]][:5]
    assert not after['hooks'], after['hooks']
    # either as before the fit, or uniform as fastai alone leaves them: no block left behind in eval (or train) mode
    odd = [n for n, t in after['modes'].items() if t != model.training]
    assert after['modes'] == before['modes'] or not odd, \
        f"modules in {'eval' if model.training else 'train'} mode inside a {'train' if model.training else 'eval'}-mode model: {odd[:5]}"
    in_opt = {id(p) for p in learn.opt.all_params().itemgot(0)}
    assert all(id(p) in in_opt for p in model.parameters()), "the optimizer lost some of the model's parameters"

def check_usable(learn, model):
    "A plain fit trains every parameter; get_preds works"
    if isinstance(learn.loss_func, RaisingLoss): learn.loss_func = learn.loss_func.loss
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    learn.fit(1, 1e-2)
    same = [n for n, p in model.named_parameters() if torch.equal(p.detach(), w0[n])]
    assert not same, f"parameters not trained by the next fit: {same[:5]}"
    p, t = learn.get_preds()
    assert p.shape == (32, 10) and torch.isfinite(p).all()

@pytest.mark.parametrize('exc', EXCS, ids=lambda e: e.__name__)
@pytest.mark.parametrize('event', EVENTS)
@pytest.mark.parametrize('name', list(CBS))
def test_interrupt_restores(name, event, exc):
    learn, cb, before, model, loss_func = run_interrupted(name, event, exc)
    assert cb not in learn.cbs
    check_restored(learn, before, model, loss_func)
    if event in ('after_batch', 'loss'): check_usable(learn, model)   # the state checks above imply it elsewhere (time)

# A callback added to the learner for good (`Learner(cbs=...)`, `learn.add_cb`) is not removed by `fit`, so fastai
# calls neither `after_fit` nor `cb.learn = None` when an exception other than CancelFitException ends the fit.
_PERSIST = pytest.mark.xfail(strict=True, reason=
    "fastai gives a callback kept in learn.cbs no event when a non-Cancel exception ends fit (no after_fit, "
    "learn not reset): the callback restores only at the next before_fit. Documented gap (nbs/90_guarantees)")

@pytest.mark.parametrize('name', [pytest.param('boost', marks=_PERSIST), pytest.param('freezeout', marks=_PERSIST), 'snapshot'])
def test_interrupt_persistent_callback(name):
    learn, cb, before, model, loss_func = run_interrupted(name, 'after_batch', KeyboardInterrupt, persistent=True)
    check_restored(learn, before, model, loss_func)
    learn.remove_cb(cb)
    check_usable(learn, model)

@pytest.mark.parametrize('name', list(CBS))
def test_persistent_callback_restores_at_next_fit(name):
    "The documented recovery for a kept callback: its next `before_fit` restores, so the learner trains normally again"
    learn, cb, before, model, loss_func = run_interrupted(name, 'after_batch', RuntimeError, persistent=True)
    learn.remove_cb(cb)   # what a user does after the crash; `cb.learn = None` also restores
    check_restored(learn, before, model, loss_func)
    check_usable(learn, model)
