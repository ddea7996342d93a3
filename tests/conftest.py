"""Suite-wide settings.

- One persistent compilation cache for the whole run, in a temporary folder
  (never the user's `~/.cache`): both `-n 2` workers, the test processes
  themselves and the `capf-*` / `main.py` subprocesses the tests start. A
  program that several modules compile (the tiny CA-PF's train and eval
  steps in the e2e and fault runs, the tiny Predictor's programs) compiles
  once per run. The process that loads this file first (pytest's controller,
  or the one process without xdist) creates the folder, hands it to the
  workers it starts through the environment, and removes it at the end.
  Readers and writers of one entry take a file lock
  (`JAX_COMPILATION_CACHE_MAX_SIZE` set: JAX's LRU cache then locks), so a
  process never loads an entry that another one is still writing.
- The slowest modules are collected first: with `--dist loadfile` a worker
  takes a whole module, and the long ones must not start last.
"""
import os
import shutil
import tempfile

import jax

_RUN_CACHE = 'CAPF_TEST_RUN_XLA_CACHE'  # set by the owner, read by its workers
_OWNER = not os.path.isdir(os.environ.get(_RUN_CACHE, ''))
if _OWNER:
  os.environ[_RUN_CACHE] = tempfile.mkdtemp(prefix='capf-test-xla-cache-')
_CACHE = os.environ[_RUN_CACHE]
os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
os.environ['CONTEXTPOSE_JAX_CACHE'] = _CACHE
# Eviction on (a bound far above what a run writes) is what turns the lock on.
_MAX_SIZE = 16 << 30
os.environ['JAX_COMPILATION_CACHE_MAX_SIZE'] = str(_MAX_SIZE)

# This process imported jax already (../conftest.py): the same cache through
# its config, before anything compiles (JAX opens the cache at the first
# compilation). Every program that takes a second or more to compile, as
# the commands do (contextpose_jax/compile_cache.py).
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_compilation_cache_max_size', _MAX_SIZE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)

# Most CPU first (measured 2026-12-06, 2 cores); the rest keep their order.
SLOWEST_FIRST = (
    'test_train_e2e.py',
    'test_faults_train.py',
    'test_conversion.py',
    'test_multihost.py',
    'test_aot.py',
    'test_predict_multi.py',
    'test_benchmark.py',
    'test_inference_inputs.py',
    'test_train.py',
    'test_precision.py',
    'test_lifter.py',
)


def pytest_collection_modifyitems(session, config, items):
  def rank(item):
    name = os.path.basename(str(item.path))
    return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)
  items.sort(key=rank)  # stable: each module keeps its own order


def pytest_unconfigure(config):
  if _OWNER:  # after its workers have ended
    shutil.rmtree(_CACHE, ignore_errors=True)
