"Repository-level checks a notebook cannot make: the README's commands, CI script and layout stay in step."
import re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BENCH_CMD = 'pip install -e . && fastboost-bench'                  # install + the benchmark on its built-in data
TEST_CMD = 'pip install -e ".[dev]" && nbdev-test && pytest'       # install + the tests, which .ci/run runs

def readme_commands():
    "The shell commands of the README's fenced `sh` blocks, in order"
    return re.findall(r'```sh\n(.*?)\n```', (ROOT/'README.md').read_text(), flags=re.S)

def _section(text, heading):
    "The README's section under `## heading`, up to the next `## `"
    start = text.index(f'\n## {heading}\n')
    end = text.find('\n## ', start + 1)
    return text[start: end if end > 0 else None]

def test_readme_install_has_the_two_commands():
    "The two set-up commands, word for word, in the install section: the benchmark first, then the tests"
    cmds = readme_commands()
    assert BENCH_CMD in cmds and TEST_CMD in cmds, cmds
    install = _section((ROOT/'README.md').read_text(), 'Install')
    assert f'```sh\n{BENCH_CMD}\n```' in install and f'```sh\n{TEST_CMD}\n```' in install, install
    assert install.index(BENCH_CMD) < install.index(TEST_CMD)

def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT/'.ci/run').read_text().splitlines()
    assert TEST_CMD in readme_commands() and TEST_CMD in ci, "the README's test command and .ci/run differ: make them the same"

def test_readme_is_generated_from_index_notebook():
    r = subprocess.run([sys.executable, str(ROOT/'docs/offline.py'), 'check'], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr + r.stdout

def test_no_legacy_nbdev_config():
    assert not (ROOT/'settings.ini').exists() and not (ROOT/'setup.py').exists()
    import tomllib
    cfg = tomllib.loads((ROOT/'pyproject.toml').read_text())
    assert set(cfg['tool']['nbdev']['tst_flags'].split()) >= {'slow', 'cuda'}
    assert not any(d.startswith('torch') for d in cfg['project']['dependencies']), "never pin torch"

def test_package_is_what_the_notebooks_export(tmp_path):
    "fastboost/ must be exactly what nbdev-export makes of nbs/"
    import shutil
    dst = tmp_path/'repo'
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns('.venv*', '.git', '_proc', '__pycache__', '*.egg-info'))
    r = subprocess.run([str(Path(sys.executable).parent/'nbdev-export')], cwd=dst, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for f in (ROOT/'fastboost').glob('*.py'):
        assert (dst/'fastboost'/f.name).read_text() == f.read_text(), f"{f.name} differs from its notebook: edit nbs/ and run nbdev-export"
