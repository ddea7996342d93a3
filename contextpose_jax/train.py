"""Data-parallel training and evaluation of CA-PF (`train_and_evaluate`).

One `jax.jit` step over a 1-D `jax.make_mesh` device mesh: the global batch is
split over every device of every host (`NamedSharding(mesh, P('data'))`),
the train state is replicated, and XLA inserts the gradient all-reduce. The
same code runs on one CPU, N GPUs, a TPU slice or several hosts.

Official behaviour kept (`ContextPose/train.py`): loss = MPJPE in metres on
root-relative targets; AdamW (torch defaults, weight decay 0.1 on every
trained parameter) with lr x decay after every epoch; a NaN loss skips the
update (counted); the backbone is frozen with BatchNorm in inference mode
unless `config.model.train_backbone`; best checkpoint by validation MPJPE; the
flip test averages the prediction with the un-flipped prediction of the
mirrored input.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from typing import Any, Callable, Mapping

from absl import logging
import flax
from flax import struct
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from contextpose_jax import evaluate
from contextpose_jax import skeleton
from contextpose_jax.models import capf

DATA_AXIS = 'data'
CONFIG_FILE = 'config.json'
EVAL_FILE = 'eval.json'
PREDICTIONS_FILE = 'predictions.npz'
LATEST_DIR = 'checkpoints'
BEST_DIR = 'best'

# Batch keys fed to the model / kept for the metrics.
_MODEL_KEYS = ('image', 'keypoints_2d', 'keypoints_2d_crop')
_FLIP_KEYS = ('image_flip', 'keypoints_2d_flip', 'keypoints_2d_crop_flip')
_META_KEYS = ('subject', 'action', 'subaction', 'camera', 'frame', 'video_id',
              'sequence', 'valid')


# ----------------------------------------------------------------------------
# Mesh and sharding.
# ----------------------------------------------------------------------------


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over every device of every process (or `devices`).

  Auto axes: the compiler propagates the batch sharding through the model
  (newer JAX defaults `make_mesh` to Explicit axes, which would require
  sharding annotations on every gather of the context sampler).
  """
  auto = (jax.sharding.AxisType.Auto,)
  if devices is None:
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=auto)
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=auto)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh) -> dict:
  """Host-local numpy batch (this host's rows) -> globally sharded jax.Arrays."""
  sharding = batch_sharding(mesh)
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    if v.dtype.kind not in 'biuf':
      continue  # strings (e.g. names) stay on the host
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


# ----------------------------------------------------------------------------
# Train state and optimizer.
# ----------------------------------------------------------------------------


class TrainState(struct.PyTreeNode):
  """Everything a resumed run needs, as one pytree.

  `params` holds only the TRAINED parameters (the lifter; plus the backbone
  when it is fine-tuned), so the optimizer state has no Adam moments for a
  frozen backbone; `frozen_params` holds the rest.
  """
  step: jax.Array
  params: Any
  frozen_params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  nan_count: jax.Array

  def variables(self) -> dict:
    params = merge_params(self.params, self.frozen_params)
    out = {'params': params}
    if self.batch_stats:
      out['batch_stats'] = self.batch_stats
    return out


def split_params(params, train_backbone: bool):
  """(trained, frozen) parameter dicts."""
  params = flax.core.unfreeze(params)
  if train_backbone:
    return params, {}
  trained = {k: v for k, v in params.items() if k != 'backbone'}
  frozen = {k: v for k, v in params.items() if k == 'backbone'}
  return trained, frozen


def merge_params(trained, frozen) -> dict:
  return {**dict(frozen), **dict(trained)}


