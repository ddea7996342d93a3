"""Metric writers: TensorBoard event files and the log, without TensorFlow.

The method names are clu's `MetricWriter` interface (`write_scalars`,
`write_hparams`, `flush`, `close`), so a clu writer can stand in for these.
clu's own writers are not used: importing `clu.metric_writers` imports
TensorFlow, a 600 MB dependency that training and inference never need. The
event files are written with TensorBoard's TF-free `EventFileWriter`.
"""
from __future__ import annotations

import os
import sys
import time
import types
from typing import Any, Mapping, Sequence

from absl import logging

# TensorBoard's event writer imports all of TensorFlow when it is installed
# (seconds, and TF's C++ logging prints "WARNING: All log messages before
# absl::InitializeLog()..."); `tensorboard.compat.notf` is TensorBoard's own
# switch to its TF-free stub, which writes the same event files.
sys.modules.setdefault('tensorboard.compat.notf', types.ModuleType('tensorboard.compat.notf'))

# pylint: disable=g-import-not-at-top,wrong-import-position
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter
# pylint: enable=g-import-not-at-top,wrong-import-position


class TensorBoardWriter:
  """Scalars and hyper-parameters as TensorBoard event files under `logdir`."""

  def __init__(self, logdir: str):
    self._writer = EventFileWriter(logdir)

  def _add(self, step: int, summary) -> None:
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
              for k, v in scalars.items()]
    self._add(step, summary_pb2.Summary(value=values))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._add(0, hparams_summary.hparams_pb(dict(hparams)))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class LoggingWriter:
  """Scalars as one INFO line per step."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    text = ', '.join(f'{k}={_format(v)}' for k, v in sorted(scalars.items()))
    logging.info('[%d] %s', step, text)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    del hparams  # config.json in the workdir records them

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class MultiWriter:
  """Writes to each of `writers`."""

  def __init__(self, writers: Sequence[Any]):
    self._writers = tuple(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    for w in self._writers:
      w.write_scalars(step, scalars)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    for w in self._writers:
      w.write_hparams(hparams)

  def flush(self) -> None:
    for w in self._writers:
      w.flush()

  def close(self) -> None:
    for w in self._writers:
      w.close()


def create_default_writer(logdir: str, *, just_logging: bool = False) -> MultiWriter:
  """The log, plus TensorBoard events in `logdir` (not on non-zero hosts)."""
  writers = [LoggingWriter()]
  if not just_logging:
    writers.append(TensorBoardWriter(os.fspath(logdir)))
  return MultiWriter(writers)


def _format(v) -> str:
  return f'{v:.6g}' if isinstance(v, float) else str(v)
