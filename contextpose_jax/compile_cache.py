"""JAX's persistent compilation cache, on by default for the commands.

A full-size CA-PF forward takes 50-140 s to compile on 2 CPU cores; with the
cache a second run of the same program (same shapes, same JAX version) loads
it from disk in seconds. The commands (`capf-train`, `capf-predict`, the
benchmark) call `enable()`; library users call it themselves.

Directory: `$CONTEXTPOSE_JAX_CACHE`, else JAX's own `JAX_COMPILATION_CACHE_DIR`,
else `~/.cache/contextpose_jax/xla`. Off: `CONTEXTPOSE_JAX_CACHE=off`, or
`--compilation_cache=off` on a command.
"""
from __future__ import annotations

import os

ENV = 'CONTEXTPOSE_JAX_CACHE'
OFF = ('', 'off', 'none', '0', 'false')


def default_directory() -> str | None:
  """The cache directory the environment asks for (None: off)."""
  value = os.environ.get(ENV)
  if value is not None:
    return None if value.strip().lower() in OFF else os.path.expanduser(value)
  return (os.environ.get('JAX_COMPILATION_CACHE_DIR')
          or os.path.join(os.path.expanduser('~'), '.cache', 'contextpose_jax', 'xla'))


def enable(directory: str | None = 'default') -> str | None:
  """Points JAX's persistent cache at `directory` ('default': see above;
  None or 'off': leaves it off). Returns the directory used."""
  if directory == 'default':
    directory = default_directory()
  if directory is None or directory.strip().lower() in OFF:
    return None
  directory = os.path.abspath(os.path.expandvars(os.path.expanduser(directory)))
  os.makedirs(directory, exist_ok=True)
  import jax  # pylint: disable=g-import-not-at-top  # not before the flags are read
  jax.config.update('jax_compilation_cache_dir', directory)
  # Cache every program that took a second or more: the small ones are
  # cheaper to compile than to look up.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  return directory
