"""End to end on the synthetic set with `configs/tiny_test.py`, through main.py:
training beats the mean-pose baseline, eval-only on the saved checkpoint
reproduces eval.json, and a killed run resumed from its checkpoint ends with
exactly the parameters of an uninterrupted run; so does a run stopped by
SIGTERM (it saves the step it reached). A healthy run prints no warnings."""
import json
import os
import re
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

import train_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = train_fixtures.CONFIG


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return train_fixtures.make_env(tmp_path_factory, 'e2e')


_cmd = train_fixtures.main_cmd


def _run(env, workdir, *extra):
  proc = subprocess.run(_cmd(env, workdir, *extra), env=env['environ'], cwd=REPO,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  env['runs'].setdefault('stderr', {})[str(workdir)] = proc.stderr
  return proc


def _latest_state(workdir):
  import orbax.checkpoint as ocp
  directory = os.path.join(workdir, 'checkpoints')
  mngr = ocp.CheckpointManager(directory, item_names=('state',),
                               options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step()
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  mngr.close()
  return step, state


def _trained(env):
  if 'trained' not in env['runs']:
    workdir = env['root'] / 'trained'
    proc = _run(env, workdir)
    env['runs']['trained'] = (workdir, proc)
  return env['runs']['trained']


def test_training_beats_mean_pose_and_eval_only_reproduces(env):
  from contextpose_jax import metrics
  workdir, proc = _trained(env)
  result = json.loads((workdir / 'eval.json').read_text())
  assert set(result) >= {'mpjpe', 'p_mpjpe', 'mpjve', 'per_action'}
  preds = np.load(workdir / 'predictions.npz')
  # eval.json is the official aggregation of the saved predictions.
  again = metrics.evaluate_h36m(preds['pred'], preds['gt'], preds['action'], preds['subaction'])
  np.testing.assert_allclose(result['mpjpe'], again['mpjpe'], rtol=1e-6)
  assert len(preds['pred']) == 64  # every validation example exactly once
  mean_pose = np.broadcast_to(preds['gt'].mean(0), preds['gt'].shape)
  baseline = metrics.evaluate_h36m(mean_pose, preds['gt'], preds['action'],
                                    preds['subaction'])['mpjpe']
  print(f'val MPJPE {result["mpjpe"]:.1f} mm, mean-pose baseline {baseline:.1f} mm')
  assert result['mpjpe'] < 0.8 * baseline, (result['mpjpe'], baseline)
  # The run printed the table.
  assert 'Average' in proc.stdout and 'Directions' in proc.stdout

  eval_dir = env['root'] / 'eval_only'
  _run(env, eval_dir, '--config.eval_only=True', f'--config.init_from={workdir}')
  reproduced = json.loads((eval_dir / 'eval.json').read_text())
  for key in ('mpjpe', 'p_mpjpe', 'mpjve'):
    np.testing.assert_allclose(reproduced[key], result[key], rtol=1e-6)
  for action, v in result['per_action'].items():
    assert reproduced['per_action'][action]['frames'] == v['frames']

  # The same variables as a converter output directory (orbax + model_config.json).
  from contextpose_jax import checkpoints
  from contextpose_jax.models import capf
  import ml_collections
  variables, model_config = checkpoints.load_eval_variables(str(workdir))
  converted = env['root'] / 'converted'
  capf.save_variables(str(converted), variables, ml_collections.ConfigDict(model_config))
  eval_dir = env['root'] / 'eval_converted'
  _run(env, eval_dir, '--config.eval_only=True', f'--config.init_from={converted}')
  reproduced = json.loads((eval_dir / 'eval.json').read_text())
  for key in ('mpjpe', 'p_mpjpe', 'mpjve'):
    np.testing.assert_allclose(reproduced[key], result[key], rtol=1e-6)


# One official epoch of the 1,024 examples in batches of 17: 61 steps, the last
# of 4 examples (padded to 17), so every resume below crosses a partial batch.
SHORT = ('--config.num_epochs=1', '--config.batch_size=17')
SHORT_STEPS = 61


def _uninterrupted(env):
  """One epoch (61 steps, checkpoints every 32), run once per module."""
  if 'uninterrupted' not in env['runs']:
    workdir = env['root'] / 'uninterrupted'
    env['runs']['uninterrupted'] = (workdir, _run(env, workdir, *SHORT))
  return env['runs']['uninterrupted']


# The one warning a healthy tiny_test run prints, and means.
EXPECTED_WARNING = 'No config.backbone_init: training on a RANDOM frozen backbone.'


def _warnings(stderr):
  return [line for line in stderr.splitlines()
          if re.match(r'(W\d{4} |WARNING)', line) and EXPECTED_WARNING not in line]


def test_healthy_run_prints_no_warnings(env):
  workdir, proc = _trained(env)
  assert EXPECTED_WARNING in proc.stderr
  assert _warnings(proc.stderr) == []
  assert 'Traceback' not in proc.stderr
  # (issue #27) A line before each compilation, before the first progress
  # line; plain console lines (no absl prefix with its thread id); the full
  # log in WORKDIR/train.log.
  lines = proc.stderr.splitlines()
  stamp = r'\d\d:\d\d:\d\d '
  first_time = r'first time (~\d+ s|up to a few minutes); cached afterwards'
  compiling = [i for i, l in enumerate(lines)
               if re.fullmatch(stamp + f'compiling the training step, {first_time}', l)]
  progress = [i for i, l in enumerate(lines) if re.fullmatch(stamp + r'step \d+/\d+: .*', l)]
  assert len(compiling) == 1 and progress and compiling[0] < progress[0], proc.stderr[-4000:]
  assert any(re.fullmatch(stamp + f'compiling the evaluation step, {first_time}', l)
             for l in lines)
  assert not [l for l in lines if re.match(r'[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ', l)]
  log = (workdir / 'train.log').read_text()
  assert re.search(r'^I\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\] compiling the training step',
                   log, re.M), log[:2000]
  assert re.search(r'\] step \d+/\d+: ', log)
  # Eval-only of the saved model (run by the test above, when it ran).
  eval_only = env['runs'].get('stderr', {}).get(str(env['root'] / 'eval_only'))
  if eval_only is not None:
    assert _warnings(eval_only) == [] and EXPECTED_WARNING not in eval_only


def test_killed_run_resumes_to_identical_parameters(env):
  # One epoch (61 steps, checkpoints every 32): an uninterrupted reference run,
  # and a run killed after its step-32 checkpoint, then restarted.
  short = SHORT
  workdir, _ = _uninterrupted(env)
  interrupted = env['root'] / 'interrupted'
  proc = subprocess.Popen(_cmd(env, interrupted, *short), env=env['environ'], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  # Kill it (no clean shutdown) once a mid-run checkpoint has been committed.
  ckpt = interrupted / 'checkpoints' / '32'
  deadline = time.time() + 600
  while not (ckpt / '_CHECKPOINT_METADATA').exists():
    assert proc.poll() is None, 'run ended before its first checkpoint'
    assert time.time() < deadline
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (interrupted / 'eval.json').exists(), 'the run finished before the kill'

  proc = _run(env, interrupted, *short)
  assert 'Resumed from' in proc.stderr
  step_a, resumed = _latest_state(interrupted)
  step_b, reference = _latest_state(workdir)
  assert step_a == step_b == SHORT_STEPS
  flat_a = _flat(resumed)
  flat_b = _flat(reference)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_b:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)
  a = json.loads((interrupted / 'eval.json').read_text())
  b = json.loads((workdir / 'eval.json').read_text())
  assert a['mpjpe'] == b['mpjpe']


def test_sigterm_saves_the_step_reached_and_resumes_identically(env):
  workdir, _ = _uninterrupted(env)
  stopped = env['root'] / 'sigterm'
  # Every step logged, to send the signal mid-epoch, past the step-32 checkpoint.
  cmd = _cmd(env, stopped, *SHORT, '--config.log_every_steps=1')
  proc = subprocess.Popen(cmd, env=env['environ'], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  lines, reached = [], threading.Event()

  def read():
    for line in proc.stderr:
      lines.append(line)
      m = re.search(rf'step (\d+)/{SHORT_STEPS}:', line)
      if m and int(m.group(1)) >= 40:
        reached.set()
  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    assert reached.wait(600), ''.join(lines)[-4000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
  finally:
    if proc.poll() is None:
      proc.kill()
  reader.join(timeout=60)
  stderr = ''.join(lines)
  last = stderr.strip().splitlines()[-1]
  m = re.fullmatch(r'preempted \(SIGTERM\) at step (\d+): checkpoint saved to (\S+); '
                   r'rerun the same command to resume', last)
  assert m, stderr[-4000:]
  step = int(m.group(1))
  assert 40 <= step < SHORT_STEPS
  assert m.group(2) == str(stopped / 'checkpoints' / str(step))
  assert 'Traceback' not in stderr
  # The step reached was committed (not only the older periodic checkpoint).
  assert _latest_state(stopped)[0] == step
  assert (stopped / 'checkpoints' / str(step) / '_CHECKPOINT_METADATA').exists()
  assert not (stopped / 'eval.json').exists()
  assert not (stopped / '.lock').exists()

  resumed = _run(env, stopped, *SHORT, '--config.log_every_steps=1')
  assert f'at step {step}' in resumed.stderr
  # An ordinary resume is as quiet as a fresh run.
  assert _warnings(resumed.stderr) == []
  step_a, a = _latest_state(stopped)
  step_b, b = _latest_state(workdir)
  assert step_a == step_b == SHORT_STEPS
  flat_a, flat_b = _flat(a), _flat(b)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_b:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)
  assert (json.loads((stopped / 'eval.json').read_text())['mpjpe']
          == json.loads((workdir / 'eval.json').read_text())['mpjpe'])


def _flat(tree, prefix=''):
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(_flat(v, f'{prefix}/{k}'))
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      out.update(_flat(v, f'{prefix}/{i}'))
  elif tree is not None:
    out[prefix] = np.asarray(tree)
  return out
