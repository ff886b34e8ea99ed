"""Worker for tests/test_distributed.py: `torchrun --standalone --nproc_per_node 2 tests/_ddp_worker.py OUT NAME...`
trains each named callback for 2 epochs under fastai's `distrib_ctx` (Accelerate + DDP, gloo on CPU) and writes
`OUT/NAME_rank{r}.pth` = {'state': final state dict, 'error': traceback or None, 'snapshots': cycles stored}.
`run(name, world=1)` is the same fit in one process, the reference the test compares with."""
import os, sys, datetime, traceback
sys.path.insert(0, os.path.dirname(__file__))
import torch
from torch import nn
from fastai.optimizer import SGD
from accelerate import DistributedDataParallelKwargs
from fastai.torch_core import set_seed
from pathlib import Path
from fastboost.snapshot import SnapshotEnsembleCallback
from fastboost.freezeout import FreezeOutCallback
from _tiny import tiny_learner, tensor_dls, digits_tensors, CBS

N, BS, EPOCHS, LR = 64, 8, 2, 0.05   # per rank: 32 images, batches of 8 (global batch 16), 4 iterations per epoch

def data(world):
    """Training set ordered so that batch i of one process with batch size BS*world holds exactly what batch i of each
    rank holds under `DistributedDL` (no shuffling: rank r reads items [r*N/world, (r+1)*N/world) in order)"""
    xt, yt, xv, yv = digits_tensors(16)
    xt, yt, xv, yv = xt[:N], yt[:N], xv[:32], yv[:32]
    if world == 1:
        per = N // 2
        order = torch.cat([torch.cat([torch.arange(i*BS, (i+1)*BS), per + torch.arange(i*BS, (i+1)*BS)]) for i in range(per // BS)])
        xt, yt = xt[order], yt[order]
    dls = tensor_dls(xt, yt, xv, yv, bs=BS*(1 if world > 1 else 2), device='cpu', vocab=[str(i) for i in range(10)])
    dls.train.shuffle = False
    return dls

def no_batchnorm(model):
    """Replace every BatchNorm by GroupNorm(1, C): per-sample normalisation, so 2 ranks x 8 images compute what one
    process does on 16 (SyncBatchNorm is GPU-only; per-rank BatchNorm statistics would make the runs differ by design)"""
    for m in list(model.modules()):
        for n, c in m.named_children():
            if isinstance(c, nn.modules.batchnorm._BatchNorm): setattr(m, n, nn.GroupNorm(1, c.num_features))
    return model

# what each run trains: 'none' is plain fastai (the baseline), 'snapshot_disk' writes its snapshots to files,
# 'freezeout_fup' is FreezeOut under DDP with the user's find_unused_parameters=True (kept when FreezeOut re-wraps),
# 'freezeout_auto' decides its freezes from the weights (t0='auto'), agreed by all ranks
RUNS = dict(none=lambda: None, freezeout_auto=lambda: FreezeOutCallback(t0='auto', tol=0.5, window=1, timing=False), snapshot_disk=lambda: SnapshotEnsembleCallback(n_cycles=2, save='disk'),
            snapshot_nan=lambda: SnapshotEnsembleCallback.paper(n_cycles=2, save='disk', fname='nan'),   # the paper's equal cycles: 2 of 4 iterations
            boost_nan=CBS['boost'], freezeout_fup=CBS['freezeout'], **CBS)

class NaNOnRank:
    "The loss, NaN at training call `at` (1-based) on rank `rank` only (the other ranks' losses stay finite)"
    def __init__(self, loss, rank=1, at=6): self.loss, self.rank, self.at, self.n = loss, rank, at, 0
    def __call__(self, *args):
        l = self.loss(*args)
        if torch.is_grad_enabled():
            self.n += 1
            if self.n == self.at and int(os.environ.get('RANK', 0)) == self.rank: l = l * float('nan')
        return l
    def __getattr__(self, k):
        if k in ('loss', 'rank', 'at', 'n'): raise AttributeError(k)
        return getattr(self.loss, k)

def run(name, world=1, path='.'):
    "Train the tiny learner with `RUNS[name]`; under torchrun (world>1) inside `learn.distrib_ctx()`"
    set_seed(0)
    # no dropout (random per process); plain SGD: Adam's sign-like steps would amplify rounding differences
    learn = tiny_learner(data(world), opt_func=SGD, ps=0., path=Path(path))
    no_batchnorm(learn.model)
    if name in ('snapshot_nan', 'boost_nan'): learn.loss_func = NaNOnRank(learn.loss_func)
    global init; init = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
    cb = RUNS[name]()
    if world == 1: learn.fit(EPOCHS, LR, cbs=cb); return learn, cb
    # sync_bn=False: SyncBatchNorm is GPU-only (and no BatchNorm is left); cpu=True: Accelerate's MULTI_CPU (gloo)
    kw = dict(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]) if name == 'freezeout_fup' else {}
    with learn.distrib_ctx(sync_bn=False, cpu=True, **kw): learn.fit(EPOCHS, LR, cbs=cb)
    return learn, cb

def _broadcast_cpu(self, t, rank):
    "`DistributedDL._broadcast` without the move to CUDA (fastai's comment: NCCL only), for gloo on CPU"
    t = torch.LongTensor(t)
    torch.distributed.broadcast(t, rank)
    return t.tolist()

def main(out, names):
    torch.set_num_threads(1)
    rank = int(os.environ['RANK'])
    torch.distributed.init_process_group('gloo', timeout=datetime.timedelta(seconds=60))
    from fastai.distributed import DistributedDL
    DistributedDL._broadcast = _broadcast_cpu   # this test process only
    for name in names:
        res = dict(state=None, error=None, snapshots=None)
        try:
            learn, cb = run(name, world=int(os.environ['WORLD_SIZE']), path=out)
            res['state'] = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
            res['model_type'] = type(learn.model).__name__
            res['init'] = init
            if name.startswith('boost'): res['train_iter'], res['stages'] = learn.train_iter, len(cb.records)
            if name.startswith('freezeout'): res['speedup'], res['freeze_iter'] = cb.speedup, list(cb.report.freeze_iter)
            if name.startswith('snapshot'):
                torch.distributed.barrier()   # rank 0 has written its files
                res['snapshots'] = [s['cycle'] for s in cb.snapshots]
                res['train_iter'] = learn.train_iter
                res['loaded'] = {}
                for k in res['snapshots']:
                    try: res['loaded'][k] = cb.load_snapshot(k)
                    except Exception as e: res['loaded'][k] = f'{type(e).__name__}: {e}'
        except BaseException:
            res['error'] = traceback.format_exc()
        torch.save(res, os.path.join(out, f'{name}_rank{rank}.pth'))
        # the failures seen so far raise on both ranks at the same point (no rank left waiting in a collective);
        # a hang would end at the process group's 60 s timeout
    torch.distributed.destroy_process_group()

if __name__ == '__main__': main(sys.argv[1], sys.argv[2:])
