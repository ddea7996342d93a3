"""Checks a training / evaluation configuration before any work starts.

`check_fields` looks at the config alone (sizes, names, paths, divisibility
by the device count); `check_data` opens the dataset splits the run reads
(a finished build of the expected kind, enough examples for one batch). Each
failure raises `ConfigError` (or the pipeline's `DatasetError`) with one line
naming the field, e.g.

  config.data.eval_batch_size=33 is not divisible by the 2 devices; use a multiple of 2

so that a mistake costs seconds, not an epoch of training followed by a crash
at the first evaluation.
"""
from __future__ import annotations

import json
import numbers
import os

from contextpose_jax import checkpoints
from contextpose_jax.data import pipeline
from contextpose_jax.models import BACKBONES
from contextpose_jax.models import capf
from contextpose_jax.models.capf import MODEL_CONFIG_FILE

MODEL_DATASETS = ('h36m', '3dhp')
BACKBONE_DTYPES = ('float32', 'bfloat16')
SCRATCH_INITS = ('he', 'official')


class ConfigError(ValueError):
  """A configuration value that cannot work; the message names the field."""


_MISSING = object()


def _get(config, path: str, default=_MISSING):
  node = config
  for key in path.split('.'):
    try:
      node = node[key]
    except (KeyError, TypeError, AttributeError):
      if default is _MISSING:
        raise ConfigError(f'config.{path} is missing from the configuration') from None
      return default
  return node


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(config, path: str, default=_MISSING) -> int | None:
  value = _get(config, path, default)
  if value is None:
    return None
  if not _is_int(value) or value < 1:
    raise ConfigError(f'config.{path}={value!r} must be a positive integer')
  return int(value)


def _non_negative(config, path: str, *, integer: bool):
  value = _get(config, path, None)
  if value is None:
    return
  ok = _is_int(value) if integer else isinstance(value, numbers.Real) and not isinstance(value, bool)
  if not ok or value < 0:
    kind = 'integer' if integer else 'number'
    raise ConfigError(f'config.{path}={value!r} must be a non-negative {kind}')


def _positive_number(config, path: str):
  value = _get(config, path, None)
  if value is None:
    return
  if (not isinstance(value, numbers.Real) or isinstance(value, bool)
      or not value > 0 or value == float('inf')):
    raise ConfigError(f'config.{path}={value!r} must be a positive number')


def _one_of(config, path: str, allowed, default=_MISSING):
  value = _get(config, path, default)
  if value not in allowed:
    raise ConfigError(f'config.{path}={value!r} is not one of: '
                      f'{", ".join(map(str, allowed))}')
  return value


def _divisible(config, path: str, value: int, device_count: int):
  if value % device_count:
    raise ConfigError(
        f'config.{path}={value} is not divisible by the {device_count} devices; '
        f'use a multiple of {device_count}')


def _directory(path: str, field: str):
  if not os.path.exists(path):
    raise ConfigError(f'config.{field}={path}: no such directory')
  if not os.path.isdir(path):
    raise ConfigError(f'config.{field}={path}: a file, not a directory')


def _converter_dir(path: str, field: str):
  _directory(path, field)
  if not os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE)):
    raise ConfigError(
        f'config.{field}={path}: not a converter output directory (no '
        f'{MODEL_CONFIG_FILE}); make one with `capf-convert`')


def _model_source(path: str, field: str):
  """A converter output directory or a training workdir."""
  _directory(path, field)
  if not any(os.path.exists(os.path.join(path, name))
             for name in (MODEL_CONFIG_FILE, checkpoints.BEST_DIR, checkpoints.LATEST_DIR)):
    raise ConfigError(
        f'config.{field}={path}: neither a converter output directory '
        f'({MODEL_CONFIG_FILE}) nor a training workdir ({checkpoints.BEST_DIR}/ or '
        f'{checkpoints.LATEST_DIR}/)')


def check_fields(config, device_count: int, workdir: str | None = None) -> None:
  """Every check that needs only the config (and the device count)."""
  eval_only = bool(_get(config, 'eval_only', False))
  if workdir is not None and os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir={workdir} exists and is not a directory')

  # The data, for training and evaluation.
  name = _get(config, 'data.name')
  if name not in pipeline.DATASETS:
    raise ConfigError(f'config.data.name={name!r} is not a known dataset; known: '
                      f'{", ".join(pipeline.DATASETS)}')
  data_dir = _get(config, 'data.data_dir', '')
  if data_dir and os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise ConfigError(f'config.data.data_dir={data_dir}: a file, not a directory')
  batch = _positive_int(config, 'data.batch_size')
  eval_batch = _positive_int(config, 'data.eval_batch_size', batch)
  _divisible(config, 'data.eval_batch_size', eval_batch, device_count)
  for path in ('data.num_workers', 'data.prefetch', 'data.worker_processes'):
    _non_negative(config, path, integer=True)

  if eval_only:
    if not _get(config, 'init_from', ''):
      raise ConfigError('config.eval_only=True needs --config.init_from=DIR (a '
                        'converter output directory or a training workdir)')
    _model_source(config.init_from, 'init_from')
    return  # the model config comes from init_from

  # The model.
  _one_of(config, 'model.backbone', BACKBONES)
  _one_of(config, 'model.dataset', MODEL_DATASETS)
  _one_of(config, 'model.backbone_dtype', BACKBONE_DTYPES, 'float32')
  try:  # every field: names, types, ranges, dtypes, divisibility
    capf.check_model_config(_get(config, 'model'), 'config.model')
  except capf.ModelConfigError as e:
    raise ConfigError(str(e)) from None
  kind = pipeline.dataset_kind(name)
  if config.model.dataset != kind:
    raise ConfigError(f'config.model.dataset={config.model.dataset!r} does not match '
                      f'config.data.name={name!r} (it needs model.dataset={kind!r})')
  if _get(config, 'backbone_init', '') and _get(config, 'model.use_context', True):
    _converter_dir(config.backbone_init, 'backbone_init')
  if _get(config, 'init_from', ''):
    _model_source(config.init_from, 'init_from')
  _one_of(config, 'backbone_scratch_init', SCRATCH_INITS, 'he')

  # Training.
  _divisible(config, 'data.batch_size', batch, device_count)
  _positive_int(config, 'num_epochs')
  spe = _get(config, 'steps_per_epoch', -1)
  if not _is_int(spe) or (spe < 1 and spe != -1):
    raise ConfigError(f'config.steps_per_epoch={spe!r} must be a positive integer, '
                      'or -1 for (training examples // batch size)')
  for path in ('log_every_steps', 'checkpoint_every_steps', 'eval_every_epochs',
               'max_checkpoints_to_keep'):
    _positive_int(config, path)
  for path in ('learning_rate', 'lr_decay'):
    _positive_number(config, path)
  for path in ('weight_decay', 'grad_clip_norm'):
    _non_negative(config, path, integer=False)
  # The divergence policy (contextpose_jax/divergence.py); 0 turns a rule off.
  _non_negative(config, 'divergence.max_nonfinite_steps', integer=True)
  for path in ('divergence.max_loss_mm', 'divergence.max_grad_norm'):
    _non_negative(config, path, integer=False)


