"""Which accelerators this host has, judged without starting JAX.

The process-level platform choices are made before JAX starts its backends
and must follow the devices that are there, not the packages that are
installed: a CPU machine with the `tpu` extra (libtpu, to compile TPU
programs with `capf-compile`) or a CUDA plugin still runs everything on its
CPU. Two choices use this:

- `host_memory`: glibc's malloc settings for XLA:CPU, on only where JAX runs
  on the CPU alone.
- `skip_absent_backends()`: the commands (and the tests) do not start the
  TPU or CUDA backend on a host without such a device. JAX would fall back to
  the CPU anyway, but libtpu first writes several lines about host bounds and
  worker hostnames to stderr, in every process.

`$JAX_PLATFORMS` (or `JAX_PLATFORM_NAME`), when set, is the user's choice and
is left as it is.
"""
from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import pkgutil

# PCI vendor id of Google's TPU chips (what JAX's own probe looks for).
_GOOGLE_PCI_VENDOR = '0x1ae0'


def requested_platforms() -> set[str] | None:
  """The platforms `$JAX_PLATFORMS` names (None: unset)."""
  value = os.environ.get('JAX_PLATFORMS') or os.environ.get('JAX_PLATFORM_NAME')
  if not value:
    return None
  return {p.strip().lower() for p in value.split(',') if p.strip()}


def tpu_chips_present() -> bool:
  """A TPU chip is attached to this host (a TPU VM)."""
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return bool(glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*'))


def gpus_present() -> bool:
  """An NVIDIA or AMD GPU with its driver loaded."""
  return bool(glob.glob('/dev/nvidia[0-9]*') or glob.glob('/proc/driver/nvidia/gpus/*')
              or os.path.exists('/dev/kfd'))


def libtpu_installed() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def gpu_plugin_platforms() -> set[str]:
  """The GPU platforms ('cuda', 'rocm') of the installed JAX plugins, found
  as JAX finds them (entry points, `jax_plugins` modules)."""
  names = [e.name for e in importlib.metadata.entry_points(group='jax_plugins')]
  spec = importlib.util.find_spec('jax_plugins')
  if spec:
    names += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations or [])]
  return {p for p in ('cuda', 'rocm') for n in names if p in n.lower()}


def cpu_only() -> bool:
  """Whether JAX will run on the CPU alone in this process."""
  requested = requested_platforms()
  if requested is not None:
    return requested <= {'cpu'}
  return _present_platforms() == ['cpu']


def _present_platforms() -> list[str]:
  """The backends that have both their package and their device here."""
  present = ['tpu'] if libtpu_installed() and tpu_chips_present() else []
  if gpus_present():
    present += sorted(gpu_plugin_platforms())
  return present + ['cpu']


def skip_absent_backends() -> str | None:
  """Before JAX starts: leave out the backends whose package is installed but
  whose device is not attached (libtpu on a CPU or GPU host, a CUDA plugin on
  a host without a GPU). Returns the platforms set (None: nothing changed)."""
  if requested_platforms() is not None:
    return None
  installed = (['tpu'] if libtpu_installed() else []) + sorted(gpu_plugin_platforms())
  present = _present_platforms()
  if set(installed) <= set(present):
    return None
  platforms = ','.join(present)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', platforms)
  return platforms
