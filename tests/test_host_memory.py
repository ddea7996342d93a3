"""host_memory: with its malloc settings, XLA:CPU's per-run temporary reuses
freed pages instead of faulting in fresh ones; the setting's resolution and
its one-line errors."""
import os
import subprocess
import sys
import textwrap

import pytest

from contextpose_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A program whose temporary (the dot's output and the cumulative sum's: 2 x 64
# MiB; XLA would fuse a plain reduction into the dot) is allocated on every
# run, as the lifter step's ~1 GB one is. It prints the compiled temporary's
# size and the median of the minor page faults of 9 runs after 20 warm-up runs.
# With the settings on, jaxlib 0.12's heap takes ~10-15 runs to settle (seen on
# 2026-12-05: a fresh fault of the whole temporary in about half of those
# runs, none after them); with glibc's defaults every run faults.
_SCRIPT = textwrap.dedent('''
    import resource, sys
    sys.path.insert(0, {repo!r})
    from contextpose_jax import host_memory
    print('APPLIED', host_memory.configure())
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x, w: jnp.cumsum(x @ w, axis=0)[-1])
    x, w = jnp.ones((4096, 8)), jnp.ones((8, 4096))
    for _ in range(20):
      f(x, w).block_until_ready()
    faults = []
    for _ in range(9):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x, w).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print('FAULTS', sorted(faults)[4])
    print('TEMP', f.lower(x, w).compile().memory_analysis().temp_size_in_bytes)
''')


def _faults_per_run(setting):
  env = dict(os.environ, JAX_PLATFORMS='cpu', **{host_memory.ENV: setting})
  proc = subprocess.run([sys.executable, '-c', _SCRIPT.format(repo=REPO)], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  values = dict(line.split(' ', 1) for line in proc.stdout.splitlines())
  return values['APPLIED'], float(values['FAULTS']), int(values['TEMP']) // 4096


@pytest.mark.skipif(host_memory._glibc() is None, reason='glibc only')  # pylint: disable=protected-access
def test_temporaries_reuse_pages_when_on():
  applied, faults_off, temp_pages = _faults_per_run('off')
  assert applied == 'False'
  assert temp_pages >= 2 * 4096 * 4096 * 4 // 4096  # both 64 MiB buffers
  # glibc's default: the temporary is a fresh mapping, every page faults.
  assert faults_off > 0.5 * temp_pages, faults_off
  applied, faults_on, _ = _faults_per_run('auto')  # CPU-only: auto is on
  assert applied == 'True'
  assert faults_on < 0.01 * temp_pages, faults_on


def test_auto_is_on_for_cpu_only_jax(monkeypatch):
  monkeypatch.delenv(host_memory.ENV, raising=False)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert host_memory.resolve() == 'on'
  for platforms in ('cuda', 'tpu', 'cuda,cpu'):
    monkeypatch.setenv('JAX_PLATFORMS', platforms)
    assert host_memory.resolve() == 'off'
    assert host_memory.resolve('on') == 'on'
  monkeypatch.setenv(host_memory.ENV, 'off')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert host_memory.resolve() == 'off'
  assert host_memory.configure() is False


def test_bad_setting_is_one_line_naming_its_source(monkeypatch):
  monkeypatch.setenv(host_memory.ENV, 'fast')
  with pytest.raises(ValueError, match=r"^\$CONTEXTPOSE_JAX_HOST_MALLOC: 'fast' is not one of"):
    host_memory.resolve()
  with pytest.raises(ValueError, match=r"^--host_malloc: 'fast' is not one of"):
    host_memory.resolve('fast')


def test_train_command_rejects_a_bad_environment_setting(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', **{host_memory.ENV: 'fast'})
  proc = subprocess.run([sys.executable, os.path.join(REPO, 'main.py'),
                         f'--workdir={tmp_path}/w'], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: $CONTEXTPOSE_JAX_HOST_MALLOC: 'fast' is not one of auto, on, off")
  assert not os.path.exists(tmp_path / 'w')
