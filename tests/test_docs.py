"Offline docs check: every notebook renders to HTML (nbconvert in place of Quarto) and every public symbol has its doc entry."
import ast, html, importlib, inspect, re, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT/'docs'/'_site'

def public_symbols():
    "`(module, name)` for everything `from fastboost.all import *` brings in: the `__all__` of each module it star-imports"
    tree = ast.parse((ROOT/'fastboost'/'all.py').read_text())
    mods = [f'fastboost.{n.module}' for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 1 and n.names[0].name == '*']
    syms = [(m, nm) for m in mods for nm in importlib.import_module(m).__all__]
    extra = set(importlib.import_module('fastboost.all').__all__) - {nm for _, nm in syms}
    assert not extra, f'fastboost.all exports {sorted(extra)} that no star-imported module defines'
    return syms

@pytest.fixture(scope='module')
def site():
    r = subprocess.run([sys.executable, 'docs/offline.py', 'html'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return {p.name: p.read_text() for p in SITE.glob('*.html')}

def test_every_notebook_renders(site):
    from nbdev.doclinks import nbglob
    nbs = [Path(f) for f in nbglob(ROOT/'nbs')]
    assert len(site) == len(nbs) and 'index.html' in site, (sorted(site), nbs)
    for name, page in site.items():
        assert '<h1' in page and 'Traceback' not in page, name

def _text(s):
    "Visible text of an HTML fragment, whitespace collapsed"
    return ' '.join(html.unescape(re.sub(r'<[^>]+>', ' ', s)).split())

def _squash(s):
    "Text without backticks and whitespace: rendered code spans and tags move the spaces around punctuation"
    return re.sub(r'\s+', '', s.replace('`', ''))

def _entry(page, name):
    "The rendered show_doc output for `name`: its heading up to the end of its cell"
    m = re.search(rf'<h[2-4] id="{re.escape(name)}"', page, flags=re.I)  # Quarto lowercases ids, nbconvert keeps case
    if not m: return None
    end = page.find('<div class="jp-Cell ', m.end())
    return page[m.start(): end if end > 0 else None]

def entry_problems(site, mod, name):
    "What is missing from the rendered doc entry of `mod.name` (empty when it has its heading, docstring and arguments)"
    from fastboost._modidx import d
    obj = getattr(importlib.import_module(mod), name)
    doc_link = d['syms'][mod].get(f'{mod}.{name}', [None])[0]
    if not doc_link: return [f'{mod}.{name} is not in fastboost/_modidx.py: run nbdev-export']
    page, anchor = doc_link.split('#')
    if page not in site: return [f'{mod}.{name}: page {page} was not rendered']
    entry = _entry(site[page], anchor)
    if not entry: return [f'{mod}.{name}: no doc entry #{anchor} in {page} (define it in an `#| export` cell, or call show_doc)']
    if not callable(obj): return []
    text, res = _text(entry), []
    doc = inspect.getdoc(obj)
    if not doc: res.append(f'{mod}.{name} has no docstring')
    elif _squash(doc) not in _squash(text): res.append(f'{mod}.{name}: docstring not in its doc entry: {text}')
    try: params = inspect.signature(obj).parameters
    except (TypeError, ValueError): params = []
    # some metaclasses (fastai's Transform) leave `self` in a class's signature
    res += [f'{mod}.{name}: argument `{p}` not in its doc entry: {text}' for p in params if p != 'self' and not re.search(rf'\b{re.escape(p)}\b', text)]
    return res

def test_public_api_is_documented(site):
    syms = public_symbols()
    assert syms, 'fastboost.all exports nothing'
    problems = [p for mod, name in syms for p in entry_problems(site, mod, name)]
    assert not problems, '\n'.join(problems)

def test_check_catches_a_missing_entry(site):
    "The check is not vacuous: a page without the entry, or with another docstring, is reported"
    mod, name = public_symbols()[0]
    page = next(p for p in site if f'id="{name.lower()}"' in site[p].lower())
    gone = {**site, page: re.sub(rf'id="{re.escape(name)}"', 'id="x"', site[page], flags=re.I)}
    assert 'no doc entry' in entry_problems(gone, mod, name)[0]
    hollow = {**site, page: re.sub(r'(id="%s".*?</pre>).*?(<div class="jp-Cell )' % re.escape(name), r'\1\2', site[page], flags=re.I|re.S)}
    assert any('docstring' in p for p in entry_problems(hollow, mod, name)), 'an entry without its docstring passed'

def test_workflows():
    "GitHub Pages deploys with nbdev 3's action; CI runs .ci/run, which runs the README's test command (tests/test_repo.py)"
    wf = ROOT/'.github'/'workflows'
    assert 'fastai/workflows/quarto-ghp3@' in (wf/'deploy.yaml').read_text()
    assert re.search(r'^\s*run: \.ci/run\s*$', (wf/'test.yaml').read_text(), re.M)

def test_sidebar_lists_every_notebook():
    "The hand-written sidebar (custom_sidebar) has every notebook once, and nothing else: a new page cannot go missing"
    import yaml, tomllib
    from nbdev.doclinks import nbglob
    assert tomllib.loads((ROOT/'pyproject.toml').read_text())['tool']['nbdev']['custom_sidebar'] is True, \
        "nbs/sidebar.yml is written by hand: nbdev would overwrite it unless custom_sidebar = true"
    def entries(items):
        for it in items:
            if isinstance(it, dict): yield from entries(it.get('contents', []))
            else: yield it
    listed = list(entries(yaml.safe_load((ROOT/'nbs'/'sidebar.yml').read_text())['website']['sidebar']['contents']))
    nbs = sorted(Path(f).name for f in nbglob(ROOT/'nbs'))
    assert sorted(listed) == nbs, f"nbs/sidebar.yml lists {sorted(listed)}, the notebooks are {nbs}: add or remove entries"

def test_links_between_pages(site):
    "Every relative link in the rendered pages goes to a page that exists (links to notebooks become their pages)"
    bad = [(name, h) for name, page in site.items() for h in re.findall(r'href="([^"#:]+\.(?:html|ipynb))"', page) if h not in site]
    assert not bad, bad
    assert 'href="tutorial_boostresnet.html"' in site['index.html']
