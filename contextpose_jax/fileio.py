"""Complete-or-nothing file output: a reader sees the old file or the new one.

Every output of the project (eval.json, predictions, configs, converted
checkpoints, prediction folders) goes through these two helpers, so a crash,
a kill or a full disk never leaves a half-written file under its final name.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from typing import Callable, Iterator


def current_umask() -> int:
  """The process umask, read without changing it where Linux allows
  (``os.umask`` can only be read by setting it, racing other threads)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def apply_umask(path: str) -> None:
  """Gives `path` (a directory tree made by tempfile: 0700 / 0600) the modes
  a plain mkdir / open would have given it under the user's umask."""
  mask = current_umask()
  for root, dirs, files in os.walk(path):
    os.chmod(root, 0o777 & ~mask)
    for name in files:
      p = os.path.join(root, name)
      if not os.path.islink(p):
        executable = os.stat(p).st_mode & stat.S_IXUSR
        os.chmod(p, (0o777 if executable else 0o666) & ~mask)
    del dirs  # os.walk visits them as roots


def write_atomic(path: str, write: Callable[[str], None]) -> None:
  """Calls `write(tmp_path)` on a temporary file beside `path`, then renames
  it into place (atomic on POSIX)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.',
                             suffix='.tmp')
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_text_atomic(path: str, text: str) -> None:
  def write(tmp):
    with open(tmp, 'w') as f:
      f.write(text)
  write_atomic(path, write)


@contextlib.contextmanager
def new_directory(path: str) -> Iterator[str]:
  """Yields a staging directory that becomes `path` when the block succeeds.

  `path` must not exist. On any error the staging directory is removed, so
  a failure never leaves a partial output. The result gets the user's umask.
  """
  path = os.path.abspath(path)
  if os.path.lexists(path):
    raise FileExistsError(f'{path}: already exists; choose a new output directory')
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix='.tmp-' + os.path.basename(path) + '-', dir=parent)
  try:
    yield staging
    apply_umask(staging)
    os.rename(staging, path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
