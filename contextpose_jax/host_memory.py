"""glibc malloc settings that stop XLA:CPU from paying page faults every step.

XLA:CPU takes each program's temporary buffer from malloc on every run (for
the batch-64 lifter train step, 935 MB). glibc serves so large a request
with a fresh mmap and unmaps it on free, so every step touches ~0.9 GB of new
pages: ~230K page faults and ~0.5-0.9 s of kernel time per lifter step on
2 cores, as much as a third of the step (docs/benchmarks.md, "Host memory").
The request comes from XLA's worker threads, whose (non-main) glibc arenas
cannot grow past 64 MB and always fall back to mmap, so lowering the mmap
threshold alone does not help. `configure()` therefore sets three options:
one arena (every thread allocates from the main heap), no mmap for large
blocks, and no trimming of the heap's top, so a freed temporary is reused by
the next step. The cost: the process keeps its peak heap instead of handing
freed memory back to the OS.

The arena choice is made by each thread at its first malloc, so this must run
before JAX starts its backend (the first computation or `jax.devices()`);
called later, XLA's threads keep their arenas and most of the gain is lost.
`capf-train` (main.py) and `capf-predict` call it first, as does
`benchmarks.speed` when asked (`--host_malloc=on`); library users call
`configure()` themselves, before any JAX work.

Only CPU-only processes are changed ('auto'): on a GPU or TPU host, XLA's
temporaries live in device memory and one arena would only serialise the
input pipeline's threads. The devices attached decide, not the packages
installed (`host_devices.cpu_only`): libtpu on a CPU host, installed to
compile TPU programs, leaves the setting on. Setting: `$CONTEXTPOSE_JAX_HOST_MALLOC` ('auto',
'on', 'off'), or `--host_malloc` on a command. glibc only (Linux); elsewhere
it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

from contextpose_jax import host_devices

ENV = 'CONTEXTPOSE_JAX_HOST_MALLOC'
SETTINGS = ('auto', 'on', 'off')

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# (parameter, value): one arena, large blocks from the heap, never trim.
OPTIONS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
_applied = False


def _glibc():
  """The C library when it is glibc (it has mallopt), else None."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
    return libc
  except (OSError, AttributeError):
    return None


def resolve(setting: str | None = None) -> str:
  """'on' or 'off': `setting` ('auto', 'on', 'off'; None: the environment)."""
  value = (setting or os.environ.get(ENV) or 'auto').strip().lower()
  if value not in SETTINGS:
    source = f'${ENV}' if setting is None else '--host_malloc'
    raise ValueError(f'{source}: {value!r} is not one of {", ".join(SETTINGS)}')
  if value == 'auto':
    value = 'on' if host_devices.cpu_only() else 'off'
  return value


def applied() -> bool:
  """Whether this process runs with the settings (they cannot be undone)."""
  return _applied


def configure(setting: str | None = None) -> bool:
  """Applies the settings above when `setting` (see `resolve`) says so.

  Returns whether they were applied (False: off, or the C library is not
  glibc). 'off' leaves a process that already has them as it is.
  """
  global _applied
  if resolve(setting) == 'off':
    return False
  if _applied:
    return True
  libc = _glibc()
  if libc is None:
    return False
  bridge = sys.modules.get('jax._src.xla_bridge')
  if bridge is not None and bridge.backends_are_initialized():
    logging.warning('host_memory.configure() called after the JAX backend started: '
                    "XLA's threads keep their malloc arenas; call it before any JAX work")
  for parameter, value in OPTIONS:
    if libc.mallopt(parameter, value) != 1:
      raise OSError(f'mallopt({parameter}, {value}) failed')
  _applied = True
  return True