def learning_rate_fn(config, steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
  """lr x decay after every epoch (the official per-epoch exponential decay)."""
  def schedule(step):
    epoch = jnp.asarray(step) // steps_per_epoch
    return config.learning_rate * jnp.power(config.lr_decay, epoch.astype(jnp.float32))
  return schedule


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW direction without the lr; the step multiplies by -lr(step).

  torch AdamW: p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p), which is
  scale_by_adam -> add_decayed_weights -> scale(-lr). The lr is applied in the
  step from the GLOBAL step so a skipped (NaN) step still advances the epoch
  schedule, while Adam's own count (bias correction) does not advance, as in
  torch where a skipped `optimizer.step()` leaves `state['step']` alone.
  """
  chain = []
  if config.grad_clip_norm > 0:
    # The official option clips at `grad_clip / lr`; off (0) by default.
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  chain.append(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps))
  if config.weight_decay > 0:
    chain.append(optax.add_decayed_weights(config.weight_decay))
  return optax.chain(*chain)


def _init_key(seed: int):
  # XLA:CPU compiles one threefry hash per initialiser, ~3x slower than the
  # RngBitGenerator ('rbg'): 35 s vs 13 s for CA-PF's init on 2 cores. Init
  # runs unsharded and identically on every host, so rbg's dependence on the
  # partitioning does not matter here; the train step's dropout keeps threefry.
  return jax.random.key(seed, impl='rbg')


def init_variables(model, seed: int):
  """Initial model variables (host side, replicated later)."""
  params_rng, dropout_rng = jax.random.split(_init_key(seed))
  return jax.jit(model.init)({'params': params_rng, 'dropout': dropout_rng},
                             *capf.dummy_inputs(1))


def he_init_backbone(variables, seed: int):
  """Re-draws every backbone conv kernel with He (fan-in) init.

  Used for a backbone trained from scratch (`config.backbone_scratch_init`):
  the official HRNet init (normal, std 0.001) only precedes loading COCO
  weights; from scratch it makes activations ~1e-3, so the batch variances
  vanish under BatchNorm's eps and the running averages (starting at 1) need
  hundreds of steps before inference-mode BatchNorm matches training mode.
  """
  init = jax.nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
  params = dict(flax.core.unfreeze(variables['params']))

  @jax.jit  # one compiled program: eager, each kernel shape compiles its own
  def redraw(backbone):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(backbone)
    keys = jax.random.split(_init_key(seed), len(leaves))
    new = [init(k, x.shape, x.dtype) if (x.ndim == 4 and path[-1].key == 'kernel') else x
           for k, (path, x) in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, new)

  params['backbone'] = redraw(params['backbone'])
  return {**variables, 'params': params}


def create_train_state(config, model, variables, tx) -> TrainState:
  params, frozen = split_params(variables['params'], config.model.train_backbone)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      frozen_params=frozen,
      batch_stats=flax.core.unfreeze(variables.get('batch_stats', {})),
      opt_state=tx.init(params),
      rng=jax.random.PRNGKey(config.seed + 1),
      nan_count=jnp.zeros((), jnp.int32))


def load_backbone(variables, directory: str):
  """Replaces the backbone variables with those of a converter output dir."""
  loaded, _ = capf.load_variables(directory)
  out = {k: dict(flax.core.unfreeze(v)) for k, v in variables.items()}
  for collection in ('params', 'batch_stats'):
    if collection in out and 'backbone' in out[collection]:
      if 'backbone' not in loaded.get(collection, {}):
        raise ValueError(f'{directory}: no {collection}/backbone entry')
      _check_same_structure(out[collection]['backbone'], loaded[collection]['backbone'],
                            f'{directory}: {collection}/backbone')
      out[collection]['backbone'] = loaded[collection]['backbone']
  return out


def _check_same_structure(expected, got, what: str):
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


# ----------------------------------------------------------------------------
# Steps.
# ----------------------------------------------------------------------------


def mpjpe_loss(pred, target):
  """Official `MPJPE` criterion: mean joint distance (metres)."""
  return jnp.mean(jnp.linalg.norm(pred - target, axis=-1))


def train_step(state: TrainState, batch, *, model, tx, lr_fn, train_backbone: bool):
  """One AdamW step on the global batch; a non-finite loss skips the update."""
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    variables = {'params': merge_params(params, state.frozen_params)}
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
    inputs = [batch[k] for k in _MODEL_KEYS]
    if train_backbone and state.batch_stats:
      pred, updates = model.apply(variables, *inputs, train=True,
                                  rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
      new_stats = updates['batch_stats']
    else:
      pred = model.apply(variables, *inputs, train=True, rngs={'dropout': dropout_rng})
      new_stats = state.batch_stats
    loss = mpjpe_loss(pred[:, 0], batch['keypoints_3d'])
    return loss, new_stats

  (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  lr = lr_fn(state.step)
  new_params = optax.apply_updates(state.params, jax.tree.map(lambda u: -lr * u, updates))

  # The official loop skips backward + step when the loss is NaN; we also skip
  # +-inf, which would otherwise destroy the weights.
  ok = jnp.isfinite(loss)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt_state, state.opt_state),
      batch_stats=keep(new_stats, state.batch_stats),
      nan_count=state.nan_count + (~ok).astype(jnp.int32))
  metrics = {'loss': loss, 'learning_rate': lr, 'skipped': (~ok).astype(jnp.int32),
             'grad_norm': optax.tree.norm(grads)}
  return new_state, metrics


def predict_step(variables, batch, *, model, dataset: str, flip_test: bool):
  """(B, 17, 3) predictions; with the flip test, the mean of the prediction and
  the un-flipped prediction on the mirrored input (as the official loop)."""
  pred = model.apply(variables, *[batch[k] for k in _MODEL_KEYS], train=False)[:, 0]
  if flip_test:
    pred_flip = model.apply(variables, *[batch[k] for k in _FLIP_KEYS], train=False)[:, 0]
    pred = (pred + skeleton.flip_pose_3d(pred_flip, dataset)) / 2
  return pred


def make_train_step(model, tx, lr_fn, mesh, train_backbone: bool):
  step = functools.partial(train_step, model=model, tx=tx, lr_fn=lr_fn,
                           train_backbone=train_backbone)
  return jax.jit(step, out_shardings=(replicated(mesh), replicated(mesh)),
                 donate_argnums=(0,))


_PREDICT_STEPS = {}


def make_predict_step(model, mesh, dataset: str, flip_test: bool):
  """The jitted predict step, cached so periodic evaluations compile once."""
  key = (id(model), id(mesh), dataset, flip_test)
  if key not in _PREDICT_STEPS:
    step = functools.partial(predict_step, model=model, dataset=dataset, flip_test=flip_test)
    _PREDICT_STEPS[key] = (model, mesh, jax.jit(step, out_shardings=batch_sharding(mesh)))
  return _PREDICT_STEPS[key][2]


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------


def _pipeline():
  from contextpose_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline


def default_data_dir() -> str:
  return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def ensure_dataset(config):
  """Resolves `config.data.data_dir` and builds the synthetic set on first use.

  Only `synthetic_human36m` is built automatically (it needs no download);
  an existing build in the data dir is used as it is.
  """
  if not config.data.data_dir:
    config.data.data_dir = default_data_dir()
  if not (config.data.get('build_if_missing', False)
          and config.data.name == 'synthetic_human36m'):
    return
  from data_prep import records, synthetic  # pylint: disable=g-import-not-at-top
  final_dir = os.path.join(config.data.data_dir, synthetic.NAME, records.VERSION)
  if jax.process_index() == 0 and not os.path.isdir(final_dir):
    options = config.data.get('synthetic', None) or {}
    options = dict(options.to_dict() if hasattr(options, 'to_dict') else options)
    logging.info('Building %s into %s (first use): %s', synthetic.NAME,
                 config.data.data_dir, options)
    synthetic.build(config.data.data_dir, log=logging.info, **options)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('dataset_built')


def num_examples(config, split: str) -> int:
  pipeline = _pipeline()
  if hasattr(pipeline, 'num_examples'):
    return int(pipeline.num_examples(config, split))
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return len(tfds.data_source(config.data.name, split=split,
                              data_dir=config.data.data_dir or None))


def steps_per_epoch(config) -> int:
  if config.steps_per_epoch > 0:
    return int(config.steps_per_epoch)
  n = num_examples(config, config.data.train_split) // config.data.batch_size
  if n < 1:
    raise ValueError(f'config.data.batch_size={config.data.batch_size} is larger than '
                     f'the {config.data.name}/{config.data.train_split} split')
  return n


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


def dataset_kind(config) -> str:
  return config.model.dataset


def check_dataset_matches_model(config):
  data_kind = _pipeline().dataset_kind(config.data.name)
  if data_kind != config.model.dataset:
    raise ValueError(f'config.data.name={config.data.name!r} needs model.dataset='
                     f'{data_kind!r}, got {config.model.dataset!r}')


def predict_split(config, variables, model, mesh, split: str | None = None) -> dict:
  """Predictions + ground truth + metadata for every example of `split`,
  gathered on every host, padding removed, in dataset order."""
  split = split or config.data.eval_split
  step = make_predict_step(model, mesh, dataset_kind(config), config.flip_test)
  variables = jax.device_put(variables, replicated(mesh))
  chunks = []
  for local in _pipeline().make_eval_iterator(config, split):
    batch = global_batch(local, mesh)
    pred = step(variables, batch)
    keep = {'pred': pred, 'gt': batch['keypoints_3d'], 'mask': batch['mask']}
    keep.update({k: batch[k] for k in _META_KEYS if k in batch})
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
  if dataset_kind(config) == 'h36m':
    return evaluate.evaluate_h36m(preds['pred'], preds['gt'], preds['action'],
                                  preds['subaction'])
  # The pipeline numbers 3DHP sequences 'TS3' -> 3, 'S2 Seq1' -> 21.
  names = np.asarray([f'TS{i}' if i < 10 else f'S{i // 10} Seq{i % 10}'
                      for i in preds['sequence']])
  return evaluate.evaluate_3dhp(preds['pred'], preds['gt'], names, preds.get('valid'))


def mean_pose_baseline(config, preds: Mapping[str, np.ndarray]) -> float:
  """Validation MPJPE (mm) of always predicting the mean validation pose."""
  mean = np.broadcast_to(preds['gt'].mean(axis=0), preds['gt'].shape)
  return compute_metrics(config, {**preds, 'pred': mean})['mpjpe']


def save_predictions(path: str, preds: Mapping[str, np.ndarray]):
  if jax.process_index() != 0:
    return
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, suffix='.npz')
  os.close(fd)
  np.savez(tmp, **preds)
  os.replace(tmp, path)


def run_evaluation(config, variables, model, mesh):
  """(metrics, predictions) on the eval split."""
  preds = predict_split(config, variables, model, mesh)
  return compute_metrics(config, preds), preds


def write_evaluation(config, workdir: str, result: Mapping, preds: Mapping):
  """WORKDIR/eval.json (+ predictions.npz) and the table on stdout."""
  if jax.process_index() != 0:
    return
  evaluate.write_json(os.path.join(workdir, EVAL_FILE), result)
  if config.save_predictions:
    save_predictions(os.path.join(workdir, PREDICTIONS_FILE), preds)
  print(evaluate.format_table(result), flush=True)


# ----------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------


class Checkpoints:
  """Latest train state (resume) + best model variables (by val MPJPE)."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.latest = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), LATEST_DIR),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=('state', 'meta'))
    self.best = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), BEST_DIR),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        item_names=('variables', 'meta'))

  def save_latest(self, state: TrainState, meta: Mapping[str, Any]):
    step = int(state.step)
    if self.latest.latest_step() == step:
      return
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))))

  def save_best(self, state: TrainState, meta: Mapping[str, Any]):
    step = int(state.step)
    if step in self.best.all_steps():
      # Killed between saving best and latest: this epoch is being redone.
      self.best.delete(step)
    self.best.save(step, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(state.variables()),
        meta=ocp.args.JsonSave(dict(meta))), force=True)

  def restore_latest(self, target: TrainState):
    step = self.latest.latest_step()
    if step is None:
      return None, None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored['state'], restored['meta']

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
      variables = {'params': merge_params(restored['params'], restored['frozen_params'] or {})}
      if restored.get('batch_stats'):
        variables['batch_stats'] = restored['batch_stats']
    else:
      variables = restored
    logging.info('Loaded %s step %d from %s', item, step, directory)
    return variables, model_config
  raise FileNotFoundError(
      f'config.init_from={init_from}: neither a converter output directory '
      f'({capf.MODEL_CONFIG_FILE}) nor a training workdir ({BEST_DIR}/ or {LATEST_DIR}/)')


