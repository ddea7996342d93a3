"""An exclusive lock on a directory (a dataset being built, a training workdir).

  with locking.DirLock(directory, purpose='dataset build'):
    ...                        # a second process gets LockHeldError

The lock is `fcntl.flock` on DIRECTORY/.lock, a file holding the holder's
pid, host and start time (JSON), so that the error can name the holder:

  /data/human36m is locked by pid 1234 on host-a (dataset build, since
  2026-01-02 10:00:00); wait for it to end, or stop it

Stale locks recover by themselves: the kernel drops a flock when its holder
dies, and the file is taken over. One case needs more: a child that was
forked (not exec'd) by the holder shares the locked file and keeps the lock
after the holder died. If the recorded pid is on this host and no longer
runs, the file is replaced by a fresh one (the orphan keeps a lock on a file
that no longer has a name).

`flock` is advisory and per open file: it works on local file systems and
on NFS (Linux emulates it with POSIX locks there).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

LOCK_FILE = '.lock'


class LockHeldError(RuntimeError):
  """Another process holds the lock; the message names it (pid, host)."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, another user's
    return True
  return True


def read_holder(path: str) -> dict | None:
  """The holder recorded in the lock file `path` (None if unknown)."""
  try:
    with open(path) as f:
      holder = json.load(f)
  except (OSError, ValueError):
    return None
  return holder if isinstance(holder, dict) else None


def _read_fd(fd: int) -> dict | None:
  try:
    holder = json.loads(os.pread(fd, 4096, 0).decode())
  except (OSError, ValueError):
    return None
  return holder if isinstance(holder, dict) else None


def describe_holder(holder: dict | None) -> str:
  if not holder:
    return 'another process'
  since = time.strftime('%Y-%m-%d %H:%M:%S',
                        time.localtime(holder.get('start_time', 0)))
  what = f'{holder["purpose"]}, ' if holder.get('purpose') else ''
  return (f'pid {holder.get("pid")} on {holder.get("host")} '
          f'({what}since {since})')


class DirLock:
  """Exclusive, non-blocking lock on `directory` (created if missing)."""

  def __init__(self, directory: str, *, purpose: str = '',
               name: str = LOCK_FILE):
    self.directory = directory
    self.path = os.path.join(directory, name)
    self.purpose = purpose
    self._fd = None
    self.recovered: dict | None = None  # the dead holder taken over, if any

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> 'DirLock':
    """Takes the lock or raises LockHeldError naming the holder."""
    if self._fd is not None:
      raise RuntimeError(f'{self.path}: already held by this DirLock')
    os.makedirs(self.directory, exist_ok=True)
    for _ in range(20):
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
          os.close(fd)
          raise
        try:
          holder = self._holder_when_busy(fd)
          if self._orphaned(holder) and self._still_named(fd):
            self._replace_file()
            self.recovered = holder
            continue
        finally:
          os.close(fd)
        raise LockHeldError(
            f'{self.directory} is locked by {describe_holder(holder)}; wait '
            f'for it to end, or stop it (lock file {self.path})') from None
      # The file may have been removed or replaced between open and flock
      # (a holder releasing, or a stale file being replaced): retry.
      if not self._still_named(fd):
        os.close(fd)
        continue
      previous = _read_fd(fd)
      if previous and previous.get('pid') is not None:
        self.recovered = previous  # left by a process that died
      self._write_holder(fd)
      self._fd = fd
      return self
    raise LockHeldError(f'{self.path}: could not take the lock (the file '
                        'kept changing)')

  def _still_named(self, fd: int) -> bool:
    """Whether the lock path still names the file open as `fd`."""
    try:
      return os.path.samestat(os.fstat(fd), os.stat(self.path))
    except FileNotFoundError:
      return False

  @staticmethod
  def _holder_when_busy(fd: int) -> dict | None:
    # The holder writes its record right after taking the lock.
    for _ in range(10):
      holder = _read_fd(fd)
      if holder:
        return holder
      time.sleep(0.05)
    return None

  @staticmethod
  def _orphaned(holder: dict | None) -> bool:
    """Locked, but the recorded holder on this host is dead."""
    return bool(holder and holder.get('host') == socket.gethostname()
                and isinstance(holder.get('pid'), int)
                and holder['pid'] != os.getpid()
                and not _pid_alive(holder['pid']))

  def _replace_file(self) -> None:
    tmp = f'{self.path}.{os.getpid()}.new'
    with open(tmp, 'w'):
      pass
    os.replace(tmp, self.path)

  def _write_holder(self, fd: int) -> None:
    record = json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                         'start_time': time.time(), 'purpose': self.purpose})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      # Remove the name while still holding the lock; a process that opened
      # the old file sees it is gone (samestat) and retries.
      os.unlink(self.path)
    except FileNotFoundError:
      pass
    finally:
      os.close(self._fd)  # drops the flock
      self._fd = None

  def __enter__(self) -> 'DirLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def lock_dir(directory: str, *, purpose: str = '',
             name: str = LOCK_FILE) -> DirLock:
  """A held DirLock on `directory` (use as a context manager, or release())."""
  return DirLock(directory, purpose=purpose, name=name).acquire()
