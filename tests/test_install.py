"""`pip install .` works: the installed copy, run from outside the checkout,
answers every console script's --help and runs the quick start.

One test (about two minutes on 2 CPU cores, most of it the quick start's XLA
compilation). The package is installed without its dependencies into a
`--target` directory (they are this interpreter's, from requirements.txt), from
a copy of the checkout, so the build leaves nothing in the tree.
"""
import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('capf-train', 'capf-predict', 'capf-convert', 'capf-build-dataset')
INSTALLED = ('contextpose_jax', 'configs', 'data_prep', 'weights_conversion')
CHECKOUT_ONLY = ('torch_reference', 'benchmarks', 'tests', 'main.py')


def _source_files():
  """The checkout's files, as git sees them (tracked + new, not ignored)."""
  try:
    out = subprocess.run(
        ['git', '-C', REPO, 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
        capture_output=True, check=True).stdout.decode()
  except (OSError, subprocess.CalledProcessError):
    return None  # not a git checkout: copy the tree minus the usual clutter
  return [f for f in out.split('\0') if f and os.path.isfile(os.path.join(REPO, f))]


def _copy_checkout(dest):
  files = _source_files()
  if files is None:
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        '.git', '.venv', '.ci-venv', 'build', 'dist', '*.egg-info', '__pycache__',
        '.pytest_cache', 'workdirs', 'tmp'))
    return
  for f in files:
    os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
    shutil.copy2(os.path.join(REPO, f), os.path.join(dest, f))


def _build_isolation_flags():
  """Builds with this interpreter's setuptools when it can build wheels by
  itself (>= 70.1); otherwise pip fetches the build backend."""
  try:
    import setuptools  # pylint: disable=g-import-not-at-top
  except ImportError:
    return []
  major, minor = (int(x) for x in setuptools.__version__.split('.')[:2])
  return ['--no-build-isolation'] if (major, minor) >= (70, 1) else []


def test_pip_install_then_clis_from_outside_the_checkout(tmp_path):
  src, site, run_dir = tmp_path / 'src', tmp_path / 'site', tmp_path / 'elsewhere'
  _copy_checkout(src)
  run_dir.mkdir()
  pip = subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps',
       *_build_isolation_flags(), f'--target={site}', str(src)],
      capture_output=True, text=True, timeout=600)
  assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
  for name in INSTALLED:
    assert (site / name / '__init__.py').is_file(), name
  for name in CHECKOUT_ONLY:
    assert not (site / name).exists(), f'{name} must not be installed'

  # Only the installed copy is importable: no checkout on the path, and the
  # working directory is outside it.
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env.update(PYTHONPATH=str(site), JAX_PLATFORMS='cpu')

  def run(*cmd, timeout=120, ok=(0,)):
    proc = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode in ok, (cmd, proc.stdout[-2000:], proc.stderr[-4000:])
    return proc

  where = run(sys.executable, '-c', 'import contextpose_jax, configs, data_prep, '
              'weights_conversion as w; print(contextpose_jax.__file__, configs.__file__, '
              'data_prep.__file__, w.__file__)')
  for path in where.stdout.split():
    assert path.startswith(str(site)), (path, 'imported from outside the install')

  for script in SCRIPTS:
    help_text = run(str(site / 'bin' / script), '--help').stdout
    assert '--' in help_text and len(help_text) > 200, (script, help_text)
    assert '--output' in help_text or '--workdir' in help_text or '--data_dir' in help_text
    assert 'Traceback' not in help_text, (script, help_text)

  # The quick start, with the shipped config named as in the checkout.
  workdir, data_dir = tmp_path / 'workdir', tmp_path / 'data'
  run(str(site / 'bin' / 'capf-train'), '--config=configs/tiny_test.py',
      f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
      '--config.num_epochs=1', '--config.steps_per_epoch=4',
      '--config.data.synthetic.num_train=64', '--config.data.synthetic.num_validation=32',
      timeout=600)
  result = json.loads((workdir / 'eval.json').read_text())
  assert result['mpjpe'] > 0
