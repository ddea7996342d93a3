"""The tiny synthetic set and the `main.py` command line shared by the
end-to-end training tests (one build per test module)."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'tiny_test.py')


def make_env(tmp_path_factory, name: str) -> dict:
  """Builds `configs/tiny_test.py`'s synthetic set once. The subprocesses
  use the run's compilation cache (tests/conftest.py): the e2e and fault
  modules, often on different workers, share the programs they have in
  common (initialization, evaluation step; their train steps differ)."""
  root = tmp_path_factory.mktemp(name)
  data_dir = root / 'data'
  sys.path.insert(0, REPO)
  from configs import tiny_test  # pylint: disable=g-import-not-at-top
  from data_prep import synthetic  # pylint: disable=g-import-not-at-top
  synthetic.build(str(data_dir), log=lambda *a: None,
                  **tiny_test.get_config().data.synthetic.to_dict())
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR') or str(root / 'jax_cache')
  environ = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache,
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return dict(root=root, data_dir=str(data_dir), environ=environ, runs={})


def main_cmd(env: dict, workdir, *extra) -> list:
  """`python main.py` on the tiny config and the env's data."""
  return [sys.executable, os.path.join(REPO, 'main.py'), f'--config={CONFIG}',
          f'--workdir={workdir}', f'--config.data.data_dir={env["data_dir"]}', *extra]
