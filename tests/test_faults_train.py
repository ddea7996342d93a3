"""Training faults (issue #12): each mistake or interruption gets the exact
failure, one line naming the field or file, and nothing lost or left behind.

- config mistakes (typos, sizes, names, paths, an eval batch the devices do
  not divide, an unfinished dataset) fail before any work, one line, exit 1,
  and the workdir is not created;
- a second training in a workdir gets one line naming the holder and
  leaves the run alone; the lock of a run killed with -9 is taken over;
- SIGINT stops a run after the current step with that step saved.

The SIGTERM resume (bit-identical parameters) and the quiet healthy run are
in tests/test_train_e2e.py, which already trains the reference runs.
"""
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

import train_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = train_fixtures.CONFIG
# absl log lines (I/W/E + date) are not the error: the error is the one line
# that is not a log line.
LOG_LINE = re.compile(r'^[IWE]\d{4} ')


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return train_fixtures.make_env(tmp_path_factory, 'faults_train')


_cmd = train_fixtures.main_cmd


def _error_line(proc):
  """The one non-log line of stderr; asserts there is exactly one."""
  lines = [l for l in proc.stderr.splitlines() if l.strip() and not LOG_LINE.match(l)]
  assert len(lines) == 1, proc.stderr[-4000:]
  assert 'Traceback' not in proc.stderr
  return lines[0]


def _fails(env, workdir, *extra, environ=None):
  proc = subprocess.run(_cmd(env, workdir, *extra), env=environ or env['environ'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-4000:])
  return _error_line(proc)


# --- configuration, through the command line --------------------------------

@pytest.mark.parametrize('extra, expected', [
    (('--config.nonexistent=1',),
     "error: --config.nonexistent=1: config has no field 'nonexistent'"),
    (('--config.data.batch_sise=4',),
     "error: --config.data.batch_sise=4: config.data has no field 'batch_sise' "
     '(Did you mean "batch_size" instead of "batch_sise"?)'),
    (('--config.batch_size=abc',), 'error: flag --config.batch_size=abc: '),
    (('--config=configs/no_such_config.py',),
     'error: --config=configs/no_such_config.py: cannot load the config file'),
    (('--config.batch_size=0',), 'error: config.data.batch_size=0 must be a positive integer'),
    (('--config.num_epochs=-1',), 'error: config.num_epochs=-1 must be a positive integer'),
    (('--config.checkpoint_every_steps=0',),
     'error: config.checkpoint_every_steps=0 must be a positive integer'),
    (('--config.model.backbone=resnet50',),
     "error: config.model.backbone='resnet50' is not one of: hrnet_32, hrnet_48, cpn"),
    (('--config.data.name=h36m',),
     "error: config.data.name='h36m' is not a known dataset; known: human36m, "
     'mpi_inf_3dhp, synthetic_human36m'),
    (('--config.backbone_init=/no/such/weights',),
     'error: config.backbone_init=/no/such/weights: no such directory'),
], ids=['typo', 'typo-did-you-mean', 'bad-int', 'missing-config-file', 'batch-0',
        'epochs-negative', 'checkpoint-interval-0', 'backbone', 'dataset-name',
        'backbone-init'])
def test_config_mistake_is_one_line_before_any_work(env, tmp_path, extra, expected):
  workdir = tmp_path / 'run'
  assert _fails(env, workdir, *extra).startswith(expected)
  assert not workdir.exists()


def test_eval_batch_not_divisible_by_devices_fails_before_training(env, tmp_path):
  # Used to train a whole epoch, then crash at the first evaluation.
  workdir = tmp_path / 'run'
  environ = dict(env['environ'], XLA_FLAGS='--xla_force_host_platform_device_count=2')
  line = _fails(env, workdir, '--config.data.eval_batch_size=33', environ=environ)
  assert line == ('error: config.data.eval_batch_size=33 is not divisible by the 2 '
                  'devices; use a multiple of 2')
  assert not workdir.exists()


def test_unfinished_dataset_is_one_line(env, tmp_path):
  data_dir = tmp_path / 'data'
  (data_dir / 'synthetic_human36m' / '.incomplete-1.0.0').mkdir(parents=True)
  workdir = tmp_path / 'run'
  line = _fails(env, workdir, f'--config.data.data_dir={data_dir}',
                '--config.data.build_if_missing=False')
  assert line.startswith(f'error: data_dir={data_dir} holds only an unfinished build '
                         "of 'synthetic_human36m'")
  assert not workdir.exists()


# --- configuration, in process (every check, fast) ---------------------------

