"""The host's process-level platform choices follow the devices attached, not
the packages installed (contextpose_jax/host_devices.py)."""
import os
import subprocess
import sys

import pytest

from contextpose_jax import host_devices
from contextpose_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_platform_request(monkeypatch):
  for name in ('JAX_PLATFORMS', 'JAX_PLATFORM_NAME', host_memory.ENV):
    monkeypatch.delenv(name, raising=False)


def _host(monkeypatch, *, libtpu=False, tpu=False, gpu_plugins=(), gpu=False):
  monkeypatch.setattr(host_devices, 'libtpu_installed', lambda: libtpu)
  monkeypatch.setattr(host_devices, 'tpu_chips_present', lambda: tpu)
  monkeypatch.setattr(host_devices, 'gpu_plugin_platforms', lambda: set(gpu_plugins))
  monkeypatch.setattr(host_devices, 'gpus_present', lambda: gpu)


def test_installed_packages_without_their_devices_are_cpu_only(monkeypatch, no_platform_request):
  del no_platform_request
  for kwargs in ({}, {'libtpu': True}, {'gpu_plugins': ('cuda',)},
                 {'libtpu': True, 'gpu_plugins': ('cuda',)}, {'gpu': True}, {'tpu': True}):
    _host(monkeypatch, **kwargs)
    assert host_devices.cpu_only(), kwargs
    assert host_memory.resolve() == 'on', kwargs
  for kwargs in ({'libtpu': True, 'tpu': True}, {'gpu_plugins': ('cuda',), 'gpu': True},
                 {'libtpu': True, 'gpu_plugins': ('rocm',), 'gpu': True}):
    _host(monkeypatch, **kwargs)
    assert not host_devices.cpu_only(), kwargs
    assert host_memory.resolve() == 'off', kwargs


def test_only_absent_backends_are_left_out(monkeypatch, no_platform_request):
  del no_platform_request
  chosen = []
  import jax  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax.config, 'update', lambda name, value: chosen.append((name, value)))
  cases = (
      (dict(), None),  # nothing installed: JAX's own choice
      (dict(libtpu=True), 'cpu'),
      (dict(libtpu=True, gpu_plugins=('cuda',), gpu=True), 'cuda,cpu'),
      (dict(libtpu=True, tpu=True, gpu_plugins=('cuda',)), 'tpu,cpu'),
      (dict(libtpu=True, tpu=True), None),  # a TPU VM: as JAX would
      (dict(gpu_plugins=('cuda',), gpu=True), None),
  )
  for kwargs, expected in cases:
    chosen.clear()
    _host(monkeypatch, **kwargs)
    assert host_devices.skip_absent_backends() == expected, kwargs
    assert chosen == ([] if expected is None else [('jax_platforms', expected)]), kwargs
  monkeypatch.setenv('JAX_PLATFORMS', 'tpu')  # the user's choice stays
  _host(monkeypatch, libtpu=True)
  assert host_devices.skip_absent_backends() is None and not host_devices.cpu_only()


@pytest.mark.skipif(not host_devices.libtpu_installed(), reason='the test set installs libtpu')
def test_libtpu_on_this_cpu_host_stays_quiet(tmp_path):
  # A JAX process on this machine (libtpu installed, no TPU): JAX alone would
  # try the TPU backend and libtpu would print its start-up chatter; after
  # skip_absent_backends it starts the CPU backend only, silently.
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_PLATFORMS', 'JAX_PLATFORM_NAME')}
  code = ('from contextpose_jax import host_devices\n'
          'print(host_devices.skip_absent_backends())\n'
          'import jax\n'
          'print([d.platform for d in jax.devices()])\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split('\n')[:2] == ['cpu', "['cpu']"]
  assert proc.stderr.strip() == '', proc.stderr
  # Without it: the chatter this avoids.
  bare = subprocess.run([sys.executable, '-c', 'import jax; print(jax.devices())'], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  assert 'TPU' in bare.stderr, bare.stderr
