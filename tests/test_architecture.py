"""docs/architecture.md matches the tree: every module of the packages it
describes is named there, and every module it names exists."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('contextpose_jax', 'data_prep', 'weights_conversion', 'torch_reference',
            'benchmarks', 'configs')


def _tree_modules():
  out = set()
  for package in PACKAGES:
    for root, dirs, files in os.walk(os.path.join(REPO, package)):
      dirs[:] = [d for d in dirs if d != '__pycache__']
      for name in files:
        if name.endswith('.py') and name != '__init__.py':
          out.add(os.path.relpath(os.path.join(root, name), REPO))
  return out


def _documented_modules(text):
  """Module paths named in the 'One home each' table: `pkg/mod.py`, and
  siblings listed as `other.py` / `(+ other.py)` in the same cell."""
  table = text[text.index('## One home each'):]
  out = set()
  for row in table.splitlines():
    cells = row.split('|')
    if len(cells) < 3 or set(cells[2].strip()) <= set('-'):
      continue
    directory = None
    for token in re.findall(r'`([\w/.]+\.py)`|`(\w+/)`', cells[2]):
      path, folder = token
      if folder:
        directory = folder.rstrip('/')
        continue
      if '/' in path:
        directory = os.path.dirname(path)
        out.add(path)
      elif directory:
        out.add(f'{directory}/{path}')
  return out


def test_architecture_doc_lists_the_tree():
  with open(os.path.join(REPO, 'docs', 'architecture.md')) as f:
    text = f.read()
  documented = _documented_modules(text)
  tree = {m for m in _tree_modules() if not m.startswith(('configs/', 'torch_reference/',
                                                           'benchmarks/'))}
  assert sorted(tree - documented) == [], 'modules missing from docs/architecture.md'
  assert sorted(documented - _tree_modules()) == [], 'docs/architecture.md names missing files'
  for package in PACKAGES:
    assert f'{package}/' in text, package
