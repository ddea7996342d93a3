"""Training / evaluation progress (issue #27): the line before a compilation
and its remembered time, tqdm bars with rate and ETA, plain console lines,
the full log in the workdir. A tiny fake loop, no training."""
import io
import json
import logging
import os
import re

import jax
import pytest

from contextpose_jax import progress


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  """A fresh persistent-cache directory, and a process that has compiled nothing."""
  directory = tmp_path / 'xla'
  directory.mkdir()
  previous = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', str(directory))
  monkeypatch.setattr(progress, '_announced', set())
  yield directory
  jax.config.update('jax_compilation_cache_dir', previous)


def test_compilation_line_before_and_its_time_remembered(cache_dir, monkeypatch):  # pylint: disable=redefined-outer-name
  lines = []
  key = progress.program_key('train_step', {'embed_dim': 8}, 4)
  assert key == progress.program_key('train_step', {'embed_dim': 8}, 4)
  assert key != progress.program_key('train_step', {'embed_dim': 16}, 4)
  clock = iter([100.0, 137.4]).__next__
  with progress.Compilation('the training step', key, log=lines.append, clock=clock):
    lines.append('(first call)')
  assert lines == ['compiling the training step, first time up to a few minutes; '
                   'cached afterwards', '(first call)', 'the training step ready in 37 s']
  assert json.loads((cache_dir / progress.COMPILE_TIMES_FILE).read_text()) == {key: 37.4}
  # Later calls in this process compile nothing: no line.
  lines.clear()
  with progress.Compilation('the training step', key, log=lines.append, clock=clock):
    pass
  assert lines == []
  # The next process says how long the first time took here; a faster
  # (cached) first call does not lower the figure.
  monkeypatch.setattr(progress, '_announced', set())
  clock = iter([0.0, 2.0]).__next__
  with progress.Compilation('the training step', key, log=lines.append, clock=clock):
    pass
  assert lines == ['compiling the training step, first time ~37 s; cached afterwards',
                   'the training step ready in 2 s']
  assert json.loads((cache_dir / progress.COMPILE_TIMES_FILE).read_text()) == {key: 37.4}


def test_failed_first_call_is_not_remembered(cache_dir):
  key = progress.program_key('predict_step', {}, 1)
  with pytest.raises(RuntimeError):
    with progress.Compilation('the evaluation step', key, log=lambda _: None):
      raise RuntimeError('out of memory')
  assert not (cache_dir / progress.COMPILE_TIMES_FILE).exists()
  assert key not in progress._announced  # pylint: disable=protected-access


def test_bar_shows_rate_and_eta_of_a_fake_loop():
  out = io.StringIO()
  bar = progress.bar(total=6, initial=1, desc='training', unit='step', file=out, enabled=True)
  for _ in range(5):
    bar.update(1)
  bar.refresh()
  text = out.getvalue()
  bar.close()
  last = text.replace('\r', '\n').strip().splitlines()[-1]
  assert re.search(r'^training: 100%\|.*\| 6/6 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(step/s|s/step)\]',
                   last), text
  # Evaluation: an iterable with len() gets a total (and so an ETA).
  out = io.StringIO()
  items = list(progress.bar(range(3), desc='evaluation', unit='batch', file=out, enabled=True))
  assert items == [0, 1, 2] and ' 0/3 [' in out.getvalue()  # a total


def test_no_bar_off_a_terminal():
  out = io.StringIO()
  assert not progress.bars_enabled(out)
  bar = progress.bar(total=3, desc='training', unit='step', file=out)
  bar.update(3)
  bar.close()
  assert out.getvalue() == ''


def _record(level, message):
  return logging.LogRecord('absl', level, __file__, 1, message, None, None)


def test_console_lines_are_plain():
  out = io.StringIO()
  handler = progress.ConsoleHandler(out)
  handler.emit(_record(logging.INFO, 'step 64/384: 3.1 steps/s'))
  handler.emit(_record(logging.WARNING, 'careful'))
  lines = out.getvalue().splitlines()
  assert re.fullmatch(r'\d\d:\d\d:\d\d step 64/384: 3\.1 steps/s', lines[0]), lines
  assert re.fullmatch(r'WARNING \d\d:\d\d:\d\d careful', lines[1]), lines


def test_workdir_log_keeps_everything_once_the_run_is_accepted(tmp_path):
  workdir = tmp_path / 'run'
  handler = progress.WorkdirLog(str(workdir))
  handler.emit(_record(logging.INFO, 'before the workdir'))
  assert not workdir.exists()  # nothing created for a run refused early
  workdir.mkdir()
  handler.emit(_record(logging.INFO, 'checks'))
  assert os.listdir(workdir) == []  # an existing workdir: nothing until accepted
  logging.getLogger().addHandler(handler)
  try:
    progress.start_workdir_logs()
  finally:
    logging.getLogger().removeHandler(handler)
  handler.emit(_record(logging.INFO, 'after'))
  handler.close()
  lines = (workdir / 'train.log').read_text().splitlines()
  # absl's format: level, date, time, thread id, file:line.
  assert [l.split('] ', 1)[1] for l in lines] == ['before the workdir', 'checks', 'after']
  assert all(re.match(r'I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ test_progress\.py:1\]', l)
             for l in lines), lines
  assert os.path.getsize(workdir / 'train.log') > 0
