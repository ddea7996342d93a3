"""`train_and_evaluate(config, workdir)`: the training loop of CA-PF.

The pieces live in their own modules: the device mesh (`parallel`), the train
state and the pure step functions (`steps`), checkpoints (`checkpoints`), the
evaluation and `eval.json` (`evaluate`), the input pipeline (`data.pipeline`)
and the metric writers (`metric_writers`). This module wires them: resume,
train with periodic evaluation, keep the best checkpoint by validation MPJPE
(the official rule: `checkpoints.best_value`, strictly lower), evaluate the
best at the end.

Faults: the configuration is checked before any work (`config_validation`);
the workdir is locked against a second run (`locking.DirLock`, process 0);
SIGTERM / SIGINT stop the run after the current step with a committed
checkpoint (`PreemptionGuard`, `Preempted`); divergence stops it with one
line and nothing diverged saved (`divergence`, `divergence.Diverged`); a
resumed workdir's config.json is never replaced by another model's
(`config_validation.check_resume`); a damaged checkpoint falls back to the
newest intact one and a failed save (a full disk) stops the run in one
line (`checkpoints`).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

from absl import logging
import flax
import jax
import ml_collections
import numpy as np

from contextpose_jax import checkpoints
from contextpose_jax import config_validation
from contextpose_jax import divergence
from contextpose_jax import evaluate
from contextpose_jax import fileio
from contextpose_jax import locking
from contextpose_jax import metric_writers
from contextpose_jax import parallel
from contextpose_jax import progress as console
from contextpose_jax import steps
from contextpose_jax.data import pipeline
from contextpose_jax.models import capf


def data_epoch_steps(config) -> int:
  """Steps of one pass over the training split: ceil(N / global batch), as
  the official DataLoader (no `drop_last`) makes them; the last is partial."""
  return pipeline.epoch_steps(pipeline.num_examples(config, config.data.train_split),
                              config.data.batch_size)


def steps_per_epoch(config) -> int:
  """The loop's epoch (lr decay, evaluation): the official epoch, or
  `config.steps_per_epoch` steps when that is set (> 0; the data then runs on
  through its own epochs regardless)."""
  if config.steps_per_epoch > 0:
    return int(config.steps_per_epoch)
  return data_epoch_steps(config)


class ResumeError(ValueError):
  """A checkpoint this version cannot continue exactly (one line)."""


def check_resumable(config, meta, directory: str, data_steps: int):
  """An older checkpoint (written before epochs were the official ceil(N /
  batch) steps, so without `epoch_steps` in its meta) continues exactly only
  where both versions make the same batches: N a multiple of the global batch
  and one process. Anywhere else: one clear error, no silent change."""
  if meta is None or 'epoch_steps' in meta:
    return
  n = pipeline.num_examples(config, config.data.train_split)
  if n % config.data.batch_size == 0 and jax.process_count() == 1:
    return
  raise ResumeError(
      f'{directory} was written by an older version whose epochs dropped the last '
      f'partial batch ({n // config.data.batch_size} steps per epoch, now the official '
      f'{data_steps}); it cannot be continued exactly: start a new --workdir, or finish '
      'it with the version that wrote it')


def _write_config(config, workdir: str):
  if jax.process_index() == 0:
    fileio.write_text_atomic(os.path.join(workdir, checkpoints.CONFIG_FILE),
                             config.to_json_best_effort(indent=2))


def initial_variables(config, model):
  """Fresh variables, with the backbone (or everything) loaded as configured."""
  variables = steps.init_variables(model, config.seed)
  if config.backbone_init and config.model.use_context:
    return checkpoints.load_backbone(variables, config.backbone_init)
  if config.init_from:
    loaded, _ = checkpoints.load_eval_variables(config.init_from)
    checkpoints.check_same_structure(variables['params'], loaded['params'],
                                     f'config.init_from={config.init_from}: params')
    return loaded
  if config.model.use_context and not config.model.train_backbone:
    logging.warning('No config.backbone_init: training on a RANDOM frozen backbone.')
  if config.model.use_context and config.backbone_scratch_init == 'he':
    variables = steps.he_init_backbone(variables, config.seed + 2)
  return variables


class Progress:
  """Steps/s and an ETA: the remaining steps at the latest interval's rate
  plus the evaluations still to come, at their measured time. The clock
  starts after the first step, so compilation counts in neither."""

  def __init__(self, start_step: int, num_steps: int, evals_left: int):
    self.num_steps, self.evals_left = num_steps, evals_left
    self.rate = None
    self.t_eval, self.evals_timed = 0.0, 0
    self.t_mark, self.step_mark = time.time(), start_step

  def compiled(self, step: int):
    """The first step of this run is done (and compiled): start the clock."""
    self.t_mark, self.step_mark = time.time(), step

  def train_interval(self, step: int) -> float:
    """Closes a logging interval; returns its steps per second."""
    now = time.time()
    self.rate = (step - self.step_mark) / max(now - self.t_mark, 1e-9)
    self.t_mark, self.step_mark = now, step
    return self.rate

  def evaluated(self, seconds: float):
    self.t_eval += seconds
    self.evals_timed += 1
    self.evals_left = max(self.evals_left - 1, 0)
    self.t_mark = time.time()  # evaluation time is not training time

  def eta_seconds(self, step: int) -> float:
    per_eval = self.t_eval / self.evals_timed if self.evals_timed else 0.0
    return (self.num_steps - step) / max(self.rate or 0.0, 1e-9) + self.evals_left * per_eval


def _weighted_loss(metrics) -> float:
  n = np.array([x['examples'] for x in metrics], np.float64)
  return float(np.sum(np.array([x['loss'] for x in metrics], np.float64) * n) / np.sum(n))


def _format_eta(seconds: float) -> str:
  minutes = int(round(seconds / 60))
  return f'{minutes // 60}h{minutes % 60:02d}m' if minutes >= 60 else f'{minutes}m'


def _num_evaluations(config, start_step: int, spe: int, num_steps: int) -> int:
  epochs = range(start_step // spe + 1, num_steps // spe + 1)
  return sum(1 for e in epochs if e % config.eval_every_epochs == 0 or e * spe == num_steps)


class Preempted(Exception):
  """The run stopped on a signal after saving its train state."""

  def __init__(self, step: int, directory: str, signum: int):
    self.step, self.directory, self.signum = step, directory, signum
    super().__init__(
        f'preempted ({signal.Signals(signum).name}) at step {step}: checkpoint '
        f'saved to {directory}; rerun the same command to resume')


class PreemptionGuard:
  """Turns SIGTERM / SIGINT into "stop after this step" (`requested(step)`).

  One process: a handler records the signal; the loop polls it after every
  step. The handler is removed after the first signal, so a second one acts
  at once (Ctrl-C twice aborts without saving).

  Several hosts (or any run after `jax.distributed.initialize`): JAX's
  preemption service owns SIGTERM. A notice on any host is propagated to all,
  which agree on one step (`multihost_utils.reached_preemption_sync_point`,
  through orbax's `CheckpointManager.reached_preemption`); every host must
  poll every step, and all then save that same step. SIGINT is left alone
  there: one host stopping on its own would hang the others' collectives.
  """

  def __init__(self, ckpts: checkpoints.Checkpoints):
    self._ckpts = ckpts
    self._distributed = jax.distributed.is_initialized()
    self.signum = None
    self.synced = False  # stopped at the step all hosts agreed on
    self._previous = {}

  def __enter__(self) -> 'PreemptionGuard':
    if threading.current_thread() is not threading.main_thread():
      return self  # Python signal handlers can only be set from the main thread
    wanted = []
    if not self._distributed:
      wanted.append(signal.SIGTERM)
    if jax.process_count() == 1:
      wanted.append(signal.SIGINT)
    for signum in wanted:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.signum = signum
    # No logging here (it may hold a lock the interrupted code holds).
    signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))

  def requested(self, step: int) -> bool:
    if self.signum is not None:
      return True
    if self._distributed and self._ckpts.reached_preemption(step):
      self.signum = signal.SIGTERM  # what the preemption service listens to
      self.synced = True
      return True
    return False

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


@contextlib.contextmanager
def workdir_lock(workdir: str, purpose: str):
  """Process 0 locks WORKDIR for the run; every process learns whether it did.

  A second run in the same workdir fails with one line naming the holder
  before it writes anything; the lock of a dead run is taken over.
  """
  lock, error = None, None
  if jax.process_index() == 0:
    lock = locking.DirLock(workdir, purpose=purpose)
    try:
      lock.acquire()
    except locking.LockHeldError as e:
      lock, error = None, e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    held = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not held and error is None:
      error = locking.LockHeldError(f'{workdir} is locked by another run (process 0 '
                                    'could not take its lock)')
  if error is not None:
    raise error
  if lock is not None and lock.recovered:
    logging.info('Took over the workdir lock of %s, which no longer runs',
                 locking.describe_holder(lock.recovered))
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from WORKDIR if it holds a checkpoint), then evaluates
  the best checkpoint and writes WORKDIR/eval.json. Returns that result.

  Raises `config_validation.ConfigError` / `pipeline.DatasetError` /
  `locking.LockHeldError` before any work, `Preempted` after saving the
  train state when SIGTERM or SIGINT arrived, `divergence.Diverged` when
  training diverged (its state not saved), and `checkpoints.CheckpointError`
  when no checkpoint restores or a save fails.
  """
  pipeline.resolve_data_dir(config)
  config_validation.validate(config, jax.device_count(), workdir)
  with workdir_lock(workdir, 'evaluation' if config.eval_only else 'training'):
    if config.eval_only:
      console.start_workdir_logs()
      return evaluate.evaluate_only(config, workdir)
    # Before anything is written: a workdir's config.json records the model
    # of its checkpoints, and is never replaced by another model's.
    changes = config_validation.check_resume(config, workdir)
    console.start_workdir_logs()
    if changes:
      logging.info('Resuming %s with changed settings: %s', workdir, ', '.join(changes))
    return _train_and_evaluate(config, workdir)


def _latest_meta(state, step: int, data_steps: int) -> dict:
  # `epoch_steps` marks the official-epoch layout (see `check_resumable`).
  return {'step': step, 'nan_count': int(state.nan_count), 'epoch_steps': data_steps}


def _diverged(ckpts, writer, step: int, reason: str, watch: divergence.Watch):
  """Lets the saves in flight commit, sets aside the train states whose
  weights led here, then raises `divergence.Diverged` naming the last good one.

  A state saved at step c holds the weights of update c, which the loss of
  step c + 1 tests: the states from the last finite step on (from the
  resumed step, without one) are suspect, the earlier ones are good.
  """
  moved = ckpts.set_aside_from(watch.last_finite[0] if watch.last_finite else watch.start_step)
  last = ckpts.latest.latest_step()
  ckpts.close()
  writer.close()
  raise divergence.Diverged(step, reason, watch.last_finite,
                            os.path.join(ckpts.latest.directory, str(last))
                            if last is not None else None, moved)


def _check(ckpts, writer, watch: divergence.Watch, lag: int = 0):
  """Stops the run if a step read now diverged (see `divergence.Watch`)."""
  verdict = watch.check(lag)
  if verdict:
    _diverged(ckpts, writer, *verdict, watch)


def _check_params(ckpts, writer, state, step: int, watch: divergence.Watch):
  """Every step read so far is healthy and so are the parameters of `step`
  (checked before any save: non-finite parameters are never written)."""
  _check(ckpts, writer, watch)
  if not divergence.all_finite(state.params):
    _diverged(ckpts, writer, step, 'non-finite parameters after the update (not saved)',
              watch)


def _saveable(ckpts, writer, state, step: int, watch: divergence.Watch) -> bool:
  """Whether the state of `step` may be checkpointed: never with non-finite
  parameters (the run stops), nor right after a skipped step (the save waits
  for the next save point)."""
  _check_params(ckpts, writer, state, step, watch)
  if watch.streak:
    logging.info('step %d not saved: its loss was not finite (the save waits for the next '
                 'save point)', step)
  return not watch.streak


def _save_and_stop(ckpts, writer, state, step: int, guard: PreemptionGuard,
                   data_steps: int, watch: divergence.Watch):
  """Commits the train state of `step`, then raises `Preempted`."""
  signum = guard.signum
  _check_params(ckpts, writer, state, step, watch)
  if guard.synced:
    logging.info('Preemption notice: every host saves step %d', step)
  else:
    logging.info('%s received: saving step %d', signal.Signals(signum).name, step)
  ckpts.save_latest(state, _latest_meta(state, step, data_steps))
  ckpts.wait()
  ckpts.close()
  writer.close()
  raise Preempted(step, os.path.join(ckpts.latest.directory, str(step)), signum)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  evaluate.check_dataset_matches_model(config)
  _write_config(config, workdir)
  mesh = parallel.make_mesh()
  model = capf.build_model(config.model)
  data_steps = data_epoch_steps(config)
  spe = steps_per_epoch(config)
  num_steps = spe * config.num_epochs
  lr_fn = steps.learning_rate_fn(config, spe)
  tx = steps.make_optimizer(config)

  state = steps.create_train_state(config, model, initial_variables(config, model), tx)
  state = jax.device_put(state, parallel.replicated(mesh))
  ckpts = checkpoints.Checkpoints(workdir, config.max_checkpoints_to_keep)
  try:
    restored, meta = ckpts.restore_latest(state)
    ckpts.verify_best(state.variables())
  except checkpoints.CheckpointError:
    ckpts.close()
    raise
  if restored is not None:
    try:
      check_resumable(config, meta, os.path.join(ckpts.latest.directory,
                                                 str(int(restored.step))), data_steps)
    except ResumeError:
      ckpts.close()
      raise
    state = jax.device_put(restored, parallel.replicated(mesh))
    logging.info('Resumed from %s at step %d', ckpts.latest.directory, int(state.step))
  start_step = int(state.step)

  writer = metric_writers.create_default_writer(workdir,
                                                just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in flax.traverse_util.flatten_dict(
        config.to_dict(), sep='.').items() if isinstance(v, (int, float, str, bool))})
  logging.info('%d devices over %d processes, global batch %d, %d steps/epoch, '
               '%d steps', jax.device_count(), jax.process_count(),
               config.data.batch_size, spe, num_steps)

  train_step = steps.make_train_step(model, tx, lr_fn, mesh, config.model.train_backbone)
  predict_fn = steps.make_predict_step(model, mesh, config.model.dataset, config.flip_test)
  train_iter = pipeline.make_train_iterator(config, seed=config.seed, start_step=start_step)
  progress = Progress(start_step, num_steps,
                      _num_evaluations(config, start_step, spe, num_steps))
  best_eval = None  # (step, metrics, predictions) of a best found in this run
  train_metrics = []
  watch = divergence.Watch(divergence.Policy.from_config(config), start_step)
  compile_key = console.program_key('train_step', config.model.to_dict(),
                                    config.data.batch_size)
  steps_bar = None
  # From here on a signal stops the run after the current step, saved
  # (before, there is nothing unsaved to lose: the default action is fine).
  try:
    with PreemptionGuard(ckpts) as guard:
      for step in range(start_step, num_steps):
        first = step == start_step
        with (console.Compilation('the training step', compile_key) if first
              else contextlib.nullcontext()):
          with jax.profiler.StepTraceAnnotation('train', step_num=step):
            batch = parallel.global_batch(next(train_iter), mesh)
            state, metrics = train_step(state, batch)
          if first:
            jax.block_until_ready(metrics)
        train_metrics.append(metrics)
        done = step + 1
        watch.push(done, metrics)
        _check(ckpts, writer, watch, lag=1)  # the step before: this one stays queued
        ckpts.check_saved()  # a background save that failed (a full disk) stops here
        if first:
          progress.compiled(done)
          # From here: the bar's rate and ETA leave the compilation out.
          steps_bar = console.bar(total=num_steps, initial=done, desc='training', unit='step')
        else:
          steps_bar.update(1)
        if done % config.log_every_steps == 0 or done == num_steps:
          _check(ckpts, writer, watch)
          m = jax.device_get(train_metrics)
          rate = progress.train_interval(done)
          writer.write_scalars(done, {
              # Example-weighted, as the official epoch loss (a partial batch
              # counts for its real rows).
              'train/loss_mm': 1000 * _weighted_loss(m),
              'train/learning_rate': float(m[-1]['learning_rate']),
              'train/grad_norm': float(np.mean([x['grad_norm'] for x in m])),
              'train/nan_skipped_total': int(state.nan_count),
              'train/steps_per_sec': rate,
              'train/examples_per_sec': rate * config.data.batch_size})
          logging.info('step %d/%d: %.1f steps/s, ETA %s, %d skipped (non-finite loss)',
                       done, num_steps, rate, _format_eta(progress.eta_seconds(done)),
                       int(state.nan_count))
          train_metrics = []
        epoch_end = done % spe == 0
        epoch = done // spe
        if epoch_end and (epoch % config.eval_every_epochs == 0 or done == num_steps):
          _check(ckpts, writer, watch)
          t0 = time.time()
          try:
            result, preds = evaluate.run_evaluation(config, state.variables(), predict_fn,
                                                    mesh)
          except evaluate.NonFinitePredictions as e:
            _diverged(ckpts, writer, done, f'evaluation: {e}', watch)
          writer.write_scalars(done, {f'eval/{k}': result[k] for k in ('mpjpe', 'p_mpjpe', 'pck')
                                      if k in result})
          _check_params(ckpts, writer, state, done, watch)
          if ckpts.save_evaluated(state, result['mpjpe'], {'step': done, 'epoch': epoch},
                                  config.model.dataset):
            best_eval = (done, result, preds)
          logging.info('epoch %d: val MPJPE %.2f mm (best %.2f)', epoch, result['mpjpe'],
                       ckpts.best_mpjpe())
          progress.evaluated(time.time() - t0)
        if ((done % config.checkpoint_every_steps == 0 or epoch_end or done == num_steps)
            and _saveable(ckpts, writer, state, done, watch)):
          ckpts.save_latest(state, _latest_meta(state, done, data_steps))
        if guard.requested(done):  # every step: the multi-host sync point needs it
          _save_and_stop(ckpts, writer, state, done, guard, data_steps, watch)
  finally:  # a stop (signal, divergence) too: the terminal gets its line back
    if steps_bar is not None:
      steps_bar.close()
  _check(ckpts, writer, watch)
  ckpts.wait()
  writer.flush()

  # Final: evaluate the best checkpoint (the latest if none was evaluated);
  # a best found in this run was just evaluated with the same variables.
  best_step = ckpts.best.best_step()
  if best_eval is not None and best_eval[0] == best_step:
    result, preds = best_eval[1], best_eval[2]
  else:
    variables = (checkpoints.load_eval_variables(workdir)[0] if best_step is not None
                 else state.variables())
    result, preds = evaluate.run_evaluation(config, variables, predict_fn, mesh)
  ckpts.close()
  evaluate.write_evaluation(config, workdir, result, preds)
  writer.write_scalars(num_steps, {'final/mpjpe': result['mpjpe']})
  writer.close()
  return result
