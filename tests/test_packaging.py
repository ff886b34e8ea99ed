"""Packaging checks, offline: sdist + wheel build and pass `twine check`, the wheel holds only the package, and installing it
next to an existing fastai/torch/torchvision (a Kaggle or Colab kernel) adds only fastboost and missing light dependencies."""
import json, os, re, shutil, subprocess, sys, tarfile, zipfile
from email.parser import Parser
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {'torch', 'torchvision', 'fastai'}

def norm(name): return re.sub(r'[-_.]+', '-', name).lower()

def version():
    return re.search(r'^__version__\s*=\s*[\'"]([^\'"]+)', (ROOT/'fastboost'/'__init__.py').read_text(), re.M).group(1)

def run(*cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r

@pytest.fixture(scope='module')
def dist(tmp_path_factory):
    "sdist and wheel built offline (`--no-isolation`: setuptools comes from the dev extra) from a copy of the files git sees"
    tmp = tmp_path_factory.mktemp('pkg')
    src, out = tmp/'src', tmp/'dist'
    files = run('git', 'ls-files', '-co', '--exclude-standard', cwd=ROOT).stdout.split('\n')
    for f in filter(None, files):
        if (ROOT/f).is_file(): (src/f).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(ROOT/f, src/f)
    run(sys.executable, '-m', 'build', '--no-isolation', '--outdir', out, src)
    whl, = out.glob('*.whl'); sdist, = out.glob('*.tar.gz')
    return whl, sdist

def test_twine_check(dist):
    run(sys.executable, '-m', 'twine', 'check', '--strict', *dist)

def test_wheel_holds_only_the_package(dist):
    whl, _ = dist
    names = zipfile.ZipFile(whl).namelist()
    info = f'fastboost-{version()}.dist-info/'
    extra = [n for n in names if not (n.startswith(info) or (n.startswith('fastboost/') and n.endswith('.py')))]
    assert not extra, f'the wheel holds more than the package: {extra}'
    assert {f'fastboost/{p.name}' for p in (ROOT/'fastboost').glob('*.py')} <= set(names)
    assert f'{info}licenses/LICENSE' in names

def test_version_license_changelog(dist):
    whl, sdist = dist
    v = version()
    assert whl.name == f'fastboost-{v}-py3-none-any.whl' and sdist.name == f'fastboost-{v}.tar.gz'
    meta = Parser().parsestr(zipfile.ZipFile(whl).read(f'fastboost-{v}.dist-info/METADATA').decode())
    assert meta['Version'] == v and meta['License-Expression'] == 'Apache-2.0'
    assert 'Apache License' in (ROOT/'LICENSE').read_text() and 'Version 2.0, January 2004' in (ROOT/'LICENSE').read_text()
    assert f'fastboost-{v}/LICENSE' in tarfile.open(sdist).getnames()
    assert re.search(rf'^## \[?{re.escape(v)}\b', (ROOT/'CHANGELOG.md').read_text(), re.M), f'CHANGELOG.md has no section for {v}'

def closure(reqs):
    "Installed distributions (normalised name -> Distribution) that requirement strings `reqs` need, transitively"
    from importlib.metadata import distribution, PackageNotFoundError
    from packaging.requirements import Requirement
    seen, todo = {}, [r for r in map(Requirement, reqs) if r.marker is None or r.marker.evaluate({'extra': ''})]
    while todo:
        req = todo.pop()
        if norm(req.name) in seen: continue
        try: d = distribution(req.name)
        except PackageNotFoundError: continue
        seen[norm(req.name)] = d
        extras = {''} | set(req.extras)
        for r in map(Requirement, d.requires or []):
            if r.marker is None or any(r.marker.evaluate({'extra': e}) for e in extras): todo.append(r)
    return seen

def escaped(d): return re.sub(r'[^\w\d.]+', '_', d.metadata['Name'])

def metadata_wheel(d, dest):
    "A wheel holding only `d`'s metadata: enough for `pip install --dry-run` to resolve against, offline"
    name, ver = escaped(d), d.version
    with zipfile.ZipFile(dest/f'{name}-{ver}-py3-none-any.whl', 'w') as z:
        z.writestr(f'{name}-{ver}.dist-info/METADATA', d.read_text('METADATA'))
        z.writestr(f'{name}-{ver}.dist-info/WHEEL', 'Wheel-Version: 1.0\nGenerator: fastboost-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n')
        z.writestr(f'{name}-{ver}.dist-info/RECORD', '')

def test_kaggle_install_keeps_torch_and_fastai(dist, tmp_path):
    """In a kernel that has fastai, torch and torchvision (with their dependencies), `pip install fastboost` installs
    fastboost and the light dependencies it lacks, and reinstalls or upgrades nothing.
    The kernel is a bare venv holding the metadata of this environment's fastai/torch/torchvision closure; the
    package index is every distribution fastboost needs, as metadata-only wheels at the versions installed here."""
    whl, _ = dist
    reqs = Parser().parsestr(zipfile.ZipFile(whl).read(f'fastboost-{version()}.dist-info/METADATA').decode()).get_all('Requires-Dist')
    assert not any(norm(re.split(r'[\s;<>=!~\[(]', r)[0]) in {'torch', 'torchvision'} for r in reqs), 'never require torch/torchvision directly'
    base, full = closure(HEAVY), closure(reqs)
    assert HEAVY <= set(base), f'this environment lacks {HEAVY - set(base)}'
    kernel, index = tmp_path/'kernel', tmp_path/'index'
    run(sys.executable, '-m', 'venv', '--without-pip', kernel)
    site, = kernel.glob('lib/python*/site-packages')
    for d in base.values():
        info = site/f'{escaped(d)}-{d.version}.dist-info'
        info.mkdir(); (info/'METADATA').write_text(d.read_text('METADATA')); (info/'INSTALLER').write_text('pip\n')
    index.mkdir()
    for d in full.values(): metadata_wheel(d, index)
    env = {k: v for k, v in os.environ.items() if not k.startswith(('PIP_', 'PYTHON'))} | {'PIP_CONFIG_FILE': os.devnull, 'PIP_DISABLE_PIP_VERSION_CHECK': '1'}
    report = tmp_path/'report.json'
    run(sys.executable, '-m', 'pip', '--python', kernel/'bin'/'python', 'install', '--dry-run', '--no-index', '--find-links', index,
        '--report', report, whl, env=env)
    installs = {norm(i['metadata']['name']): i['metadata']['version'] for i in json.loads(report.read_text())['install']}
    assert not set(installs) & set(base), f'pip would reinstall or upgrade what the kernel has: {set(installs) & set(base)}'
    assert set(installs) == {'fastboost'} | (set(full) - set(base)), installs