def check_data(config) -> None:
  """The splits the run reads are finished builds; training has a batch.

  Raises the pipeline's one-line `DatasetError` (missing, unfinished or
  truncated dataset, unknown name) or `ConfigError`.
  """
  pipeline.num_examples(config, _get(config, 'data.eval_split',
                                      pipeline.default_eval_split(config.data.name)))
  if _get(config, 'eval_only', False):
    return
  n = pipeline.num_examples(config, _get(config, 'data.train_split', 'train'))
  if n < config.data.batch_size:
    raise ConfigError(f'config.data.batch_size={config.data.batch_size} is larger than '
                      f'the {n} examples of {config.data.name}/'
                      f'{_get(config, "data.train_split", "train")}')


def validate(config, device_count: int, workdir: str | None = None) -> None:
  check_fields(config, device_count, workdir)
  check_data(config)


# What a resumed run may change: fields that leave the model, its weights,
# the optimizer state's layout and the training data stream as they are
# (the schedule, logging, checkpointing, evaluation, paths, workers, the
# precision policy: parameters stay float32). Anything else is refused.
RESUME_MAY_CHANGE = (
    'num_epochs', 'steps_per_epoch', 'learning_rate', 'lr_decay', 'b1', 'b2', 'eps',
    'log_every_steps', 'checkpoint_every_steps', 'max_checkpoints_to_keep',
    'eval_every_epochs', 'flip_test', 'save_predictions', 'eval_only', 'init_from',
    'backbone_init', 'backbone_scratch_init', 'divergence.', 'data.data_dir',
    'data.eval_split', 'data.eval_batch_size', 'data.eval_valid_only', 'data.num_workers',
    'data.prefetch', 'data.worker_processes', 'data.build_if_missing',
    'model.backbone_dtype', 'model.lifter_dtype', 'model.matmul_precision')
# Optimizer terms that exist only when > 0: a new value is fine, switching
# one on or off changes the optimizer state's layout.
_OPTIMIZER_SWITCHES = ('weight_decay', 'grad_clip_norm')


def _flatten(tree, prefix=''):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _may_change(field: str, old, new) -> bool:
  if field in _OPTIMIZER_SWITCHES:
    return isinstance(old, numbers.Real) and isinstance(new, numbers.Real) and (
        (old > 0) == (new > 0))
  return any(field == a or (a.endswith('.') and field.startswith(a))
             for a in RESUME_MAY_CHANGE)


def _has_checkpoint(workdir: str) -> bool:
  for sub in (checkpoints.LATEST_DIR, checkpoints.BEST_DIR):
    directory = os.path.join(workdir, sub)
    if os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory)):
      return True
  return False


def check_resume(config, workdir: str) -> list[str]:
  """Compares the requested config with the one of a workdir that holds a
  checkpoint (`WORKDIR/config.json`), before anything is written there.

  Returns the allowed changes (`RESUME_MAY_CHANGE`) as 'field old -> new';
  raises ConfigError listing every other differing field (the model, the
  data, the optimizer's layout): that run's checkpoints and its record of
  its own model stay as they are. A workdir without a checkpoint has
  nothing to protect: its config.json is simply rewritten.
  """
  path = os.path.join(workdir, checkpoints.CONFIG_FILE)
  if not os.path.isfile(path) or not _has_checkpoint(workdir):
    return []
  try:
    with open(path) as f:
      old = _flatten(json.load(f))
  except (OSError, ValueError, AttributeError) as e:
    raise ConfigError(f'{path}: not a readable config ({type(e).__name__}); it records the '
                      'model of the checkpoints beside it: restore it, or use a new '
                      '--workdir') from None
  new = _flatten(json.loads(config.to_json_best_effort()))
  show = lambda v: json.dumps(v, separators=(',', ':'))
  allowed, refused = [], []
  # A field only one side has (a newer or an older version's) is not a change.
  for field in sorted(set(old) & set(new)):
    if old[field] != new[field]:
      change = f'{field} {show(old[field])} -> {show(new[field])}'
      (allowed if _may_change(field, old[field], new[field]) else refused).append(change)
  if refused:
    raise ConfigError(f'--workdir={workdir} was trained with another model or data '
                      f'({path}): {", ".join(refused)}; resume with its values, or use a '
                      'new --workdir')
  return allowed
