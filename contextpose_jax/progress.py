"""What a training run shows while it works: a line before each compilation,
progress bars (tqdm) for steps and evaluation, plain console log lines.

- `Compilation`: around the first call of a jitted program, one line
  `compiling the training step, first time ~N s; cached afterwards`. N is the
  longest first call measured for the same program on this machine, kept
  beside JAX's persistent compilation cache (`compile_times.json`); without a
  measurement the line says "up to a few minutes".
- `bar`: a tqdm bar (rate, ETA) on a terminal, on process 0; off when stderr
  is a file or a pipe, where the periodic log lines carry the progress.
- `ConsoleHandler`: log lines as `HH:MM:SS message` (`WARNING HH:MM:SS ...`
  for warnings and errors), written through tqdm so a bar stays below them.
- `WorkdirLog`: every record in absl's full format (with thread ids) in
  WORKDIR/train.log; records made before the workdir exists are held until
  it does, so a run refused before any work leaves no file.
TensorBoard keeps the metrics (`metric_writers`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from typing import Any, Iterable

from absl import logging as absl_logging
import tqdm

from contextpose_jax import fileio

COMPILE_TIMES_FILE = 'compile_times.json'
_announced: set[str] = set()  # programs already compiled by this process


def _cache_directory() -> str | None:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.config.jax_compilation_cache_dir or None


def _recorded(key: str) -> float | None:
  directory = _cache_directory()
  try:
    with open(os.path.join(directory, COMPILE_TIMES_FILE)) as f:
      return float(json.load(f)[key])
  except (TypeError, OSError, ValueError, KeyError):
    return None


def _record(key: str, seconds: float) -> None:
  directory = _cache_directory()
  if directory is None or not os.path.isdir(directory):
    return
  path = os.path.join(directory, COMPILE_TIMES_FILE)
  try:
    with open(path) as f:
      times = dict(json.load(f))
  except (OSError, ValueError, TypeError):
    times = {}
  times[key] = round(max(seconds, float(times.get(key, 0.0))), 1)
  try:
    fileio.write_text_atomic(path, json.dumps(times, indent=1, sort_keys=True))
  except OSError:  # a read-only cache: the next run estimates without it
    pass


def program_key(what: str, *parts: Any) -> str:
  """A key naming one program: what it is, the backend and its devices, and
  `parts` (the model config, the batch shapes)."""
  import jax  # pylint: disable=g-import-not-at-top
  text = json.dumps([what, jax.default_backend(), jax.device_count(), *parts],
                    sort_keys=True, default=str)
  return f'{what}:{hashlib.sha256(text.encode()).hexdigest()[:16]}'


class Compilation:
  """`with Compilation('the training step', key): first_call()` logs a line
  before the first call of the program (once per process) and its time after."""

  def __init__(self, what: str, key: str, log=absl_logging.info, clock=time.monotonic):
    self.what, self.key, self.log, self.clock = what, key, log, clock
    self.first = key not in _announced

  def __enter__(self) -> 'Compilation':
    if self.first:
      seconds = _recorded(self.key)
      first_time = (f'~{seconds:.0f} s' if seconds is not None
                    else 'up to a few minutes')
      self.log(f'compiling {self.what}, first time {first_time}; cached afterwards')
      self.t0 = self.clock()
    return self

  def __exit__(self, exc_type, *exc):
    if not self.first or exc_type is not None:
      return
    _announced.add(self.key)
    seconds = self.clock() - self.t0
    self.log(f'{self.what} ready in {seconds:.0f} s')
    _record(self.key, seconds)


def bars_enabled(stream=None) -> bool:
  """Bars on a terminal only, and only on process 0."""
  stream = stream or sys.stderr
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0 and hasattr(stream, 'isatty') and stream.isatty()


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str,
        unit: str, initial: int = 0, file=None, enabled: bool | None = None) -> tqdm.tqdm:
  """A tqdm progress bar with rate and ETA (see `bars_enabled`)."""
  file = file or sys.stderr
  enabled = bars_enabled(file) if enabled is None else enabled
  # The terminal's size, followed as it changes; 80x24 where the terminal
  # reports none (tqdm would draw an empty bar, or hide it).
  try:
    sized = os.get_terminal_size(file.fileno()).columns > 0
  except (AttributeError, OSError, ValueError):
    sized = False
  return tqdm.tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=file,
                   disable=not enabled, dynamic_ncols=sized, ncols=None if sized else 80,
                   nrows=None if sized else 24,
                   leave=False, smoothing=0.1)


class ConsoleFormatter(logging.Formatter):
  """`HH:MM:SS message`; warnings and errors start with their level."""

  def format(self, record: logging.LogRecord) -> str:
    stamp = time.strftime('%H:%M:%S', time.localtime(record.created))
    level = f'{record.levelname} ' if record.levelno >= logging.WARNING else ''
    text = f'{level}{stamp} {record.getMessage()}'
    if record.exc_info:
      text += '\n' + self.formatException(record.exc_info)
    return text


class ConsoleHandler(logging.Handler):
  """Log lines on stderr, written through tqdm (a bar in progress is redrawn
  below them)."""

  def __init__(self, stream=None):
    super().__init__()
    self.stream = stream
    self.setFormatter(ConsoleFormatter())

  def emit(self, record: logging.LogRecord) -> None:
    try:
      tqdm.tqdm.write(self.format(record), file=self.stream or sys.stderr)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


class WorkdirLog(logging.Handler):
  """Every record, in absl's format, appended to DIRECTORY/NAME once the run
  is accepted (`start_workdir_logs`) and the directory exists (see the module
  docstring). Until then records are held: a refused run (a config mistake,
  another model on a resumed workdir) writes nothing into the workdir."""

  def __init__(self, directory: str, name: str = 'train.log'):
    super().__init__()
    self.directory, self.path = directory, os.path.join(directory, name)
    self._held: list[str] = []
    self._file = None
    self.started = False
    self.setFormatter(absl_logging.PythonFormatter())

  def emit(self, record: logging.LogRecord) -> None:
    try:
      line = self.format(record) + '\n'
      if self._file is None:
        if not (self.started and os.path.isdir(self.directory)):
          self._held.append(line)
          return
        self._file = open(self.path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with
        self._file.writelines(self._held)
        self._held = []
      self._file.write(line)
      self._file.flush()
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    super().close()


def start_workdir_logs() -> None:
  """The run is accepted: the `WorkdirLog`s of the root logger write from
  now on (their held records first, once the workdir exists)."""
  for handler in logging.getLogger().handlers:
    if isinstance(handler, WorkdirLog):
      handler.started = True
