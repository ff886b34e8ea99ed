"""The `fastboost-bench` command end to end: every arm on a tiny digits subset in spawned processes, a well-formed
JSON and table; bad arguments exit non-zero with a clear message. (nbs/05_bench.ipynb tests the pieces.)"""
import json, shutil, subprocess, sys
from pathlib import Path
import pytest

ARMS = ['e2e', 'boost', 'boost+e2e', 'freezeout', 'snapshot']
# resnet18 (9 blocks) at 16 px on 64 images, batch 8, 2 epochs: 16 iterations, enough for FreezeOut's one per block
TINY = ['--arch', 'resnet18', '--size', '16', '--subset', '64', '--test-subset', '64', '--bs', '8', '--epochs', '2',
        '--threads', '1']   # one thread: a tiny model on a shared CI machine

def cli():
    "The installed console script, else `python -m fastboost.bench`"
    script = Path(sys.executable).parent/'fastboost-bench'
    return [str(script)] if script.exists() else [sys.executable, '-m', 'fastboost.bench']

def test_every_arm_end_to_end(tmp_path):
    out = tmp_path/'out'
    r = subprocess.run([sys.executable, '-m', 'fastboost.bench', *TINY, '--t0', '0.5', '--schedule', 'linear', '--out', str(out)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.loads((out/'bench.json').read_text())
    assert [row['arm'] for row in res['rows']] == ARMS + ['snapshot-ens4', 'snapshot-swa']   # the callback's default 4 cycles
    # calibration of e2e and of the snapshot ensemble, side by side
    assert set(res['extra']['e2e_calibration']) == {'nll', 'ece'} and set(res['extra']['snapshot_calibration']) == {'ens1', 'ens4'}
    assert res['errors'] == {}
    for row in res['rows']:
        assert 0 <= row['train_acc'] <= 1 and 0 <= row['test_acc'] <= 1, row
        assert row['train_s'] > 0 and row['peak_mb'] >= 0, row
    rows = {row['arm']: row for row in res['rows']}
    assert rows['boost+e2e']['train_s'] > rows['boost']['train_s']   # fine-tuning continues the boost phase's clock
    assert res['config']['seed'] == 0 and res['config']['arch'] == 'resnet18'
    assert res['memory'].startswith('CPU')
    # per-epoch curves of every arm, BoostResNet's per-block table, the snapshot ensemble curve
    for arm in ARMS: assert res['curves'][arm], arm
    blocks = res['extra']['boost_blocks']
    assert len(blocks) == res['extra']['n_blocks'] == 9 and all('valid_acc' in b for b in blocks)
    # one epoch per block: the accuracy after each epoch is that of the block the epoch trained (not the next one's new classifier)
    assert [a for _, a in res['curves']['boost']] == pytest.approx([b['valid_acc'] for b in blocks], abs=1e-4)
    assert res['config']['t0'] == 0.5 and res['config']['schedule'] == 'linear'
    assert res['extra']['freezeout'][0]['t_freeze'] == pytest.approx(0.5)   # FreezeOut got --t0/--schedule
    assert {'predicted', 'measured'} <= set(res['extra']['freezeout_speedup'])
    assert [m for m, _ in res['extra']['snapshot_ensemble']] == [1, 2, 3, 4]
    for f in ('accuracy_vs_time.png', 'snapshot_ensemble.png', 'boost_depth.png', 'freezeout.png'):
        assert f in res['figures'] and (out/f).stat().st_size > 1000
    # the markdown table, printed and written, with e2e as the reference of the ratios
    table = (out/'bench.md').read_text()
    assert table.strip() == res['table'].strip() and res['table'] in r.stdout
    e2e = [c.strip() for c in table.splitlines()[2].split('|')]
    assert e2e[1] == 'e2e' and e2e[6] == e2e[7] == '1.00'   # time / e2e, memory / e2e
    assert "to e2e's acc / e2e's time" in table and all('to_e2e_acc_s' in r for r in res['rows'] if r['arm'] in res['curves'])

def test_tensor_memory_columns(tmp_path):
    "`--tensor-memory`: a peak per epoch (per block for boost) in each row, the two table columns and the per-block figure"
    out = tmp_path/'out'
    r = subprocess.run([sys.executable, '-m', 'fastboost.bench', *TINY, '--arms', 'e2e,boost', '--block-cache', 'on',
                        '--tensor-memory', '--out', str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.loads((out/'bench.json').read_text())
    e2e, boost = res['rows']
    assert len(e2e['tensor_mb_epochs']) == 2 and len(boost['tensor_mb_epochs']) == res['extra']['n_blocks'] == 9
    assert e2e['tensor_mb'] == max(e2e['tensor_mb_epochs']) and boost['tensor_mb'] == max(boost['tensor_mb_epochs'])
    assert boost['tensor_mb'] < e2e['tensor_mb']   # one block's step against the whole net's
    assert '| peak tensor MB | tensor / e2e |' in res['table'] and res['table'].splitlines()[2].endswith('| 1.00 |')
    assert 'tensor_memory.png' in res['figures'] and (out/'tensor_memory.png').stat().st_size > 1000

@pytest.mark.parametrize('args,msg', [
    (['--arch', 'resnet5000'], 'unknown arch'),
    (['--dataset', 'cifar10', '--data', '/no/such/folder'], 'does not exist'),
    (['--subset', '100000'], 'larger than the data (1438 images)'),
    (['--arms', 'e2e,bogus'], 'unknown arm(s) bogus'),
    (['--epochs', '0'], 'must be at least 1'),
    (['--t0', '1.5'], 'must be in (0, 1]'),
    (['--pretrained', '/no/such/checkpoint.th'], 'no checkpoint there'),
])
def test_bad_arguments(args, msg, capsys, tmp_path):
    from fastboost.bench import main
    with pytest.raises(SystemExit) as e: main(args + ['--out', str(tmp_path/'out')])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path/'out').exists()   # nothing written for a run that never started

def _checkpoint(path):
    "A CIFAR ResNet-8 checkpoint in the third-party files' layout"
    import torch
    from fastboost.pretrained import cifar_resnet
    torch.manual_seed(0); torch.save({'state_dict': cifar_resnet(8).state_dict()}, path)
    return path

def test_transfer_from_a_checkpoint(tmp_path):
    "--pretrained: the arms fine-tune the checkpoint's network; FreezeOut runs at its defaults for a pretrained body under fit_one_cycle"
    ck, out = _checkpoint(tmp_path/'r8.th'), tmp_path/'out'
    r = subprocess.run(cli() + ['--pretrained', str(ck), '--size', '16', '--subset', '64', '--test-subset', '64', '--bs', '8', '--epochs', '2',
                                '--threads', '1', '--e2e-sched', 'one_cycle', '--lr', '1e-2', '--arms', 'e2e,freezeout', '--out', str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.loads((out/'bench.json').read_text())
    assert [row['arm'] for row in res['rows']] == ['e2e', 'freezeout'] and res['errors'] == {}
    assert res['extra']['freezeout_config'] == dict(t0=0.1, schedule='linear', scale_lr=False, frozen_bn='eval')
    fz = res['extra']['freezeout']   # ResNet-8: the stem and 3 units froze one after another, the first at a tenth of the fit
    assert [b['block'] for b in fz] == ['Sequential'] + ['CifarBlock'] * 3 and [b['t_freeze'] for b in fz] == pytest.approx([0.1, 0.4, 0.7, 1.0])
    assert [b['freeze_iter'] for b in fz] == sorted(b['freeze_iter'] for b in fz) and fz[0]['freeze_iter'] <= 2
    with pytest.raises(SystemExit) as e:
        from fastboost.bench import main
        main(['--pretrained', str(ck), '--arch', 'resnet18', '--out', str(tmp_path/'o2')])
    assert e.value.code == 2

def test_bad_argument_exit_status_from_the_shell(tmp_path):
    r = subprocess.run(cli() + ['--arch', 'resnet5000'], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and 'fastboost-bench: error: unknown arch' in r.stderr, r.stderr[-2000:]

def test_killed_command_leaves_no_job_running(tmp_path):
    "SIGKILL the command while an arm trains: its job process (forked from a forkserver, not a child) ends by itself"
    import os, signal, time
    def jobs():
        "pids of processes running this test's bench (their command line or environment names its output folder)"
        res = []
        for p in Path('/proc').iterdir():
            if not p.name.isdigit() or int(p.name) == os.getpid(): continue
            try: env = (p/'environ').read_bytes()
            except OSError: continue
            if str(tmp_path).encode() in env: res.append(int(p.name))
        return res
    env = {**os.environ, 'FASTBOOST_TEST_MARK': str(tmp_path)}   # inherited by the forkserver and the job
    cmd = [sys.executable, '-m', 'fastboost.bench', *TINY, '--epochs', '200', '--arms', 'e2e', '--out', str(tmp_path/'out')]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:   # wait until the arm trains
        if line.startswith('== e2e'): break
    import threading
    threading.Thread(target=proc.stdout.read, daemon=True).start()   # keep reading, as a terminal would
    deadline = time.time() + 120
    while len(jobs()) < 4 and time.time() < deadline: time.sleep(1)   # command, resource tracker, forkserver, job
    assert len(jobs()) >= 4, jobs()
    proc.send_signal(signal.SIGKILL); proc.wait()
    deadline = time.time() + 60
    while jobs() and time.time() < deadline: time.sleep(1)
    left = jobs()
    for pid in left: os.kill(pid, signal.SIGKILL)
    assert not left, f"processes still running after the command was killed: {left}"

def _fake_cifar(root, n_train=30, n_test=10, side=32):
    "A CIFAR-10-shaped folder in fastai's layout (train/<class>/*.png, test/<class>/*.png) of random images"
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('test', n_test)):
        for c in range(10):
            d = root/split/f'class{c}'; d.mkdir(parents=True)
            for i in range(n): Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(d/f'{i}.png')
    return root

def test_preset_study_smoke_and_resume(tmp_path):
    """`--preset study` on CPU, on 300 random CIFAR-shaped images at 8 px with one epoch per arm: every arm runs the
    study's ResNet50 with the small stem, the memory check says it was skipped (no GPU); a second run finds every job
    finished and trains nothing; deleting one job's result runs that job alone again"""
    data = _fake_cifar(tmp_path/'cifar')
    out = tmp_path/'out'
    cmd = [sys.executable, '-m', 'fastboost.bench', '--preset', 'study', '--data', str(data), '--size', '8', '--bs', '16',
           '--epochs', '1', '--ft-epochs', '1', '--cycles', '1', '--threads', '1', '--speed-check', '4', '--cache', str(tmp_path/'cache'), '--out', str(out)]
    run = lambda: subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    r = run()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.loads((out/'bench.json').read_text())
    cfg = res['config']
    assert (cfg['dataset'], cfg['arch'], cfg['stem'], cfg['opt'], cfg['lr'], cfg['aug'], cfg['bs']) == ('cifar10', 'resnet50', 'small', 'sgd', 0.1, True, 16)
    assert [row['arm'] for row in res['rows']] == ARMS and res['errors'] == {}
    assert res['extra']['n_blocks'] == 17
    assert res['memory_check']['skipped'].startswith('needs a GPU') and 'Memory check (0.3' in r.stdout
    assert res['speed']['fastai_img_s'] > 0 and 'Speed check (' in r.stdout   # the preset's speed check, a job of its own
    jobs = sorted(f.name for f in (out/'jobs').iterdir())
    assert jobs == ['boost+boost+e2e.json', 'e2e.json', 'freezeout.json', 'snapshot.json', 'speed4.json'], jobs

    r2 = run()   # everything finished: nothing trains, the same table
    assert r2.returncode == 0 and r2.stdout.count('finished earlier') == 5, r2.stdout[-2000:]
    assert json.loads((out/'bench.json').read_text())['rows'] == res['rows']

    (out/'jobs'/'snapshot.json').unlink()
    r3 = run()
    assert r3.returncode == 0 and r3.stdout.count('finished earlier') == 4, r3.stdout[-2000:]
    assert (out/'jobs'/'snapshot.json').exists()

def test_memory_check_needs_a_gpu(tmp_path):
    r = subprocess.run([*cli(), '--memory-check', '0.3', '--device', 'cpu'], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and 'needs a GPU' in r.stderr, r.stderr[-2000:]

def test_compile_and_speed_check(tmp_path):
    "`--compile` trains through `torch.compile` (dynamo captures graphs); `--speed-check` ends the table with fastai's and a plain loop's speed"
    import torch._dynamo
    from fastboost.bench import parse_args, run_bench
    torch._dynamo.reset(); torch._dynamo.utils.counters.clear()
    args = parse_args([*TINY, '--arms', 'e2e', '--epochs', '1', '--compile', '--speed-check', '4', '--out', str(tmp_path/'out')])
    res = run_bench(args, spawn=False)   # in this process, so that dynamo's counters are this test's
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] > 0
    assert res['errors'] == {} and res['rows'][0]['arm'] == 'e2e'
    sp = res['speed']
    assert (sp['iters'], sp['bs']) == (4, 8) and sp['fastai_img_s'] > 0 and sp['plain_img_s'] > 0, sp
    assert 'Speed check (4 iterations of 8' in res['table']

def test_gpu_check_smoke(tmp_path):
    """`--preset gpu-check --smoke` (what a lent GPU runs, at tiny sizes on the CPU): every part's jobs run and
    gpucheck.json holds parts a-d, each done; --out holds the JSON and its markdown only"""
    out = tmp_path/'out'
    r = subprocess.run([*cli(), '--preset', 'gpu-check', '--smoke', '--threads', '1', '--out', str(out)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out/'gpucheck.json').read_text())
    assert list(res['parts']) == ['memory', 'speed', 'freezeout', 'accuracy'] == list(res['estimate']['parts']) and res['ok']
    assert all(p['status'] == 'done' for p in res['parts'].values()), {k: p['errors'] for k, p in res['parts'].items()}
    mem = res['parts']['memory']
    assert [s['setting'] for s in mem['settings']] == ['8px_small_bf16'] and all(s['ratio'] > 0 for s in mem['settings'])
    assert mem['errors'] == {f"trace_{s['setting']}": "the allocator's trace needs a GPU" for s in mem['settings']}
    sp = res['parts']['speed']
    assert sp['eager']['fastai_img_s'] > 0 and sp['compiled']['plain_img_s'] > 0 and sp['compile_speedup'] > 0
    fo = res['parts']['freezeout']
    assert fo['plan']['t0'] == 0.8 and 0 < fo['predicted'] < 1 and fo['measured'] < 1
    acc = res['parts']['accuracy']
    assert {'e2e', 'boost', 'boost+e2e'} <= set(acc) and acc['time_ratio'] > 0 and acc['curves']['e2e']
    md = (out/'gpucheck.md').read_text()
    assert md.strip() in r.stdout and "| fastai's loop / a plain PyTorch loop, training images/s with `--compile`" in md
    assert sorted(f.name for f in out.iterdir()) == ['gpucheck.json', 'gpucheck.md']   # the jobs' own files stay out of --out

def test_job_time_cap(tmp_path):
    "A job still running at its time cap (`_job`'s timeout) has its process ended and comes back as an error"
    import time, multiprocessing.forkserver as fs
    from fastboost.bench import parse_args, _job
    cfg = {k: str(v) if isinstance(v, Path) else v for k, v in vars(parse_args([*TINY, '--epochs', '200', '--out', str(tmp_path)])).items()}
    r, err = _job(['e2e'], cfg, tmp_path, False, True, timeout=3)
    assert r is None and err == 'TimeoutError: stopped at its time cap of 3 s', err
    server = fs._forkserver._forkserver_pid   # the job's process was its child
    def children():
        kids = []
        for p in Path('/proc').iterdir():
            try: st = (p/'stat').read_text() if p.name.isdigit() else ''
            except OSError: continue
            if st and int(st.rsplit(')', 1)[1].split()[1]) == server: kids.append(int(p.name))
        return kids
    deadline = time.time() + 20
    while children() and time.time() < deadline: time.sleep(0.5)
    assert not children(), children()
