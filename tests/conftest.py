"""Suite-wide settings.

- One persistent compilation cache per test process (each `-n 2` worker has
  its own), in a temporary folder, for the `capf-*` / `main.py` subprocesses
  the tests start: the suite never reads or fills the user's `~/.cache`, and
  a program that several of those runs compile (the tiny CA-PF's steps)
  compiles once per worker. The test processes themselves imported jax
  already (../conftest.py) and compile without a persistent cache.
- The slowest modules are collected first: with `--dist loadfile` a worker
  takes a whole module, and the long ones must not start last.
"""
import os
import shutil
import tempfile

_CACHE = tempfile.mkdtemp(prefix='capf-test-xla-cache-')
os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
os.environ['CONTEXTPOSE_JAX_CACHE'] = _CACHE

# Most CPU first (measured 2026-12-06, 2 cores); the rest keep their order.
SLOWEST_FIRST = (
    'test_conversion.py',
    'test_train_e2e.py',
    'test_faults_train.py',
    'test_train.py',
    'test_multihost.py',
    'test_aot.py',
    'test_predict_multi.py',
    'test_benchmark.py',
    'test_inference_inputs.py',
    'test_precision.py',
    'test_lifter.py',
    'test_compiler_options.py',
)


def pytest_collection_modifyitems(session, config, items):
  def rank(item):
    name = os.path.basename(str(item.path))
    return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)
  items.sort(key=rank)  # stable: each module keeps its own order


def pytest_unconfigure(config):
  shutil.rmtree(_CACHE, ignore_errors=True)
