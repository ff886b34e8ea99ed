"""With `set_seed(s, reproducible=True)` two runs of each callback give bit-identical weights (and snapshots / per-block
records), and a different seed gives different weights (so the comparison can fail)."""
import pytest, torch
from fastai.torch_core import set_seed
from _tiny import tiny_learner, tiny_dls, CBS, weights, max_diff

@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def train(name, seed):
    set_seed(seed, reproducible=True)
    learn = tiny_learner(tiny_dls(n=64, n_valid=32, bs=16))   # shuffled batches, dropout in the head, Adam
    cb = CBS[name]()
    learn.fit(3, 1e-2, cbs=cb)
    return weights(learn.model), cb

@pytest.mark.parametrize('name', list(CBS))
def test_same_seed_same_weights(name):
    (w1, cb1), (w2, cb2), (w3, _) = train(name, 1), train(name, 1), train(name, 2)
    assert max_diff(w1, w2) == 0
    assert max_diff(w1, w3) > 0   # the seed matters: the test can fail
    if name == 'snapshot':
        assert len(cb1.snapshots) == len(cb2.snapshots) == 2
        for k in (1, 2): assert max_diff(cb1.load_snapshot(k), cb2.load_snapshot(k)) == 0
    if name == 'boost':
        cols = ['train_loss', 'valid_loss', 'valid_acc', 'valid_edge']
        assert cb1.report[cols].equals(cb2.report[cols])
