"""fastai's habits (nbs/90_guarantees, *fastai's habits*): a callback attached to the learner does nothing in fastai's
validation contexts and keeps its state, works under every fit method with an observable effect, and survives
`export`/`load_learner`. Each test fails on the callbacks as they were before they learnt these habits."""
import warnings, pytest, torch
from fastai.learner import load_learner
from fastai.interpret import ClassificationInterpretation
from _tiny import tiny_learner, CBS, weights, max_diff
from fastboost.blocks import body_blocks

def state(cb):
    "What a callback keeps after a fit: its records, snapshots or frozen blocks, and its report"
    if hasattr(cb, 'records'): return ('boost', [dict(r) for r in cb.records])
    if hasattr(cb, 'n_frozen'): return ('freezeout', cb.n_frozen, cb.report.to_dict(), dict(cb.speedup))
    return ('snapshot', [(s['cycle'], s['iter'], {k: v.clone() for k, v in s['state'].items()}) for s in cb.snapshots])

def same_state(a, b):
    if a[0] == 'snapshot':
        return [x[:2] for x in a[1]] == [x[:2] for x in b[1]] and all(max_diff(x[2], y[2]) == 0 for x, y in zip(a[1], b[1]))
    return repr(a) == repr(b)

def contexts(learn):
    "Every fastai call that sends `before_fit` without training: what each returns (predictions, metrics)"
    item = learn.dls.valid_ds.items[0]
    out = {}
    with learn.no_bar():
        out['get_preds'] = learn.get_preds()[0]
        out['validate'] = torch.tensor(learn.validate())
        out['predict'] = learn.predict(item)[2]
        torch.manual_seed(0); out['tta'] = learn.tta(n=2)[0]
        out['interp'] = ClassificationInterpretation.from_learner(learn).confusion_matrix()
        learn.show_results(max_n=2)
        learn.summary()
        w = weights(learn.model)
        with learn.no_logging(): learn.lr_find(num_it=6, show_plot=False)
        assert max_diff(w, weights(learn.model)) == 0
    return out

@pytest.mark.parametrize('name', list(CBS))
def test_inert_at_inference(name):
    "Attached with `Learner(cbs=)`: predictions in every validation context equal the learner's without it, and the callback's state stays"
    cb = CBS[name]()
    learn = tiny_learner(cbs=cb)
    learn.fit(3, 1e-2)
    kept = state(cb)
    assert kept[1], f"{name}: the fit left nothing to keep"
    model = learn.model
    with_cb = contexts(learn)
    assert learn.model is model
    assert same_state(kept, state(cb)), f"{name}: its state changed in a validation context"
    learn.remove_cb(cb)
    without = contexts(learn)
    for k in with_cb: torch.testing.assert_close(with_cb[k], without[k], msg=f"{name}: {k} differs with the callback attached")

FITS = {
    'fit': lambda l: l.fit(3, 1e-2),
    'fit_one_cycle': lambda l: l.fit_one_cycle(3, 1e-2),
    'fit_flat_cos': lambda l: l.fit_flat_cos(3, 1e-2),
    'fit_sgdr': lambda l: l.fit_sgdr(2, 1, 1e-2),       # cycles of 1 and 2 epochs: 12 iterations
    'fine_tune': lambda l: l.fine_tune(3, 1e-2),
}

class Steps(__import__('fastai.callback.core', fromlist=['Callback']).Callback):
    "Per training step of the last fit: which blocks' weights changed (order -20: before BoostResNet swaps its stage model in)"
    order = -20
    def before_fit(self): self.changed, self.blocks = [], body_blocks(self.learn.model)
    def before_batch(self):
        if self.training: self.w0 = [[p.detach().clone() for p in b.parameters()] for b in self.blocks]
    def after_batch(self):
        if self.training: self.changed.append([any(not torch.equal(a, p) for a, p in zip(w, b.parameters())) for w, b in zip(self.w0, self.blocks)])

@pytest.mark.parametrize('fit', list(FITS))
@pytest.mark.parametrize('name', list(CBS))
def test_every_fit_method(name, fit):
    "Each callback works under each fit method, with its effect seen in the fit, and the learner restored"
    learn = tiny_learner()
    steps = Steps()
    learn.add_cbs([steps])
    cb = CBS[name](); learn.add_cb(cb)
    model = learn.model
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); FITS[fit](learn)
    assert learn.model is model and all(p.requires_grad for p in model.parameters())
    if name == 'boost':
        assert len(cb.records) == len(body_blocks(model)) == 5
    elif name == 'freezeout':
        assert cb.n_frozen >= 1
        f = int(cb.report.freeze_iter[0])
        assert not any(c[0] for c in steps.changed[f:]), "block 0 changed after it froze"
    else:
        want = 2 if fit == 'fit_sgdr' else cb.n_cycles    # fit_sgdr: one per fastai cycle
        assert len(cb.snapshots) == want
        assert max_diff(cb.snapshots[-1]['state'], weights(model)) == 0

@pytest.mark.parametrize('name', list(CBS))
def test_export_with_callback_attached(name):
    "A learner with the callback attached exports, loads and predicts as before; the callback's results stay on the original"
    import tempfile, pathlib
    cb = CBS[name]()
    learn = tiny_learner(cbs=cb)
    learn.fit(3, 1e-2)
    kept = state(cb)
    with learn.no_bar(): p = learn.get_preds()[0]
    with tempfile.TemporaryDirectory() as d:
        f = pathlib.Path(d)/'m.pkl'
        learn.export(f)
        loaded = load_learner(f)
    with loaded.no_bar(): torch.testing.assert_close(loaded.get_preds(dl=loaded.dls.test_dl(learn.dls.valid_ds.items))[0], p)
    assert same_state(kept, state(cb))
    with learn.no_bar(): torch.testing.assert_close(learn.get_preds()[0], p)   # and the learner is still whole
