"""Checkpoints of a training workdir, and loading model variables back.

A workdir holds `config.json`, `checkpoints/<step>/` (the full train state,
for resuming) and `best/<step>/` (the model variables of the best validation
MPJPE by the official rule, `best_value`: an evaluated state replaces the
kept one only when its value is strictly lower, so of two epochs that tie the
earlier stays).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Any, Mapping

from absl import logging
import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from contextpose_jax import steps
from contextpose_jax.models import capf

CONFIG_FILE = 'config.json'
LATEST_DIR = 'checkpoints'
BEST_DIR = 'best'
# Where a damaged step checkpoint is moved (kept, never deleted), out of
# orbax's sight: WORKDIR/damaged/<checkpoints|best>.<step>; and one whose
# weights led to divergence: WORKDIR/diverged/checkpoints.<step>.
DAMAGED_DIR = 'damaged'
DIVERGED_DIR = 'diverged'


class CheckpointError(RuntimeError):
  """No intact checkpoint to resume from, or a save that failed (a full
  disk); the message is one line."""


def _size(n: float) -> str:
  for unit in ('B', 'KB', 'MB', 'GB'):
    if n < 1024 or unit == 'GB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return ''


def _nbytes(tree) -> int:
  return sum(int(getattr(x, 'nbytes', 0)) for x in jax.tree.leaves(tree))


def _committed(step_dir: str) -> bool:
  # orbax writes a step under a temporary name and renames it when complete.
  return os.path.isfile(os.path.join(step_dir, '_CHECKPOINT_METADATA'))


# Free space a save leaves at least, beyond the checkpoint's own bytes
# (orbax's metadata files, the logs written meanwhile).
_SPACE_MARGIN = 1 << 20


def _why(e: Exception) -> str:
  first = next((l.strip() for l in str(e).splitlines() if l.strip()), '')
  return f'{type(e).__name__}: {first[:200]}' if first else type(e).__name__


def best_value(mpjpe: float, dataset: str) -> float:
  """What the official code compares to pick its best epoch.

  Human3.6M (`ContextPose/train.py`): validation P1 rounded to 0.1 mm, with
  numpy's rounding of the float64 mean; MPI-INF-3DHP (`ContextPose_mpi/
  run_3dhp.py`): P1 as it is. Either way a new best must be strictly lower.
  """
  if dataset == '3dhp':
    return float(mpjpe)
  return float(round(np.float64(mpjpe), 1))


class Checkpoints:
  """Latest train state (resume) + best model variables (by val MPJPE)."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.workdir = os.path.abspath(workdir)
    self.latest = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), LATEST_DIR),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             cleanup_tmp_directories=True),
        item_names=('state', 'meta'))
    self._pending = None  # (step, bytes) of a background save not yet seen committed
    # Only a strictly better state is saved (`save_evaluated`); orbax keeps
    # the one of lowest MPJPE, i.e. the last saved. Synchronous: which step is
    # best is read right after each save.
    self.best = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), BEST_DIR),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m['mpjpe'], best_mode='min',
            keep_checkpoints_without_metrics=False, enable_async_checkpointing=False,
            cleanup_tmp_directories=True),
        item_names=('variables', 'meta'))

  def _saving(self, manager, step: int, tree, save):
    """Runs `save()` after a free-space check; a failure (ENOSPC, EFBIG, any)
    is one CheckpointError naming the path, the free space and the size,
    with orbax's unfinished `*.orbax-checkpoint-tmp*` folder removed (the
    previous checkpoints are untouched: orbax deletes them only after a
    save commits)."""
    need = _nbytes(tree)
    directory = str(manager.directory)
    free = shutil.disk_usage(directory).free
    if free < need + _SPACE_MARGIN:
      raise self._save_failed(manager, step, need, 'not enough free space')
    try:
      save()
    except Exception as e:  # pylint: disable=broad-except  # any layer: tensorstore, OS
      raise self._save_failed(manager, step, need, _why(e)) from e

  def _save_failed(self, manager, step: int, need: int, why: str) -> CheckpointError:
    directory = str(manager.directory)
    if jax.process_index() == 0:
      for tmp in glob.glob(os.path.join(directory, '*.orbax-checkpoint-tmp*')):
        shutil.rmtree(tmp, ignore_errors=True)
    free = shutil.disk_usage(directory).free
    # From the disk: orbax's own list may still hold the failed step.
    last = max((int(n) for n in os.listdir(directory)
                if n.isdigit() and int(n) != step and _committed(os.path.join(directory, n))),
               default=None)
    kept = (f'the last checkpoint, {os.path.join(directory, str(last))}, is intact'
            if last is not None else 'no earlier checkpoint there')
    return CheckpointError(
        f'{os.path.join(directory, str(step))}: checkpoint not saved ({why}); '
        f'{_size(free)} free on its disk, the checkpoint needs {_size(need)}; {kept}: '
        'free some space, then rerun the same command to resume')

  def save_latest(self, state: steps.TrainState, meta: Mapping[str, Any]):
    """Starts a background save of the train state (unless `step` is saved);
    `check_saved` reports its failure at the next step."""
    step = int(state.step)
    if self.latest.latest_step() == step:
      return
    self.check_saved(wait=True)  # orbax waits for the previous save anyway
    self._saving(self.latest, step, state, lambda: self.latest.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(dict(meta)))))
    self._pending = (step, _nbytes(state))

  def check_saved(self, wait: bool = False):
    """Raises CheckpointError if the last background save ended without
    committing (cheap while it runs: called after every step)."""
    if self._pending is None:
      return
    if wait:
      try:
        self.latest.wait_until_finished()
      except Exception:  # pylint: disable=broad-except  # reported below
        pass
    elif self.latest.is_saving_in_progress():
      return
    (step, need), self._pending = self._pending, None
    if not _committed(os.path.join(str(self.latest.directory), str(step))):
      raise self._save_failed(self.latest, step, need, 'the background save failed')

  def save_evaluated(self, state: steps.TrainState, mpjpe: float,
                     meta: Mapping[str, Any], dataset: str = 'h36m') -> bool:
    """Keeps an evaluated state if it is the best so far by the official rule
    (`best_value` strictly lower than the kept one's); True if it was kept."""
    step = int(state.step)
    if step in self.best.all_steps():
      # Killed between saving best and latest: this epoch is being redone.
      self.best.delete(step)
    if best_value(mpjpe, dataset) >= best_value(self.best_mpjpe(), dataset):
      return False
    variables = state.variables()
    self._saving(self.best, step, variables, lambda: self.best.save(
        step, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables),
                                      meta=ocp.args.JsonSave(dict(meta))),
        metrics={'mpjpe': float(mpjpe)}, force=True))
    return self.best.best_step() == step

  def best_mpjpe(self) -> float:
    step = self.best.best_step()
    if step is None:
      return float('inf')
    return float(self.best.metrics(step)['mpjpe'])

  def restore_latest(self, target: steps.TrainState):
    """(state, meta) of the newest intact checkpoint, or (None, None).

    A damaged newer one (a truncated data file, a deleted `_METADATA`: any
    step that does not restore) is moved to WORKDIR/damaged/ with one log
    line naming both; when none restores, CheckpointError (one line) and
    nothing is moved.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                              meta=ocp.args.JsonRestore())
    restored = self._restore_intact(self.latest, LATEST_DIR, args, required=True)
    return (restored['state'], restored['meta']) if restored is not None else (None, None)

  def verify_best(self, variables):
    """The best checkpoint restores (as `variables`' shapes); a damaged one
    is moved aside as in `restore_latest`. When none is intact the run goes
    on: the next evaluation starts a new best (logged)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, variables)
    args = ocp.args.Composite(variables=ocp.args.StandardRestore(abstract))
    self._restore_intact(self.best, BEST_DIR, args, required=False)

  def _restore_intact(self, manager, sub: str, args, *, required: bool):
    damaged = []  # (step, why), newest first
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        restored = manager.restore(step, args=args)
      except Exception as e:  # pylint: disable=broad-except  # any damage, any layer
        damaged.append((step, _why(e)))
        continue
      if damaged:
        moved = self._move_aside(manager, sub, [s for s, _ in damaged], DAMAGED_DIR)
        logging.warning('%s/%d is damaged (%s), moved to %s; using %s/%d instead',
                        os.path.join(self.workdir, sub), damaged[0][0], damaged[0][1],
                        moved[0], os.path.join(self.workdir, sub), step)
      return restored
    if not damaged:
      return None
    directory = os.path.join(self.workdir, sub)
    listed = '; '.join(f'{s}: {why}' for s, why in damaged)
    if required:
      raise CheckpointError(
          f'{directory}: no intact checkpoint ({listed}); move {directory} away to start '
          'again from step 0, or use a new --workdir')
    moved = self._move_aside(manager, sub, [s for s, _ in damaged], DAMAGED_DIR)
    logging.warning('%s: no intact checkpoint (%s), moved to %s; the next evaluation '
                    'starts a new best', directory, listed, ', '.join(moved))
    return None

  def set_aside_from(self, first_step: int) -> list[str]:
    """Moves the committed train states of `first_step` and later to
    WORKDIR/diverged/ (their weights led to divergence: a rerun must not
    resume from them); returns where they went."""
    self.wait()
    later = [s for s in self.latest.all_steps() if s >= first_step]
    return self._move_aside(self.latest, LATEST_DIR, later, DIVERGED_DIR) if later else []

  def _move_aside(self, manager, sub: str, steps_to_move, into: str) -> list[str]:
    """Moves step folders out of `manager`'s directory (process 0), kept."""
    moved = []
    for step in steps_to_move:
      target = os.path.join(self.workdir, into, f'{sub}.{step}')
      n = 1
      while os.path.lexists(target):
        n += 1
        target = os.path.join(self.workdir, into, f'{sub}.{step}.{n}')
      if jax.process_index() == 0:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(os.path.join(self.workdir, sub, str(step)), target)
      moved.append(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('contextpose_jax.checkpoints.damaged')
    manager.reload()
    return moved

  def reached_preemption(self, step: int) -> bool:
    """True on every host at the one step all hosts agreed to save after a
    preemption notice (JAX's preemption service; False without
    `jax.distributed`)."""
    return self.latest.reached_preemption(step)

  def wait(self):
    self.check_saved(wait=True)
    self.best.wait_until_finished()

  def close(self):
    self.latest.close()
    self.best.close()


class ModelDirectoryError(FileNotFoundError):
  """A path that is not a loadable model directory; the message is one line
  naming the path and the layouts that are accepted."""


# The one place that lists the accepted layouts (docs/inference.md, "Model directories").
MODEL_LAYOUTS = (f'a converter output ({capf.MODEL_CONFIG_FILE} + {capf.VARIABLES_DIR}/), '
                 f'a training workdir ({CONFIG_FILE} + {BEST_DIR}/ or {LATEST_DIR}/) or '
                 f'one of its step checkpoints ({BEST_DIR}/<step> or {LATEST_DIR}/<step>)')

# The item each step-checkpoint kind stores the model in (see `Checkpoints`).
_STEP_ITEMS = {BEST_DIR: 'variables', LATEST_DIR: 'state'}


def _wrong_kind(path: str, why: str) -> ModelDirectoryError:
  return ModelDirectoryError(f'{path}: {why}; expected {MODEL_LAYOUTS}')


def _workdir_model_config(workdir: str):
  """The `model` entry of WORKDIR/config.json, or None without that file."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      model = json.load(f)['model']
    model_config = ml_collections.ConfigDict(model)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ModelDirectoryError(f'{path}: no readable "model" entry ({type(e).__name__})') from e
  try:
    capf.check_model_config(model, f'{path}: model')
  except capf.ModelConfigError as e:
    raise ModelDirectoryError(str(e)) from None
  return model_config


def _restore_step(step_dir: str, item: str):
  """Model variables from one step checkpoint's `item` ('variables' or 'state')."""
  item_dir = os.path.join(step_dir, item)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(item_dir)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).splitlines()[0] if str(e) else ''
    raise ModelDirectoryError(f'{item_dir}: cannot be restored ({type(e).__name__}: '
                              f'{first})') from e
  if item == 'variables':
    return restored
  # A full train state: the model is the trained + frozen params (+ BN stats).
  variables = {'params': steps.merge_params(restored['params'], restored['frozen_params'] or {})}
  if restored.get('batch_stats'):
    variables['batch_stats'] = restored['batch_stats']
  return variables


def _latest_step(directory: str, item: str):
  """The highest finished step under `directory` (orbax's `<step>/` folders;
  unfinished saves are `<step>.orbax-checkpoint-tmp-*`), or None."""
  steps_found = [int(n) for n in os.listdir(directory)
                 if n.isdigit() and os.path.isdir(os.path.join(directory, n, item))]
  return max(steps_found, default=None)


def find_model(path: str):
  """Resolves a model path without loading weights.

  Returns `(kind, step_dir_or_path, item, workdir)`, `kind` one of
  'converted', 'workdir', 'step'. Raises ModelDirectoryError (one line).
  """
  if not os.path.exists(path):
    raise ModelDirectoryError(f'{path}: no such model directory')
  if not os.path.isdir(path):
    raise _wrong_kind(path, 'a file, not a directory')
  if os.path.isfile(os.path.join(path, capf.MODEL_CONFIG_FILE)):
    if not os.path.isdir(os.path.join(path, capf.VARIABLES_DIR)):
      raise _wrong_kind(path, f'{capf.MODEL_CONFIG_FILE} without {capf.VARIABLES_DIR}/')
    return 'converted', path, capf.VARIABLES_DIR, None
  # A step checkpoint: WORKDIR/best/<step>/variables or WORKDIR/checkpoints/<step>/state.
  parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
  item = _STEP_ITEMS.get(parent)
  if item and os.path.isdir(os.path.join(path, item)):
    return 'step', path, item, os.path.dirname(os.path.dirname(os.path.abspath(path)))
  # A workdir: its best checkpoint, else its latest train state.
  for sub, item in _STEP_ITEMS.items():
    directory = os.path.join(path, sub)
    if not os.path.isdir(directory):
      continue
    step = _latest_step(directory, item)
    if step is not None:
      return 'workdir', os.path.join(directory, str(step)), item, path
  if any(os.path.isdir(os.path.join(path, sub)) for sub in _STEP_ITEMS):
    raise _wrong_kind(path, 'a training workdir without a finished checkpoint')
  raise _wrong_kind(path, 'not a model directory')


def load_model(path: str, *, require_config: bool = True):
  """`(variables, model_config ConfigDict)` from any model directory.

  The one model loader (Predictor.load, the predict CLI, eval-only, init_from):
    - a converter output: `model_config.json` + `variables/` (orbax);
    - a training workdir: its best checkpoint `best/<step>/variables`, else
      its latest `checkpoints/<step>/state`; the model config is the `model`
      entry of `WORKDIR/config.json`;
    - a step checkpoint by path: `WORKDIR/best/<step>` or `WORKDIR/checkpoints/<step>`.
  A workdir without `config.json` gives `model_config=None` unless
  `require_config`. Every failure is one ModelDirectoryError line.
  """
  kind, step_dir, item, workdir = find_model(path)
  if kind == 'converted':
    variables, model_config = _read_converted(capf.load_variables, path)
    check_matches_config(variables, model_config,
                         os.path.join(path, capf.MODEL_CONFIG_FILE))
    return variables, model_config
  model_config = _workdir_model_config(workdir)
  if model_config is None and require_config:
    raise _no_workdir_config(path, workdir)
  variables = _restore_step(step_dir, item)
  if model_config is not None:
    check_matches_config(variables, model_config, os.path.join(workdir, CONFIG_FILE))
  logging.info('Loaded %s from %s', item, step_dir)
  return variables, model_config


def check_matches_config(variables, model_config, config_file: str):
  """The weights have the shapes the model config builds (an edited
  `embed_dim` or `depth`, `backbone: cpn` on HRNet weights: one line naming
  the file). Only the parts present are compared: a COCO backbone
  conversion holds no lifter. Costs a trace of the model, no compute."""
  expected = capf.variable_shapes(capf.build_model(model_config))
  for collection, tree in variables.items():
    for name, got in dict(tree).items():
      want = expected.get(collection, {}).get(name)
      what = f'{config_file} does not match the weights: {collection}/{name}'
      if want is None:
        raise ModelDirectoryError(f'{what} is not part of the model it describes '
                                  f'(backbone {model_config["backbone"]!r})')
      try:
        check_same_structure(want, got, what)
      except ValueError as e:
        raise ModelDirectoryError(str(e)) from None


def read_model_config(path: str) -> ml_collections.ConfigDict:
  """The model config of any model directory, without reading the weights."""
  kind, _, _, workdir = find_model(path)
  if kind == 'converted':
    return _read_converted(capf.load_model_config, path)
  model_config = _workdir_model_config(workdir)
  if model_config is None:
    raise _no_workdir_config(path, workdir)
  return model_config


def _read_converted(read, path: str):
  try:
    return read(path)
  except (OSError, ValueError) as e:
    raise ModelDirectoryError(str(e).splitlines()[0]) from e


def _no_workdir_config(path: str, workdir: str) -> ModelDirectoryError:
  return ModelDirectoryError(f'{path}: no {os.path.join(workdir, CONFIG_FILE)} beside the '
                             'checkpoints (it holds the model config)')


def load_eval_variables(init_from: str):
  """(variables, model_config dict or None): `load_model` for eval-only and
  `config.init_from` (a workdir without config.json takes the command line's)."""
  try:
    variables, model_config = load_model(init_from, require_config=False)
  except ModelDirectoryError as e:
    raise ModelDirectoryError(f'config.init_from={e}') from e
  return variables, (model_config.to_dict() if model_config is not None else None)


def load_backbone(variables, directory: str):
  """Replaces the backbone variables with those of a converter output dir.

  A COCO conversion (`capf-convert --kind=hrnet_32|hrnet_48|cpn`, the usual
  `backbone_init`) also holds the 2D detector's heatmap head; CA-PF's
  backbone has none, so the head is left out. Anything else that differs
  from the model's backbone is an error.
  """
  loaded, _ = capf.load_variables(directory)
  out = {k: dict(flax.core.unfreeze(v)) for k, v in variables.items()}
  for collection in ('params', 'batch_stats'):
    if collection in out and 'backbone' in out[collection]:
      if 'backbone' not in loaded.get(collection, {}):
        raise ValueError(f'{directory}: no {collection}/backbone entry')
      got = loaded[collection]['backbone']
      if not _has_heatmap_head(out[collection]['backbone']):
        got = _without_heatmap_head(got)
      check_same_structure(out[collection]['backbone'], got,
                            f'{directory}: {collection}/backbone')
      out[collection]['backbone'] = got
  return out


def _has_heatmap_head(tree) -> bool:
  return any(capf.is_heatmap_head(path)
             for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


def _without_heatmap_head(tree):
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
  return flax.traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if not capf.is_heatmap_head(k)})


def check_same_structure(expected, got, what: str):
  e = jax.tree_util.tree_flatten_with_path(expected)[0]
  g = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  for path, leaf in e:
    if path not in g:
      raise ValueError(f'{what}: missing {jax.tree_util.keystr(path)}')
    want = tuple(getattr(leaf, 'shape', None) or np.shape(leaf))
    if tuple(np.shape(g[path])) != want:
      raise ValueError(f'{what}: {jax.tree_util.keystr(path)} has shape '
                       f'{np.shape(g[path])}, the model expects {want}')
  if len(g) != len(e):
    extra = set(g) - {p for p, _ in e}
    raise ValueError(f'{what}: unexpected {sorted(jax.tree_util.keystr(p) for p in extra)[:5]}')