def _config(env, **overrides):
  from configs import tiny_test
  config = tiny_test.get_config()
  config.data.data_dir = env['data_dir']
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split('__')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.mark.parametrize('overrides, message', [
    (dict(data__eval_batch_size=0), 'config.data.eval_batch_size=0 must be a positive'),
    (dict(batch_size=-16), 'config.data.batch_size=-16 must be a positive'),
    (dict(batch_size=18), 'config.data.batch_size=18 is not divisible by the 4 devices'),
    (dict(data__eval_batch_size=30), 'config.data.eval_batch_size=30 is not divisible by the 4'),
    (dict(log_every_steps=0), 'config.log_every_steps=0 must be a positive'),
    (dict(eval_every_epochs=0), 'config.eval_every_epochs=0 must be a positive'),
    (dict(max_checkpoints_to_keep=0), 'config.max_checkpoints_to_keep=0 must be a positive'),
    (dict(steps_per_epoch=0), 'config.steps_per_epoch=0 must be a positive integer, or -1'),
    (dict(learning_rate=0.0), 'config.learning_rate=0.0 must be a positive number'),
    (dict(data__num_workers=-1), 'config.data.num_workers=-1 must be a non-negative'),
    (dict(model__dataset='3dhp'), "config.model.dataset='3dhp' does not match "
                                  "config.data.name='synthetic_human36m'"),
    (dict(model__dataset='coco'), "config.model.dataset='coco' is not one of: h36m, 3dhp"),
    (dict(init_from='/no/such/run'), 'config.init_from=/no/such/run: no such directory'),
    (dict(eval_only=True), 'config.eval_only=True needs --config.init_from=DIR'),
    (dict(batch_size=2048), 'config.data.batch_size=2048 is larger than the 1024 examples'),
], ids=lambda v: '-'.join(v) if isinstance(v, dict) else None)
def test_every_field_check(env, overrides, message):
  from contextpose_jax import config_validation
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate(_config(env, **overrides), device_count=4)
  assert str(e.value).startswith(message), str(e.value)
  assert '\n' not in str(e.value)


def test_valid_config_and_paths_pass(env, tmp_path):
  from contextpose_jax import config_validation
  from contextpose_jax.data import pipeline
  config_validation.validate(_config(env), device_count=4)
  # A directory that is neither a converter output nor a workdir.
  with pytest.raises(config_validation.ConfigError, match='not a converter output'):
    config_validation.validate(_config(env, backbone_init=str(tmp_path)), device_count=1)
  with pytest.raises(config_validation.ConfigError, match='neither a converter output'):
    config_validation.validate(_config(env, init_from=str(tmp_path)), device_count=1)
  # A data_dir without the dataset: the pipeline's one line, naming the build.
  with pytest.raises(pipeline.DatasetError, match='is not built under data_dir'):
    config_validation.validate(_config(env, data__data_dir=str(tmp_path)), device_count=1)


# --- preemption: the signal handler ------------------------------------------

def test_preemption_guard_turns_a_signal_into_a_request():
  from contextpose_jax import train

  class NoSyncPoint:
    def reached_preemption(self, step):
      return False

  before = signal.getsignal(signal.SIGTERM)
  with train.PreemptionGuard(NoSyncPoint()) as guard:
    assert not guard.requested(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)  # Python runs the handler between bytecodes
    assert guard.requested(2) and guard.signum == signal.SIGTERM
    # A second SIGTERM would act at once: the default action is back.
    assert signal.getsignal(signal.SIGTERM) == before
  assert signal.getsignal(signal.SIGTERM) == before
  e = train.Preempted(42, '/w/checkpoints/42', signal.SIGTERM)
  assert str(e) == ('preempted (SIGTERM) at step 42: checkpoint saved to '
                    '/w/checkpoints/42; rerun the same command to resume')


# --- the workdir lock, with real processes; SIGINT ----------------------------

