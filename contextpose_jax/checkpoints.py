"""Checkpoints of a training workdir, and loading model variables back.

A workdir holds `config.json`, `checkpoints/<step>/` (the full train state,
for resuming) and `best/<step>/` (the model variables of the best validation
MPJPE, kept by orbax's `best_fn`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from contextpose_jax import steps
from contextpose_jax.models import capf

CONFIG_FILE = 'config.json'
LATEST_DIR = 'checkpoints'
BEST_DIR = 'best'


class Checkpoints:
  """Latest train state (resume) + best model variables (by val MPJPE)."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.latest = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), LATEST_DIR),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=('state', 'meta'))
    # Every evaluated state is offered; orbax keeps the one of lowest MPJPE.
    # Synchronous: which step is best is read right after each save.
    self.best = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), BEST_DIR),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m['mpjpe'], best_mode='min',
            keep_checkpoints_without_metrics=False, enable_async_checkpointing=False),
        item_names=('variables', 'meta'))

  def save_latest(self, state: steps.TrainState, meta: Mapping[str, Any]):
    step = int(state.step)
    if self.latest.latest_step() == step:
      return
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))))

  def save_evaluated(self, state: steps.TrainState, mpjpe: float,
                     meta: Mapping[str, Any]) -> bool:
    """Offers an evaluated state as the best; True if it is the best so far."""
    step = int(state.step)
    if step in self.best.all_steps():
      # Killed between saving best and latest: this epoch is being redone.
      self.best.delete(step)
    self.best.save(step, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(state.variables()),
        meta=ocp.args.JsonSave(dict(meta))), metrics={'mpjpe': float(mpjpe)}, force=True)
    return self.best.best_step() == step

  def best_mpjpe(self) -> float:
    step = self.best.best_step()
    if step is None:
      return float('inf')
    return float(self.best.metrics(step)['mpjpe'])

  def restore_latest(self, target: steps.TrainState):
    step = self.latest.latest_step()
    if step is None:
      return None, None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored['state'], restored['meta']

  def reached_preemption(self, step: int) -> bool:
    """True on every host at the one step all hosts agreed to save after a
    preemption notice (JAX's preemption service; False without
    `jax.distributed`)."""
    return self.latest.reached_preemption(step)

  def wait(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.latest.close()
    self.best.close()


def load_eval_variables(init_from: str):
  """(variables, model_config dict or None) from a converter output directory
  or a training workdir (its best checkpoint, else its latest)."""
  if not os.path.isdir(init_from):
    raise FileNotFoundError(f'config.init_from={init_from}: no such directory')
  if os.path.isfile(os.path.join(init_from, capf.MODEL_CONFIG_FILE)):
    variables, model_config = capf.load_variables(init_from)
    return variables, model_config.to_dict()
  model_config = None
  config_path = os.path.join(init_from, CONFIG_FILE)
  if os.path.isfile(config_path):
    with open(config_path) as f:
      model_config = json.load(f)['model']
  best_dir = os.path.join(init_from, BEST_DIR)
  latest_dir = os.path.join(init_from, LATEST_DIR)
  for directory, item in ((best_dir, 'variables'), (latest_dir, 'state')):
    if not os.path.isdir(directory):
      continue
    mngr = ocp.CheckpointManager(directory, item_names=(item,),
                                 options=ocp.CheckpointManagerOptions(read_only=True))
    step = mngr.latest_step()
    if step is None:
      mngr.close()
      continue
    restored = mngr.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.StandardRestore()}))[item]
    mngr.close()
    if item == 'state':
      variables = {'params': steps.merge_params(restored['params'], restored['frozen_params'] or {})}
      if restored.get('batch_stats'):
        variables['batch_stats'] = restored['batch_stats']
    else:
      variables = restored
    logging.info('Loaded %s step %d from %s', item, step, directory)
    return variables, model_config
  raise FileNotFoundError(
      f'config.init_from={init_from}: neither a converter output directory '
      f'({capf.MODEL_CONFIG_FILE}) nor a training workdir ({BEST_DIR}/ or {LATEST_DIR}/)')


def load_backbone(variables, directory: str):
  """Replaces the backbone variables with those of a converter output dir."""
  loaded, _ = capf.load_variables(directory)
  out = {k: dict(flax.core.unfreeze(v)) for k, v in variables.items()}
  for collection in ('params', 'batch_stats'):
    if collection in out and 'backbone' in out[collection]:
      if 'backbone' not in loaded.get(collection, {}):
        raise ValueError(f'{directory}: no {collection}/backbone entry')
      check_same_structure(out[collection]['backbone'], loaded[collection]['backbone'],
                            f'{directory}: {collection}/backbone')
      out[collection]['backbone'] = loaded[collection]['backbone']
  return out


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