# ----------------------------------------------------------------------------
# Main entry points.
# ----------------------------------------------------------------------------


def _write_config(config, workdir: str):
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, CONFIG_FILE)
  fd, tmp = tempfile.mkstemp(dir=workdir, suffix='.json')
  with os.fdopen(fd, 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(tmp, path)


def evaluate_only(config, workdir: str) -> dict:
  """Eval-only mode: `config.init_from` -> WORKDIR/eval.json."""
  if not config.init_from:
    raise ValueError('config.eval_only=True needs --config.init_from=DIR '
                     '(a converter output directory or a training workdir)')
  variables, model_config = load_eval_variables(config.init_from)
  config = ml_collections.ConfigDict(config.to_dict())
  if model_config is not None:
    model_config = dict(model_config)
    # Runtime choices stay with the command line.
    for key in ('backbone_dtype', 'lifter_dtype', 'matmul_precision'):
      model_config[key] = config.model.get(key, capf.default_model_config()[key])
    config.model = ml_collections.ConfigDict(model_config)
  os.makedirs(workdir, exist_ok=True)
  check_dataset_matches_model(config)
  ensure_dataset(config)
  mesh = make_mesh()
  model = capf.build_model(config.model)
  _check_same_structure(capf.variable_shapes(model)['params'], variables['params'],
                        f'config.init_from={config.init_from}: params')
  result, preds = run_evaluation(config, variables, model, mesh)
  write_evaluation(config, workdir, result, preds)
  return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from WORKDIR if it holds a checkpoint), then evaluates
  the best checkpoint and writes WORKDIR/eval.json. Returns that result."""
  if config.eval_only:
    return evaluate_only(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  check_dataset_matches_model(config)
  _write_config(config, workdir)
  ensure_dataset(config)
  mesh = make_mesh()
  if config.data.batch_size % jax.device_count():
    raise ValueError(f'config.batch_size={config.data.batch_size} is not divisible by '
                     f'the {jax.device_count()} devices')
  model = capf.build_model(config.model)
  spe = steps_per_epoch(config)
  num_steps = spe * config.num_epochs
  lr_fn = learning_rate_fn(config, spe)
  tx = make_optimizer(config)

  variables = init_variables(model, config.seed)
  if config.backbone_init and config.model.use_context:
    variables = load_backbone(variables, config.backbone_init)
  elif config.init_from:
    loaded, _ = load_eval_variables(config.init_from)
    _check_same_structure(variables['params'], loaded['params'],
                          f'config.init_from={config.init_from}: params')
    variables = loaded
  elif config.model.use_context and not config.model.train_backbone:
    logging.warning('No config.backbone_init: training on a RANDOM frozen backbone.')
  if (config.model.use_context and not config.backbone_init and not config.init_from
      and config.backbone_scratch_init == 'he'):
    variables = he_init_backbone(variables, config.seed + 2)
  state = create_train_state(config, model, variables, tx)
  state = jax.device_put(state, replicated(mesh))

  ckpts = Checkpoints(workdir, config.max_checkpoints_to_keep)
  restored, meta = ckpts.restore_latest(state)
  meta = dict(meta or {})
  if restored is not None:
    state = jax.device_put(restored, replicated(mesh))
    logging.info('Resumed from %s at step %d', ckpts.latest.directory, int(state.step))
  best_mpjpe = meta.get('best_mpjpe', float('inf'))
  # clu's writers import TensorFlow (TensorBoard files): only for training runs.
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  best_eval = None  # (step, metrics, predictions) of a best found in this run
  start_step = int(state.step)

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})
  logging.info('%d devices over %d processes, global batch %d, %d steps/epoch, '
               '%d steps', jax.device_count(), jax.process_count(),
               config.data.batch_size, spe, num_steps)

  p_train_step = make_train_step(model, tx, lr_fn, mesh, config.model.train_backbone)
  train_iter = _pipeline().make_train_iterator(config, seed=config.seed, start_step=start_step)
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  train_metrics = []
  t_log, step_log = time.time(), start_step
  for step in range(start_step, num_steps):
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      batch = global_batch(next(train_iter), mesh)
      state, metrics = p_train_step(state, batch)
    train_metrics.append(metrics)
    done = step + 1
    report(done)
    if done % config.log_every_steps == 0 or done == num_steps:
      m = jax.device_get(train_metrics)
      dt = time.time() - t_log
      scalars = {'train/loss_mm': 1000 * float(np.mean([x['loss'] for x in m])),
                 'train/learning_rate': float(m[-1]['learning_rate']),
                 'train/grad_norm': float(np.mean([x['grad_norm'] for x in m])),
                 'train/nan_skipped_total': int(state.nan_count),
                 'train/examples_per_sec': (done - step_log) * config.data.batch_size / dt}
      writer.write_scalars(done, scalars)
      train_metrics, t_log, step_log = [], time.time(), done
    epoch_end = done % spe == 0
    epoch = done // spe
    if epoch_end and (epoch % config.eval_every_epochs == 0 or done == num_steps):
      result, preds = run_evaluation(config, state.variables(), model, mesh)
      writer.write_scalars(done, {'eval/mpjpe': result['mpjpe'],
                                  **({'eval/p_mpjpe': result['p_mpjpe']}
                                     if 'p_mpjpe' in result else {}),
                                  **({'eval/pck': result['pck']} if 'pck' in result else {})})
      logging.info('epoch %d: val MPJPE %.2f mm (best %.2f)', epoch, result['mpjpe'],
                   best_mpjpe)
      if result['mpjpe'] < best_mpjpe:
        best_mpjpe = result['mpjpe']
        ckpts.save_best(state, {'step': done, 'epoch': epoch, 'mpjpe': best_mpjpe})
        best_eval = (done, result, preds)
    if done % config.checkpoint_every_steps == 0 or epoch_end or done == num_steps:
      ckpts.save_latest(state, {'step': done, 'best_mpjpe': best_mpjpe,
                                'nan_count': int(state.nan_count)})
  ckpts.wait()
  writer.flush()

  # Final: evaluate the best checkpoint (the latest if none was evaluated);
  # a best found in this run was just evaluated with the same variables.
  best_step = ckpts.best.latest_step()
  if best_eval is not None and best_eval[0] == best_step:
    result, preds = best_eval[1], best_eval[2]
  else:
    variables = load_eval_variables(workdir)[0] if best_step is not None else state.variables()
    result, preds = run_evaluation(config, variables, model, mesh)
  ckpts.close()
  write_evaluation(config, workdir, result, preds)
  writer.write_scalars(num_steps, {'final/mpjpe': result['mpjpe']})
  writer.close()
  return result


def _flat(d: Mapping, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out