class _Run:
  """A training subprocess whose stderr is collected as it comes."""

  def __init__(self, env, workdir, *extra):
    self.proc = subprocess.Popen(_cmd(env, workdir, *extra), env=env['environ'], cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
    self.lines = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stderr:
      self.lines.append(line)

  def wait_for(self, pattern, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
      for line in list(self.lines):
        m = re.search(pattern, line)
        if m:
          return m
      assert self.proc.poll() is None, self.stderr()[-4000:]
      time.sleep(0.1)
    raise AssertionError(f'no {pattern!r} in:\n{self.stderr()[-4000:]}')

  def stderr(self):
    return ''.join(self.lines)

  def finish(self, timeout=600):
    code = self.proc.wait(timeout=timeout)
    self._reader.join(timeout=60)
    return code

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


def test_second_run_refused_stale_lock_recovered_sigint_saves(env, tmp_path):
  workdir = tmp_path / 'run'
  # Checkpoints every 4 steps, every step logged; far more steps than the
  # test lets a run take, so no run ends (and releases its lock) by itself.
  total = 400
  short = ('--config.num_epochs=1', f'--config.steps_per_epoch={total}',
           '--config.checkpoint_every_steps=4', '--config.log_every_steps=1')
  first = _Run(env, workdir, *short)
  try:
    first.wait_for(rf'step 1/{total}:')
    holder = json.loads((workdir / '.lock').read_text())
    assert holder['pid'] == first.proc.pid and holder['purpose'] == 'training'

    # A second training in the same workdir: one line naming the holder.
    before = sorted(p.name for p in workdir.iterdir())
    line = _fails(env, workdir, *short)
    assert line.startswith(f'error: {workdir} is locked by pid {first.proc.pid} on '
                           f'{socket.gethostname()} (training, since '), line
    assert first.proc.poll() is None  # the first run goes on
    assert set(before) <= {p.name for p in workdir.iterdir()}

    # kill -9 after a checkpoint: the lock file stays, naming a dead process.
    # (Any committed step: orbax keeps only the latest two.)
    deadline = time.time() + 600
    while not list((workdir / 'checkpoints').glob('*/_CHECKPOINT_METADATA')):
      assert first.proc.poll() is None and time.time() < deadline, first.stderr()[-4000:]
      time.sleep(0.05)
  finally:
    first.kill()
  assert (workdir / '.lock').exists()

  # A third run takes the stale lock over, resumes, and is stopped by SIGINT.
  third = _Run(env, workdir, *short)
  try:
    third.wait_for(rf'Took over the workdir lock of pid {first.proc.pid} ')
    third.wait_for(r'Resumed from .* at step \d+')
    reached = int(third.wait_for(rf'step (\d+)/{total}:').group(1))
    third.proc.send_signal(signal.SIGINT)
    assert third.finish() == 128 + signal.SIGINT
  finally:
    third.kill()
  last = third.stderr().strip().splitlines()[-1]
  m = re.fullmatch(r'preempted \(SIGINT\) at step (\d+): checkpoint saved to (\S+); '
                   r'rerun the same command to resume', last)
  assert m, third.stderr()[-4000:]
  step = int(m.group(1))
  assert reached <= step < total
  assert (workdir / 'checkpoints' / str(step) / '_CHECKPOINT_METADATA').exists()
  assert 'Traceback' not in third.stderr()
  assert not (workdir / '.lock').exists()  # released on the way out


def test_sigterm_on_one_host_stops_both_at_the_same_step(env, tmp_path):
  # Two processes (jax.distributed, CPU): SIGTERM to process 1 only; JAX's
  # preemption service makes both save the same step and stop.
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  workdir = tmp_path / 'run'
  short = ('--config.num_epochs=1', '--config.steps_per_epoch=40',
           '--config.log_every_steps=1', f'--coordinator_address=127.0.0.1:{port}',
           '--num_processes=2')
  runs = [_Run(env, workdir, *short, f'--process_id={i}') for i in (0, 1)]
  try:
    runs[0].wait_for(r'step 3/40:')
    runs[1].proc.send_signal(signal.SIGTERM)
    codes = [r.finish(timeout=300) for r in runs]
  finally:
    for r in runs:
      r.kill()
  assert codes == [128 + signal.SIGTERM] * 2, [r.stderr()[-2000:] for r in runs]
  lasts = [r.stderr().strip().splitlines()[-1] for r in runs]
  assert lasts[0] == lasts[1], lasts
  m = re.fullmatch(r'preempted \(SIGTERM\) at step (\d+): checkpoint saved to (\S+); '
                   r'rerun the same command to resume', lasts[0])
  assert m, lasts
  step = int(m.group(1))
  assert 3 < step < 40
  assert (workdir / 'checkpoints' / str(step) / '_CHECKPOINT_METADATA').exists()
  assert not (workdir / '.lock').exists()


def test_older_workdir_that_cannot_resume_exactly_is_one_line(env, tmp_path):
  # A workdir of the version that dropped each epoch's last partial batch:
  # its checkpoints' metadata has no `epoch_steps`. With 1,024 examples in
  # batches of 17 it cannot continue exactly (60 steps per epoch then, 61 now).
  workdir = tmp_path / 'old'
  args = ('--config.num_epochs=1', '--config.steps_per_epoch=2', '--config.batch_size=17')
  proc = subprocess.run(_cmd(env, workdir, *args), env=env['environ'], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  path = workdir / 'checkpoints' / '2' / 'meta' / 'metadata'
  meta = json.loads(path.read_text())
  assert meta == {'step': 2, 'nan_count': 0, 'epoch_steps': 61}
  del meta['epoch_steps']
  path.write_text(json.dumps(meta))
  before = sorted(str(p.relative_to(workdir)) for p in (workdir / 'checkpoints').rglob('*'))
  line = _fails(env, workdir, *args)
  assert line == (f'error: {workdir}/checkpoints/2 was written by an older version whose '
                  'epochs dropped the last partial batch (60 steps per epoch, now the '
                  'official 61); it cannot be continued exactly: start a new --workdir, '
                  'or finish it with the version that wrote it'), line
  assert before == sorted(str(p.relative_to(workdir))
                          for p in (workdir / 'checkpoints').rglob('*'))
