"""Training faults (issue #12): each mistake or interruption gets the exact
failure, one line naming the field or file, and nothing lost or left behind.

- config mistakes (typos, sizes, names, paths, an eval batch the devices do
  not divide, an unfinished dataset) fail before any work, one line, exit 1,
  and the workdir is not created;
- a second training in a workdir gets one line naming the holder and
  leaves the run alone; the lock of a run killed with -9 is taken over;
- SIGINT stops a run after the current step with that step saved;
- (issue #28) divergence stops the run in one line and saves nothing
  diverged; a resumed run with another model or data is refused before
  config.json is touched; a damaged checkpoint falls back to the newest
  intact one; a failed or impossible save (full disk) is one line and leaves
  no orbax temporary folder; every model-config field is checked, in a
  config and in a model directory's model_config.json.

The SIGTERM resume (bit-identical parameters) and the quiet healthy run are
in tests/test_train_e2e.py, which already trains the reference runs.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import train_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = train_fixtures.CONFIG
# Console log lines (`HH:MM:SS message`, `WARNING HH:MM:SS ...`:
# contextpose_jax/progress.py) are not the error: the error is the one line
# that is not a log line.
LOG_LINE = re.compile(r'^((WARNING|ERROR|CRITICAL) )?\d\d:\d\d:\d\d ')


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


def test_another_synthetic_set_is_one_line_not_trained_on(env, tmp_path):
  """(issue #27) The data_dir holds the tiny set; a config asking for another
  size is refused before any work, naming what was found and asked."""
  workdir = tmp_path / 'run'
  line = _fails(env, workdir, '--config.data.synthetic.num_train=2048')
  final_dir = os.path.join(env['data_dir'], 'synthetic_human36m', '1.0.0')
  assert line.startswith(f'error: {final_dir} holds another synthetic set: '
                         'num_train=1024; the config asks for num_train=2048. '
                         'Rebuild it with `capf-build-dataset synthetic_human36m '
                         f'--data_dir={env["data_dir"]} --num_train=2048 '), line
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
    # Every model field (issue #28), before any file is written.
    (dict(model__embed_dim=12, model__num_heads=5),
     'config.model.embed_dim=12 is not divisible by num_heads=5'),
    (dict(model__embed_dim=6, model__num_heads=3),
     'config.model.embed_dim=6 is not divisible by the 4 heads of the deformable blocks'),
    (dict(model__lifter_dtype='float8'),
     "config.model.lifter_dtype='float8' is not one of: float32, bfloat16"),
    (dict(model__matmul_precision='low'),
     "config.model.matmul_precision='low' is not one of: highest, high, default"),
    (dict(model__drop_path_rate=5.0), 'config.model.drop_path_rate=5.0 must be a number in [0, 1)'),
    (dict(model__attn_drop_rate=-0.1),
     'config.model.attn_drop_rate=-0.1 must be a number in [0, 1)'),
    (dict(model__mlp_ratio=0.0), 'config.model.mlp_ratio=0.0 must be a positive number'),
    (dict(model__depth=0), 'config.model.depth=0 must be a positive integer'),
    (dict(data__data_dir=os.path.abspath(__file__)),
     f'config.data.data_dir={os.path.abspath(__file__)}: a file, not a directory'),
    (dict(init_from=os.path.abspath(__file__)),
     f'config.init_from={os.path.abspath(__file__)}: a file, not a directory'),
    (dict(divergence__max_nonfinite_steps=-1),
     'config.divergence.max_nonfinite_steps=-1 must be a non-negative integer'),
    (dict(divergence__max_loss_mm=-1.0),
     'config.divergence.max_loss_mm=-1.0 must be a non-negative number'),
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


# --- issue #28: divergence, changed configs, damaged checkpoints, full disks ---

def test_divergence_policy_in_one_line():
  from contextpose_jax import divergence
  watch = divergence.Watch(divergence.Policy(max_nonfinite_steps=3, max_loss_mm=1e5,
                                             max_grad_norm=0.0))
  nan = float('nan')
  assert watch.observe(1, 0.5, 1.0) is None and watch.last_finite == (1, 500.0)
  assert watch.observe(2, nan, nan) is None and watch.observe(3, float('inf'), nan) is None
  assert watch.streak == 2
  assert watch.observe(4, 0.4, 1e30) is None  # a finite step ends the streak; norm: off
  assert watch.streak == 0 and watch.last_finite == (4, 400.0)
  for step in (5, 6):
    assert watch.observe(step, nan, nan) is None
  assert watch.observe(7, nan, nan) == (
      '3 consecutive steps with a non-finite loss, skipped '
      '(config.divergence.max_nonfinite_steps=3)')
  assert watch.last_finite == (4, 400.0)
  assert divergence.Watch(divergence.Policy()).observe(1, 200.0, 1.0) == (
      'loss 2e+05 mm above config.divergence.max_loss_mm=100000')
  assert divergence.Watch(divergence.Policy(max_grad_norm=10.0)).observe(1, 0.5, 11.0) == (
      'gradient norm 11 above config.divergence.max_grad_norm=10')
  off = divergence.Watch(divergence.Policy(0, 0.0, 0.0))  # every rule off
  assert all(off.observe(s, nan, nan) is None for s in range(100))
  e = divergence.Diverged(7, 'why', (4, 400.0), '/w/checkpoints/4')
  assert str(e) == ('training diverged at step 7: why; last finite loss 400.0 mm at step 4; '
                    'last good checkpoint /w/checkpoints/4 (a rerun resumes from it: lower '
                    '--config.learning_rate first)')
  assert str(divergence.Diverged(3, 'why', None, None)) == (
      'training diverged at step 3: why; no finite loss in this run; no good checkpoint '
      '(a rerun starts from step 0)')
  assert str(divergence.Diverged(9, 'why', (5, 1.0), '/w/checkpoints/4',
                                 ['/w/diverged/checkpoints.5'])).endswith(
      'lower --config.learning_rate first); the later ones, whose weights diverged, moved to '
      '/w/diverged/checkpoints.5')
  # The params check before every save.
  import jax.numpy as jnp
  assert divergence.all_finite({'a': jnp.ones(3), 'n': jnp.int32(1)})
  assert not divergence.all_finite({'a': jnp.array([1.0, jnp.inf])})


def test_non_finite_predictions_are_one_line_not_an_svd_error(env):
  import numpy as np
  from contextpose_jax import evaluate
  config = _config(env)
  preds = {'pred': np.zeros((4, 17, 3), np.float32), 'gt': np.zeros((4, 17, 3), np.float32),
           'action': np.full(4, 2), 'subaction': np.ones(4, int)}
  preds['pred'][1, 3] = np.nan
  preds['pred'][2, 0, 0] = np.inf
  with pytest.raises(evaluate.NonFinitePredictions) as e:
    evaluate.check_finite(config, preds)
  assert str(e.value) == ('the model predicts non-finite poses for 2 of 4 examples of '
                          'synthetic_human36m/validation')


def _steps(directory):
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_divergence_stops_in_one_line_and_leaves_nothing_diverged(env, tmp_path):
  import jax
  import numpy as np
  from contextpose_jax import checkpoints
  workdir = tmp_path / 'run'
  # lr 1e9: step 1's loss (of the initial weights) is finite and its update
  # blows the weights up; the next steps are skipped (non-finite) or above
  # the loss limit. Step 1 is saved (every step is a save point), then set
  # aside: its weights are the diverged ones.
  proc = subprocess.run(_cmd(env, workdir, '--config.num_epochs=1', '--config.steps_per_epoch=40',
                             '--config.learning_rate=1e9', '--config.log_every_steps=1',
                             '--config.checkpoint_every_steps=1'),
                        env=env['environ'], cwd=REPO, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 1, proc.stderr[-4000:]
  line = _error_line(proc)
  m = re.fullmatch(
      r'error: training diverged at step (\d+): (5 consecutive steps with a non-finite loss, '
      r'skipped \(config\.divergence\.max_nonfinite_steps=5\)|loss \S+ mm above '
      r'config\.divergence\.max_loss_mm=100000); last finite loss [\d.]+ mm at step 1; no '
      r'good checkpoint \(a rerun starts from step 0\); the later ones, whose weights '
      rf'diverged, moved to {workdir}/diverged/checkpoints\.1', line)
  assert m, line
  if m.group(2).startswith('5 consecutive'):
    assert int(m.group(1)) == 6
    # The skipped steps are counted on the console's progress line.
    assert re.search(r'step 5/40: .*, 4 skipped \(non-finite loss\)$', proc.stderr, re.M)
  else:
    assert int(m.group(1)) == 2
  # Nothing diverged is left to resume from, no evaluation ran, nothing
  # non-finite was written.
  assert _steps(workdir / 'checkpoints') == [] and _steps(workdir / 'best') == []
  assert [p.name for p in (workdir / 'diverged').iterdir()] == ['checkpoints.1']
  assert not (workdir / 'eval.json').exists() and not (workdir / '.lock').exists()
  variables = checkpoints._restore_step(str(workdir / 'diverged' / 'checkpoints.1'), 'state')
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))


def test_resume_with_another_model_is_refused_before_anything_is_written(env, tmp_path):
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints' / '4').mkdir(parents=True)
  config_json = _config(env).to_json_best_effort(indent=2)
  (workdir / 'config.json').write_text(config_json)
  line = _fails(env, workdir, '--config.model.embed_dim=32', '--config.seed=1',
                '--config.num_epochs=9')
  assert line == (f'error: --workdir={workdir} was trained with another model or data '
                  f'({workdir}/config.json): model.embed_dim 16 -> 32, seed 42 -> 1; resume '
                  'with its values, or use a new --workdir'), line
  assert (workdir / 'config.json').read_text() == config_json
  assert sorted(p.name for p in workdir.iterdir()) == ['checkpoints', 'config.json']


def _model_dir(tmp_path, edit):
  """A converter output's layout with an edited model_config.json (the
  weights are not read: the config is refused first)."""
  from configs import tiny_test
  directory = tmp_path / 'converted'
  (directory / 'variables').mkdir(parents=True)
  model = tiny_test.get_config().model.to_dict()
  model['backbone_kwargs'] = dict(model['backbone_kwargs'])
  edit(model)
  (directory / 'model_config.json').write_text(json.dumps({'model_config': model}))
  return directory


@pytest.mark.parametrize('edit, message', [
    (lambda m: m.update(embed_dim='16'), "model_config.embed_dim='16' must be a positive integer"),
    (lambda m: m.pop('embed_dim'), 'model_config lacks the field(s) embed_dim'),
    (lambda m: m.update(depth=-2), 'model_config.depth=-2 must be a positive integer'),
    (lambda m: m.update(use_context='yes'), "model_config.use_context='yes' must be true or false"),
    (lambda m: m.update(colour='red'), 'model_config has unknown field(s) colour; known: '),
    (lambda m: m['backbone_kwargs'].update(depth=3),
     'model_config.backbone_kwargs has unknown field(s) depth for hrnet_32; known: '),
], ids=['string', 'missing', 'negative', 'bool', 'extra-key', 'backbone-kwarg'])
def test_edited_model_config_json_is_one_line_naming_file_and_field(tmp_path, edit, message):
  from contextpose_jax import checkpoints
  directory = _model_dir(tmp_path, edit)
  with pytest.raises(checkpoints.ModelDirectoryError) as e:
    checkpoints.read_model_config(str(directory))
  assert str(e.value).startswith(f'{directory}/model_config.json: {message}'), str(e.value)
  assert '\n' not in str(e.value)


def test_resume_compares_the_config_before_writing(env, tmp_path):
  from contextpose_jax import config_validation
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints' / '4').mkdir(parents=True)
  (workdir / 'config.json').write_text(_config(env).to_json_best_effort(indent=2))
  check = lambda **o: config_validation.check_resume(_config(env, **o), str(workdir))
  assert check() == []
  # What leaves the model, its weights and the data stream alone: allowed, listed.
  assert check(num_epochs=7, learning_rate=0.5, data__num_workers=3, weight_decay=0.2,
               model__lifter_dtype='bfloat16', divergence__max_nonfinite_steps=2) == [
      'data.num_workers 1 -> 3', 'divergence.max_nonfinite_steps 5 -> 2',
      'learning_rate 0.01 -> 0.5', 'model.lifter_dtype "float32" -> "bfloat16"',
      'num_epochs 6 -> 7', 'weight_decay 0.1 -> 0.2']
  # The model, the data, the optimizer state's layout: refused, every field named.
  with pytest.raises(config_validation.ConfigError) as e:
    check(model__depth=2, data__flip_prob=0.25, weight_decay=0.0, num_epochs=7)
  assert str(e.value) == (
      f'--workdir={workdir} was trained with another model or data ({workdir}/config.json): '
      'data.flip_prob 0.5 -> 0.25, model.depth 1 -> 2, weight_decay 0.1 -> 0.0; resume with '
      'its values, or use a new --workdir')
  # A workdir without a checkpoint has nothing to protect.
  (workdir / 'checkpoints' / '4').rmdir()
  assert check(model__depth=2) == []
  (workdir / 'best' / '8').mkdir(parents=True)
  (workdir / 'config.json').write_text('{"model": ')
  with pytest.raises(config_validation.ConfigError) as e:
    check()
  assert str(e.value) == (f'{workdir}/config.json: not a readable config (JSONDecodeError); '
                          'it records the model of the checkpoints beside it: restore it, or '
                          'use a new --workdir')


def _tiny_state(step, value, size=4096):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from contextpose_jax import steps
  # Random bits: orbax compresses, and a constant array would take no room.
  w = value + 1e-3 * np.random.default_rng(step).random(size, np.float32)
  return steps.TrainState(step=jnp.int32(step), params={'w': jnp.asarray(w)},
                          frozen_params={'b': jnp.ones(3)}, batch_stats={'s': jnp.ones(2)},
                          opt_state={'m': jnp.zeros(8)}, rng=jax.random.PRNGKey(0),
                          nan_count=jnp.int32(0))


def _truncate_largest(directory):
  files = [p for p in directory.rglob('*') if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  with open(largest, 'r+b') as f:
    f.truncate(largest.stat().st_size // 2)


def _saved(workdir, steps=(1, 2, 3), best=3):
  from contextpose_jax import checkpoints
  ckpts = checkpoints.Checkpoints(str(workdir), max_to_keep=3)
  for step in steps:
    ckpts.save_latest(_tiny_state(step, step), {'step': step})
  if best:
    ckpts.save_evaluated(_tiny_state(best, best), 50.0, {'step': best})
  ckpts.wait()
  ckpts.close()


def test_damaged_checkpoints_fall_back_to_the_newest_intact(tmp_path, monkeypatch):
  from contextpose_jax import checkpoints
  logged = []
  monkeypatch.setattr(checkpoints.logging, 'warning', lambda msg, *a: logged.append(msg % a))
  workdir = tmp_path / 'run'
  _saved(workdir)
  latest, best = workdir / 'checkpoints', workdir / 'best'
  _truncate_largest(latest / '3' / 'state')  # a truncated data file
  (latest / '2' / 'state' / '_METADATA').unlink()  # orbax's tree metadata gone
  _truncate_largest(best / '3' / 'variables')

  ckpts = checkpoints.Checkpoints(str(workdir), max_to_keep=3)
  restored, meta = ckpts.restore_latest(_tiny_state(0, 0))
  assert int(restored.step) == 1 and meta['step'] == 1
  assert abs(float(restored.params['w'][0]) - 1.0) < 0.01
  assert len(logged) == 1 and re.fullmatch(
      rf'{latest}/3 is damaged \(\w+: .+\), moved to {workdir}/damaged/checkpoints.3; '
      rf'using {latest}/1 instead', logged[0]), logged
  assert _steps(latest) == [1]
  assert sorted(p.name for p in (workdir / 'damaged').iterdir()) == [
      'checkpoints.2', 'checkpoints.3']  # kept, out of orbax's sight
  ckpts.verify_best(_tiny_state(0, 0).variables())
  assert re.fullmatch(rf'{best}: no intact checkpoint \(3: \w+: .+\), moved to '
                      rf'{workdir}/damaged/best.3; the next evaluation starts a new best',
                      logged[1]), logged
  assert ckpts.best_mpjpe() == float('inf') and _steps(best) == []
  # The run goes on from step 1: saving step 2 again works.
  ckpts.save_latest(_tiny_state(2, 7), {'step': 2})
  ckpts.wait()
  assert ckpts.latest.all_steps() == [1, 2]
  ckpts.close()

  # None intact: one line naming the workdir and what to do; nothing moved.
  other = tmp_path / 'other'
  _saved(other, steps=(1,), best=None)
  _truncate_largest(other / 'checkpoints' / '1' / 'state')
  ckpts = checkpoints.Checkpoints(str(other))
  with pytest.raises(checkpoints.CheckpointError) as e:
    ckpts.restore_latest(_tiny_state(0, 0))
  ckpts.close()
  assert re.fullmatch(rf'{other}/checkpoints: no intact checkpoint \(1: \w+: .+\); move '
                      rf'{other}/checkpoints away to start again from step 0, or use a new '
                      r'--workdir', str(e.value)), str(e.value)
  assert _steps(other / 'checkpoints') == [1] and not (other / 'damaged').exists()


def test_full_disk_before_a_save_is_one_line(tmp_path, monkeypatch):
  import collections
  from contextpose_jax import checkpoints
  workdir = tmp_path / 'run'
  _saved(workdir, steps=(1,), best=None)
  usage = collections.namedtuple('usage', 'total used free')
  monkeypatch.setattr(checkpoints.shutil, 'disk_usage', lambda p: usage(10**9, 10**9, 5000))
  ckpts = checkpoints.Checkpoints(str(workdir))
  for save in (lambda: ckpts.save_latest(_tiny_state(2, 2), {'step': 2}),
               lambda: ckpts.save_evaluated(_tiny_state(2, 2), 50.0, {'step': 2})):
    with pytest.raises(checkpoints.CheckpointError) as e:
      save()
    assert re.fullmatch(
        rf'{workdir}/(checkpoints|best)/2: checkpoint not saved \(not enough free space\); '
        r'4\.9 KB free on its disk, the checkpoint needs 16\.\d KB; (the last checkpoint, '
        rf'{workdir}/checkpoints/1, is intact|no earlier checkpoint there): free some space, '
        'then rerun the same command to resume', str(e.value)), str(e.value)
  ckpts.close()
  assert _steps(workdir / 'checkpoints') == [1] and _steps(workdir / 'best') == []
  assert not list(workdir.rglob('*.orbax-checkpoint-tmp*'))


_BACKGROUND_SAVE_ON_A_FULL_DISK = r'''
import resource, signal, sys
sys.path.insert(0, sys.argv[2])
import test_faults_train as t
from contextpose_jax import checkpoints
t._saved(sys.argv[1], steps=(1,), best=None)
ckpts = checkpoints.Checkpoints(sys.argv[1])
# Files past 64 KB fail with EFBIG (as root too), as on a full disk.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
try:
  ckpts.save_latest(t._tiny_state(2, 2, size=1 << 20), {'step': 2})
  ckpts.check_saved(wait=True)
except checkpoints.CheckpointError as e:
  print(str(e))
'''


def test_failed_background_save_is_one_line_and_leaves_nothing(tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.run([sys.executable, '-c', _BACKGROUND_SAVE_ON_A_FULL_DISK, str(workdir),
                         os.path.dirname(os.path.abspath(__file__))],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1 and re.fullmatch(
      rf'{workdir}/checkpoints/2: checkpoint not saved \(.+\); [\d.]+ [KMG]?B free on its '
      rf'disk, the checkpoint needs 4\.0 MB; the last checkpoint, {workdir}/checkpoints/1, '
      'is intact: free some space, then rerun the same command to resume', lines[0]), proc.stdout
  assert not list(workdir.rglob('*.orbax-checkpoint-tmp*'))
  from contextpose_jax import checkpoints
  ckpts = checkpoints.Checkpoints(str(workdir))
  restored, meta = ckpts.restore_latest(_tiny_state(0, 0))
  ckpts.close()
  assert int(restored.step) == 1 and meta == {'step': 1}


def test_model_config_that_does_not_match_the_weights_is_one_line(tmp_path):
  import jax
  import numpy as np
  from contextpose_jax import checkpoints
  from contextpose_jax.models import capf
  from configs import tiny_test
  model_config = tiny_test.get_config().model
  shapes = capf.variable_shapes(capf.build_model(model_config))
  directory = tmp_path / 'converted'
  capf.save_variables(str(directory), jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes),
                      model_config)
  checkpoints.load_model(str(directory))  # as written: it loads
  path = directory / 'model_config.json'
  record = json.loads(path.read_text())
  for edit, message in [
      (dict(depth=2), "params/lifter: missing ['context_blocks_1']"),
      (dict(embed_dim=32), "params/lifter: ['Spatial_pos_embed'] has shape (1, 5, 17, 16), "
                           'the model expects (1, 5, 17, 32)'),
      (dict(backbone='cpn', backbone_kwargs={}), 'batch_stats/backbone: missing ')]:
    path.write_text(json.dumps({**record, 'model_config': {**record['model_config'], **edit}}))
    with pytest.raises(checkpoints.ModelDirectoryError) as e:
      checkpoints.load_model(str(directory))
    assert str(e.value).startswith(f'{path} does not match the weights: {message}'), str(e.value)
    assert '\n' not in str(e.value)


_MAIN_ON_A_FULL_DISK = r'''
import collections, shutil, sys
usage = collections.namedtuple('usage', 'total used free')
shutil.disk_usage = lambda path: usage(10**9, 10**9 - 5000, 5000)  # 4.9 KB free
from contextpose_jax import main
sys.argv = sys.argv[1:]
main.run()
'''


def test_full_disk_during_training_stops_the_run_in_one_line(env, tmp_path):
  # The first save (step 4) finds 4.9 KB free: the run stops there, in one
  # line. (A save that fails in the background: test_failed_background_save_*.)
  # The flags of the lock test above: the same compiled step.
  workdir = tmp_path / 'run'
  cmd = _cmd(env, workdir, '--config.num_epochs=1', '--config.steps_per_epoch=400',
             '--config.checkpoint_every_steps=4', '--config.log_every_steps=1')
  proc = subprocess.run([cmd[0], '-c', _MAIN_ON_A_FULL_DISK, *cmd[1:]], env=env['environ'],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stderr[-4000:]
  line = _error_line(proc)
  assert re.fullmatch(
      rf'error: {workdir}/checkpoints/4: checkpoint not saved \(not enough free space\); '
      r'4\.9 KB free on its disk, the checkpoint needs [\d.]+ [KM]B; no earlier checkpoint '
      r'there: free some space, then rerun the same command to resume', line), line
  assert max(int(m) for m in re.findall(r'step (\d+)/400:', proc.stderr)) == 4
  assert _steps(workdir / 'checkpoints') == []
  assert not list(workdir.rglob('*.orbax-checkpoint-tmp*'))
  assert (workdir / 'config.json').exists() and not (workdir / '.lock').exists()
