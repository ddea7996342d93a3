"""The persistent compilation cache: on by default in a given directory, off
on request, and a second process loads the program instead of compiling."""
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, {repo!r})
    import jax, jax.numpy as jnp
    from contextpose_jax import compile_cache
    print('DIR', compile_cache.enable())
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    @jax.jit
    def f(x):
      for _ in range(30):
        x = jnp.sin(x) @ x
      return x
    t = time.time(); f(jnp.ones((64, 64))).block_until_ready()
    print('SECONDS', time.time() - t)
''')


def _run(env_cache, home):
  env = dict(os.environ, HOME=str(home), JAX_PLATFORMS='cpu')
  # JAX's defaults, as a user has them (the suite's run cache sets these).
  for name in ('JAX_COMPILATION_CACHE_DIR', 'JAX_COMPILATION_CACHE_MAX_SIZE'):
    env.pop(name, None)
  if env_cache is None:
    env.pop('CONTEXTPOSE_JAX_CACHE', None)
  else:
    env['CONTEXTPOSE_JAX_CACHE'] = env_cache
  proc = subprocess.run([sys.executable, '-c', _SCRIPT.format(repo=REPO)], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout


def _files(directory):
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def test_default_directory_is_filled_and_reused(tmp_path):
  out = _run(None, tmp_path)
  cache = tmp_path / '.cache' / 'contextpose_jax' / 'xla'
  assert f'DIR {cache}' in out
  first = _files(cache)
  assert first, 'nothing was cached'
  _run(None, tmp_path)
  assert _files(cache) == first  # the second process hit the cache


def test_environment_names_the_directory_or_turns_it_off(tmp_path):
  custom = tmp_path / 'custom'
  assert f'DIR {custom}' in _run(str(custom), tmp_path)
  assert _files(custom)
  assert 'DIR None' in _run('off', tmp_path)
  assert not (tmp_path / '.cache').exists()
