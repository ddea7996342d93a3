"""Command lines (issue #27): `--help` and argument errors answer before any
heavy import, in the project's one-line style; a missing `--config` file
lists the shipped configs."""
import os
import subprocess
import sys

import pytest

from contextpose_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ('jax', 'flax', 'tensorflow_datasets', 'torch', 'matplotlib', 'orbax', 'cv2')

# Each command's entry point, called as its console script is.
_ENTRY = {
    'capf-train': 'from contextpose_jax import main as m; sys.argv = ["capf-train", *ARGS]; m.run()',
    'capf-build-dataset': 'from data_prep import build as m; sys.exit(m.main(ARGS))',
    'capf-convert': 'from weights_conversion import convert as m; sys.exit(m.main(ARGS))',
    'capf-compile': 'from contextpose_jax import compile as m; sys.exit(m.main(ARGS))',
}
_SCRIPT = '''
import atexit, sys
ARGS = sys.argv[1:]
HEAVY = {heavy!r}
def report():
  sys.stderr.write('heavy: ' + ','.join(sorted(m for m in HEAVY if m in sys.modules)) + '\\n')
atexit.register(report)
{entry}
'''


def _run(command, *args):
  """The command in a fresh process; (status, stdout, stderr lines, heavy
  modules it imported)."""
  script = _SCRIPT.format(heavy=HEAVY, entry=_ENTRY[command])
  proc = subprocess.run([sys.executable, '-c', script, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
  lines = proc.stderr.splitlines()
  assert lines and lines[-1].startswith('heavy: '), proc.stderr[-3000:]
  heavy = [m for m in lines[-1][len('heavy: '):].split(',') if m]
  return proc.returncode, proc.stdout, lines[:-1], heavy


@pytest.mark.parametrize('command, args, status, line', [
    ('capf-train', ['--help'], 0, None),
    ('capf-train', [], 1, 'error: --workdir is required'),
    ('capf-train', ['--workdir='], 1, 'error: --workdir is required'),
    ('capf-train', ['--workdir=/tmp/x', '--config.batch_sise=4'], 1,
     "error: --config.batch_sise=4: config has no field 'batch_sise'"),
    ('capf-build-dataset', ['--help'], 0, None),
    ('capf-build-dataset', ['synthetic_human36m'], 2, 'error: --data_dir is required'),
    ('capf-build-dataset', ['--nope'], 2, 'error: Unknown command line flag'),
    ('capf-convert', ['--help'], 0, None),
    ('capf-convert', [], 2, 'error: --kind, --input and --output are required'),
    ('capf-convert', ['--kind=capf', '--input=x'], 2, 'error: --output is required'),
    ('capf-compile', ['--help'], 0, None),
    ('capf-compile', [], 2, 'error: --config is required'),
], ids=lambda v: ' '.join(v) if isinstance(v, list) else None)
def test_help_and_argument_errors_before_heavy_imports(command, args, status, line):
  code, out, err, heavy = _run(command, *args)
  assert code == status, err
  assert heavy == [], f'{command} {args} imported {heavy} before answering'
  if line is None:
    assert 'flags:' in out and err == []
  else:
    assert len(err) == 1 and err[0].startswith(line), err


@pytest.mark.parametrize('command', ['capf-train', 'capf-compile'])
def test_missing_config_lists_the_shipped_configs(command):
  extra = ['--workdir=/tmp/x'] if command == 'capf-train' else []
  code, _, err, heavy = _run(command, '--config=configs/h36m_hrnet23.py', *extra)
  assert code in (1, 2) and heavy == []
  shipped = sorted(f'configs/{n}' for n in os.listdir(os.path.join(REPO, 'configs'))
                   if n.endswith('.py') and n != '__init__.py')
  assert 'configs/h36m_hrnet32.py' in shipped
  assert err == [f'error: --config=configs/h36m_hrnet23.py: cannot load the config file '
                 f'(no such file); the shipped configs: {", ".join(shipped)}']


def test_required_flags_in_one_line():
  absl = 'flag --{0}=None: Flag --{0} must have a value other than None.'
  assert cli.one_line(absl.format('workdir')) == '--workdir is required'
  assert cli.one_line(' '.join(absl.format(n) for n in ('a', 'b'))) == '--a and --b are required'
  assert cli.one_line('flag --x=1: bad\n  value') == 'flag --x=1: bad value'
