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

# ---- Figures are data: the README and the results page quote measured figures only from nbs/results/*.json
FIGURE_PAGES = ('index.ipynb', '95_results.ipynb')
_re_figure = re.compile(r'\d+(?:\.\d+)?\s?%|(?<![\w.\-])\d*\.\d+(?![\w.])')   # a decimal number or a percentage
_re_not_prose = [re.compile(p, re.S) for p in (r'```.*?```', r'`[^`\n]*`', r'\]\([^)]*\)', r'<!--.*?-->',
                                                 r'\b(?:Python|nbdev|fastai|torch) \d+(?:\.\d+)+')]   # code, link targets, comments, versions

def typed_figures(md:str) -> list:
    "The decimal numbers and percentages in markdown `md` outside code spans, code blocks, link targets and version numbers"
    for r in _re_not_prose: md = r.sub(' ', md)
    return _re_figure.findall(md)

def _cells(page):
    import json
    return json.loads((ROOT/'nbs'/page).read_text())['cells']

def test_typed_figures_check_is_not_vacuous():
    assert typed_figures("BoostResNet reached 0.606 in 40% of the time, .5 and 12.5 %") == ['0.606', '40%', '.5', '12.5 %']
    assert typed_figures("`t0=0.8`, ```sh\nfastboost-bench --lr 0.1\n``` [x](a/v0.2.html) Python 3.11, fastai 2.8.12, 5,000 images, 1e-3, ResNet-20") == []

def test_no_figure_typed_by_hand():
    "Measured figures come from the JSON (an `#|exec_doc` cell), never typed into the prose of the README or the results page"
    typed = {(page, c['id']): f for page in FIGURE_PAGES for c in _cells(page)
             if c['cell_type'] == 'markdown' and (f := typed_figures(''.join(c['source'])))}
    assert not typed, f"figures typed by hand (quote them from nbs/results/*.json in an #|exec_doc cell, with fastboost.measured): {typed}"

def test_quoted_figures_have_json_behind_them(monkeypatch):
    """Every `#|exec_doc` cell of the README and the results page runs (each row and key it quotes exists in its JSON),
    and a cell whose output shows a figure read it from a result"""
    from IPython.display import Markdown
    from fastboost.measured import Row
    reads = [0]
    get = dict.__getitem__
    def counted(self, k): reads[0] += 1; return get(self, k)
    monkeypatch.setattr(Row, '__getitem__', counted)
    for page in FIGURE_PAGES:
        ns, n = {}, 0
        for c in _cells(page):
            src = ''.join(c['source'])
            if c['cell_type'] != 'code' or not re.search(r'^#\|\s*exec_doc', src, re.M): continue
            reads[0], n = 0, n + 1
            body = re.sub(r'^#\|.*\n?', '', src, flags=re.M)
            stmts = ast.parse(body).body
            last = stmts.pop() if stmts and isinstance(stmts[-1], ast.Expr) else None
            try:
                exec(compile(ast.Module(stmts, []), f'{page}:{c["id"]}', 'exec'), ns)
                out = eval(compile(ast.Expression(last.value), f'{page}:{c["id"]}', 'eval'), ns) if last else None
            except Exception as e: raise AssertionError(f"{page}, cell {c['id']}: a quoted figure has no JSON behind it: {type(e).__name__}: {e}") from e
            text = out.data if isinstance(out, Markdown) else ''
            assert reads[0] or not _re_figure.search(text), f"{page}, cell {c['id']} shows figures it did not read from nbs/results: {text[:300]}"
        assert n, f'{page} quotes no figure from nbs/results'
