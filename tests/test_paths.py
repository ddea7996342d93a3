"""Path flags and config paths (issue #27): `~` and `$VARS` expanded and made
absolute by every command, at argument-parsing level (no command runs)."""
import json
import os
import subprocess
import sys

import pytest

from contextpose_jax import paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def home(tmp_path, monkeypatch):
  """$HOME and $CAPF_ROOT point at fresh folders; the working directory is
  another one, so a literal `~` folder would show up there."""
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.setenv('CAPF_ROOT', str(tmp_path / 'root'))
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  return tmp_path


def test_expand(home):
  assert paths.expand('~/tfds') == str(home / 'home' / 'tfds')
  assert paths.expand('$CAPF_ROOT/x/../y') == str(home / 'root' / 'y')
  assert paths.expand('rel/dir') == str(home / 'cwd' / 'rel' / 'dir')
  assert paths.expand('gs://bucket/tfds') == 'gs://bucket/tfds'
  assert paths.expand('') == '' and paths.expand(None) is None


def test_capf_build_dataset(home):
  from data_prep import build  # pylint: disable=g-import-not-at-top
  args = build.parse_args(['synthetic_human36m', '--data_dir=~/tensorflow_datasets',
                           '--manual_dir=$CAPF_ROOT/raw'])
  assert args.data_dir == str(home / 'home' / 'tensorflow_datasets')
  assert args.manual_dir == str(home / 'root' / 'raw')


def test_capf_convert(home):
  from contextpose_jax import cli  # pylint: disable=g-import-not-at-top
  from weights_conversion import convert  # pylint: disable=g-import-not-at-top
  cli.parse(convert._FLAGS, ['--kind=capf', '--input=~/best.bin',  # pylint: disable=protected-access
                             '--output=$CAPF_ROOT/converted'], convert.__doc__)
  args = cli.values(convert._FLAGS)  # pylint: disable=protected-access
  assert args.input == str(home / 'home' / 'best.bin')
  assert args.output == str(home / 'root' / 'converted')


def test_capf_compile(home):
  from contextpose_jax import compile as capf_compile  # pylint: disable=g-import-not-at-top
  args = capf_compile._parse([  # pylint: disable=protected-access
      '--config=configs/tiny_test.py', '--topology=v5e-8', '--hlo=~/hlo',
      '--config.data.data_dir=$CAPF_ROOT/tfds', '--config.init_from=~/converted'])
  assert args.hlo == str(home / 'home' / 'hlo')
  assert args.config.data.data_dir == str(home / 'root' / 'tfds')
  assert args.config.init_from == str(home / 'home' / 'converted')
  assert args.config.backbone_init == ''  # empty: the config's "none"


def test_benchmarks(home):
  from benchmarks import data_throughput  # pylint: disable=g-import-not-at-top
  from benchmarks import speed  # pylint: disable=g-import-not-at-top
  args = speed.parse_args(['--data_dir=~/tfds', '--json=$CAPF_ROOT/rows.json',
                           '--compilation_cache=off'])
  assert args.data_dir == str(home / 'home' / 'tfds')
  assert args.json == str(home / 'root' / 'rows.json')
  assert args.compilation_cache == 'off'
  from contextpose_jax import cli  # pylint: disable=g-import-not-at-top
  cli.parse(data_throughput._FLAGS, ['--data_dir=~/tfds'], '')  # pylint: disable=protected-access
  assert data_throughput._FLAGS.data_dir == str(home / 'home' / 'tfds')  # pylint: disable=protected-access


_TRAIN_FLAGS = r'''
import json, sys
from contextpose_jax import cli, main as capf_main
capf_main.parse_flags(cli.resolve_config_arg(sys.argv))  # as capf_main.run()
F = capf_main.FLAGS
print(json.dumps(dict(workdir=F.workdir, cache=F.compilation_cache,
                      data_dir=F.config.data.data_dir, init=F.config.backbone_init)))
'''


@pytest.mark.parametrize('cache', ['default', '~/xla'])
def test_capf_train(home, cache):
  """`capf-train`'s own flag parsing (in a process of its own: absl's global
  flags), the `--config=~/...` path included."""
  config = home / 'home' / 'mine.py'
  config.parent.mkdir()
  config.write_text('from configs import tiny_test\nget_config = tiny_test.get_config\n')
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-c', _TRAIN_FLAGS, '--config=~/mine.py', '--workdir=~/run',
       f'--compilation_cache={cache}', '--config.data.data_dir=$CAPF_ROOT/tfds',
       '--config.backbone_init=~/coco'],
      env=env, capture_output=True, text=True, timeout=120, check=True)
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got == dict(workdir=str(home / 'home' / 'run'),
                     cache='default' if cache == 'default' else str(home / 'home' / 'xla'),
                     data_dir=str(home / 'root' / 'tfds'),
                     init=str(home / 'home' / 'coco'))
