"""Evaluation of a model on a dataset split: predictions gathered over every
host, the official metrics (`contextpose_jax.metrics`), `WORKDIR/eval.json`,
and the eval-only mode (`config.eval_only`)."""
from __future__ import annotations

import os
from typing import Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from contextpose_jax import checkpoints
from contextpose_jax import fileio
from contextpose_jax import metrics
from contextpose_jax import parallel
from contextpose_jax import progress as console
from contextpose_jax import steps
from contextpose_jax.data import pipeline
from contextpose_jax.models import capf

EVAL_FILE = 'eval.json'
PREDICTIONS_FILE = 'predictions.npz'
# Kept beside the predictions for the metrics and the official sample order.
META_KEYS = ('subject', 'action', 'subaction', 'camera', 'frame', 'video_id',
             'sequence', 'valid')


class NonFinitePredictions(ValueError):
  """The model's poses hold NaN or infinity (diverged parameters); one line."""


def check_finite(config, preds: Mapping[str, np.ndarray], split: str | None = None):
  """Refuses non-finite predictions in one line, before the metrics (whose
  Procrustes SVD would otherwise die with 'SVD did not converge')."""
  bad = ~np.isfinite(preds['pred']).reshape(len(preds['pred']), -1).all(axis=1)
  if bad.any():
    raise NonFinitePredictions(
        f'the model predicts non-finite poses for {int(bad.sum())} of {len(bad)} examples '
        f'of {config.data.name}/{split or config.data.eval_split}')


def check_dataset_matches_model(config):
  data_kind = pipeline.dataset_kind(config.data.name)
  if data_kind != config.model.dataset:
    raise ValueError(f'config.data.name={config.data.name!r} needs model.dataset='
                     f'{data_kind!r}, got {config.model.dataset!r}')


def predict_split(config, variables, predict_fn, mesh, split: str | None = None) -> dict:
  """Predictions + ground truth + metadata for every example of `split`,
  gathered on every host, padding removed, in dataset order."""
  split = split or config.data.eval_split
  variables = jax.device_put(variables, parallel.replicated(mesh))
  chunks = []
  batches = pipeline.make_eval_iterator(config, split)
  logging.info('evaluating %s/%s: %d batches', config.data.name, split, len(batches))
  key = console.program_key('predict_step', config.model.to_dict(), config.flip_test,
                            config.data.get('eval_batch_size', config.data.batch_size))
  for i, local in enumerate(console.bar(batches, desc='evaluation', unit='batch')):
    batch = parallel.global_batch(local, mesh)
    if i == 0:
      with console.Compilation('the evaluation step', key):
        pred = jax.block_until_ready(predict_fn(variables, batch))
    else:
      pred = predict_fn(variables, batch)
    keep = {'pred': pred, 'gt': batch['keypoints_3d'], 'mask': batch['mask']}
    keep.update({k: batch[k] for k in META_KEYS if k in batch})
    chunks.append(keep)
  if not chunks:
    raise ValueError(f'{config.data.name}/{split}: no examples')
  out = {}
  for k in chunks[0]:
    arrays = [c[k] for c in chunks]
    if jax.process_count() > 1:
      arrays = [multihost_utils.process_allgather(a, tiled=True) for a in arrays]
    out[k] = np.concatenate([np.asarray(a) for a in arrays])
  real = out.pop('mask') > 0
  out = {k: v[real] for k, v in out.items()}
  if 'video_id' in out and 'frame' in out and 'sequence' not in out:
    order = np.lexsort((out['frame'], out['video_id']))  # official label order
  elif 'sequence' in out and 'frame' in out:
    order = np.lexsort((out['frame'], out['sequence']))
  else:
    order = np.arange(len(real))
  return {k: v[order] for k, v in out.items()}


def compute_metrics(config, preds: Mapping[str, np.ndarray]) -> dict:
  if config.model.dataset == 'h36m':
    return metrics.evaluate_h36m(preds['pred'], preds['gt'], preds['action'],
                                 preds['subaction'])
  # The pipeline numbers 3DHP sequences 'TS3' -> 3, 'S2 Seq1' -> 21.
  names = np.asarray([f'TS{i}' if i < 10 else f'S{i // 10} Seq{i % 10}'
                      for i in preds['sequence']])
  return metrics.evaluate_3dhp(preds['pred'], preds['gt'], names, preds.get('valid'))


def mean_pose_baseline(config, preds: Mapping[str, np.ndarray]) -> float:
  """Validation MPJPE (mm) of always predicting the mean validation pose."""
  mean = np.broadcast_to(preds['gt'].mean(axis=0), preds['gt'].shape)
  return compute_metrics(config, {**preds, 'pred': mean})['mpjpe']


def save_predictions(path: str, preds: Mapping[str, np.ndarray]):
  if jax.process_index() != 0:
    return
  # np.savez appends '.npz' to a name without it: give it an open file.
  def write(tmp):
    with open(tmp, 'wb') as f:
      np.savez(f, **preds)
  fileio.write_atomic(path, write)


def run_evaluation(config, variables, predict_fn, mesh):
  """(metrics, predictions) on the eval split; `NonFinitePredictions` when
  the model's poses are not finite."""
  preds = predict_split(config, variables, predict_fn, mesh)
  check_finite(config, preds)
  return compute_metrics(config, preds), preds


def write_evaluation(config, workdir: str, result: Mapping, preds: Mapping):
  """WORKDIR/eval.json (+ predictions.npz) and the table on stdout."""
  if jax.process_index() != 0:
    return
  metrics.write_json(os.path.join(workdir, EVAL_FILE), result)
  if config.save_predictions:
    save_predictions(os.path.join(workdir, PREDICTIONS_FILE), preds)
  print(metrics.format_table(result), flush=True)


def evaluate_only(config, workdir: str) -> dict:
  """Eval-only mode: `config.init_from` -> WORKDIR/eval.json."""
  if not config.init_from:
    raise ValueError('config.eval_only=True needs --config.init_from=DIR '
                     '(a converter output directory or a training workdir)')
  variables, model_config = checkpoints.load_eval_variables(config.init_from)
  config = ml_collections.ConfigDict(config.to_dict())
  if model_config is not None:
    model_config = dict(model_config)
    # Runtime choices stay with the command line.
    for key in ('backbone_dtype', 'lifter_dtype', 'matmul_precision'):
      model_config[key] = config.model.get(key, capf.default_model_config()[key])
    config.model = ml_collections.ConfigDict(model_config)
  os.makedirs(workdir, exist_ok=True)
  check_dataset_matches_model(config)
  mesh = parallel.make_mesh()
  model = capf.build_model(config.model)
  checkpoints.check_same_structure(capf.variable_shapes(model)['params'], variables['params'],
                                   f'config.init_from={config.init_from}: params')
  predict_fn = steps.make_predict_step(model, mesh, config.model.dataset, config.flip_test)
  try:
    result, preds = run_evaluation(config, variables, predict_fn, mesh)
  except NonFinitePredictions as e:
    raise NonFinitePredictions(f'config.init_from={config.init_from}: {e}') from e
  write_evaluation(config, workdir, result, preds)
  return result
