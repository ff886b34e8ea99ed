"""Each callback under fastai's distributed training (`learn.distrib_ctx()`: Accelerate + DDP) with 2 CPU processes
(gloo), launched once by `torchrun --standalone --nproc_per_node 2 tests/_ddp_worker.py`: ranks end with identical
weights, and those equal a one-process run on the same global batches (16 = 2 ranks x 8) to 1e-4 of the distance the
weights moved. The model has GroupNorm instead of BatchNorm and no dropout, so the two runs compute the same thing
(SyncBatchNorm is GPU-only). `DistributedDL._broadcast` moves its tensor to CUDA: the worker overrides it (tests only)."""
import os, subprocess, sys
from pathlib import Path
import pytest, torch

import accelerate   # fastai's distributed training needs it; a dev dependency, so CI fails rather than skips without it
import _ddp_worker as W
from _tiny import max_diff

NAMES = ['none', 'snapshot', 'snapshot_disk', 'snapshot_nan', 'boost_nan', 'freezeout_fup', 'boost', 'freezeout', 'freezeout_auto']

@pytest.fixture(scope='module')
def ddp(tmp_path_factory):
    "Results of the 2-process runs: {name: (rank 0, rank 1)}"
    out = tmp_path_factory.mktemp('ddp')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(Path(__file__).parent/'_ddp_worker.py'), str(out), *NAMES],
                       capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {n: tuple(torch.load(out/f'{n}_rank{k}.pth', weights_only=False) for k in (0, 1)) for n in NAMES}

@pytest.fixture(scope='module')
def single(tmp_path_factory):
    "The same fits in this process, as {name: (state dict, parameter names)}"
    n = torch.get_num_threads(); torch.set_num_threads(1)
    res = {}
    try:
        for name in ['none', 'snapshot', 'freezeout', 'boost', 'freezeout_auto']:
            learn, _ = W.run(name, world=1, path=tmp_path_factory.mktemp('single'))
            res[name] = ({k: v.detach().clone() for k, v in learn.model.state_dict().items()},
                         [k for k, _ in learn.model.named_parameters()], W.init)
    finally: torch.set_num_threads(n)
    res['freezeout_fup'], res['snapshot_disk'] = res['freezeout'], res['snapshot']
    return res

def _ok(ddp, name):
    for r in ddp[name]: assert r['error'] is None, r['error'][-1500:]
    return ddp[name]

def _rel_gap(a, b, w0, keys):
    "||a - b|| / ||b - w0|| over the parameters `keys`"
    n = lambda x, y: sum(((x[k].float() - y[k].float())**2).sum() for k in keys).sqrt().item()
    return n(a, b) / n(b, w0)

CASES = ['none', 'snapshot', 'snapshot_disk', 'freezeout_fup', 'boost', 'freezeout', 'freezeout_auto']

@pytest.mark.parametrize('name', CASES)
def test_ranks_identical(ddp, name):
    r0, r1 = _ok(ddp, name)
    assert r0['model_type'] == r1['model_type'] == 'Sequential'   # the user's model, unwrapped after the fit
    assert max_diff(r0['init'], r1['init']) == 0
    assert max_diff(r0['state'], r1['state']) == 0

@pytest.mark.parametrize('name', CASES)
def test_matches_single_process(ddp, single, name):
    r0, _ = _ok(ddp, name)
    ws, keys, w0 = single[name]
    assert max_diff(r0['init'], w0) == 0
    gap = _rel_gap(r0['state'], ws, w0, keys)
    assert gap < 1e-4, f"DDP and one process differ by {gap:.2e} of the distance the weights moved"

def test_snapshots_rank0_memory(ddp):
    "save='memory': rank 0 keeps the snapshots; rank 1 knows them and says clearly where they are"
    r0, r1 = _ok(ddp, 'snapshot')
    assert r0['snapshots'] == r1['snapshots'] == [1, 2]
    assert all(isinstance(v, dict) for v in r0['loaded'].values())
    assert all(isinstance(v, str) and 'rank-0' in v for v in r1['loaded'].values()), r1['loaded']

def test_snapshots_every_rank_loads_disk(ddp):
    "save='disk': rank 0 writes the files, every rank records their paths and loads them (the same weights)"
    r0, r1 = _ok(ddp, 'snapshot_disk')
    assert r0['snapshots'] == r1['snapshots'] == [1, 2]
    for k in (1, 2):
        assert isinstance(r1['loaded'][k], dict), r1['loaded'][k]
        assert max_diff(r0['loaded'][k], r1['loaded'][k]) == 0
    assert max_diff(r0['loaded'][2], r0['state']) == 0 < max_diff(r0['loaded'][1], r0['state'])   # the last one is the final model

def test_snapshot_nan_on_one_rank_stops_every_rank(ddp):
    "A NaN loss on rank 1 only (iteration 6 of 8, cycle 2): both ranks stop right after that batch (no rank left waiting in a collective), snapshot 1 kept"
    r0, r1 = _ok(ddp, 'snapshot_nan')
    assert r0['train_iter'] == r1['train_iter'] == 6
    assert r0['snapshots'] == r1['snapshots'] == [1]
    for r in (r0, r1): assert all(torch.isfinite(v).all() for v in r['loaded'][1].values() if v.is_floating_point())

def test_boost_nan_on_one_rank_stops_every_rank(ddp):
    "A NaN loss on rank 1 only (iteration 6 of 8): both ranks stop after that batch with the same finite weights (the broken block put back)"
    r0, r1 = _ok(ddp, 'boost_nan')
    assert r0['train_iter'] == r1['train_iter'] == 6 and r0['stages'] == r1['stages'] < 5
    assert max_diff(r0['state'], r1['state']) == 0
    assert all(torch.isfinite(v).all() for v in r0['state'].values() if v.is_floating_point())

@pytest.mark.parametrize('name', ['freezeout', 'freezeout_fup', 'freezeout_auto'])
def test_freezeout_rewraps_at_each_freeze(ddp, name):
    "FreezeOut wraps the model in a new DDP at each iteration where blocks freeze (DDP registers trainable parameters only)"
    for r in _ok(ddp, name):
        events = {i for i in r['freeze_iter'] if i < W.EPOCHS * W.N // (2 * W.BS)}   # iterations per rank: 2 x 4
        assert len(events) > 0 and r['speedup']['ddp_rewraps'] == len(events), (r['freeze_iter'], r['speedup'])

def test_freezeout_rewrap_keeps_ddp_settings(tmp_path):
    "The DDP built at a freeze has the user's `DistributedDataParallelKwargs` and trains with a frozen layer (1 process)"
    from types import SimpleNamespace
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP
    from accelerate import DistributedDataParallelKwargs
    from fastboost.freezeout import _ddp_like
    torch.distributed.init_process_group('gloo', init_method=f'file://{tmp_path}/pg', rank=0, world_size=1)
    try:
        for h in (DistributedDataParallelKwargs(find_unused_parameters=True, bucket_cap_mb=1), DistributedDataParallelKwargs()):
            m = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
            old = DDP(m, **h.to_kwargs())
            m[0].requires_grad_(False)
            new = _ddp_like(old, SimpleNamespace(accelerator=SimpleNamespace(ddp_handler=h)))
            assert new.module is m and new.find_unused_parameters == h.find_unused_parameters
            assert new.bucket_bytes_cap == old.bucket_bytes_cap
            for _ in range(2): new(torch.randn(4, 2)).sum().backward()   # `old` raises at the 2nd forward without f_u_p
            assert m[0].weight.grad is None and m[1].weight.grad is not None
    finally: torch.distributed.destroy_process_group()
