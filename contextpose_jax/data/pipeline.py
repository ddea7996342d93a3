"""grain input pipeline over the TFDS `array_record` data sources.

No TensorFlow at training time: `tfds.data_source` reads the records with
NumPy, images are decoded with OpenCV, everything else is NumPy.

Training (`make_train_iterator`): the official epoch (`ContextPose/train.py`,
a DataLoader without `drop_last`). Each epoch is one pass over every record in
a permutation drawn from (seed, epoch), cut into `epoch_steps` = ceil(N /
global batch) global batches; the last one is partial: its missing rows are
padding (real records, so every value stays finite) with `mask` 0, which the
train step leaves out of the loss, the gradient, the metrics and the NaN check.
Each host yields its rows of every global batch (`jax.process_index()` /
`jax.process_count()`), padding its share of the last one, so the global
batches do not depend on the number of hosts. The official flip augmentation
(p = 0.5) is decided once per GLOBAL batch (as the official loader does) or,
with `config.data.flip_per_example`, per example. All randomness is a
function of (seed, step), so an iterator started at `start_step` yields
exactly the batches an uninterrupted run would, for any number of threads.

Evaluation (`make_eval_iterator`): one pass over every example (3DHP: every
VALID frame unless `config.data.eval_valid_only` is False), padded to whole
global batches, `mask` = 0 on the padding; flip-test pairs included.

Config fields (`config.data`; `configs/default.py` sets each, defaults in brackets): `name`, `data_dir`,
`batch_size` (GLOBAL), [`eval_batch_size` = batch_size],
[`flip_augmentation` True], [`flip_prob` 0.5], [`flip_per_example` False],
[`shuffle_seed` None -> the `seed` argument], [`num_workers` 2: threads
decoding batches], [`prefetch` 2: batches buffered ahead],
[`worker_processes` 0: >0 moves batch making into that many processes],
[`backbone` '' -> `config.model.backbone`], [`train_split` 'train'],
[`eval_valid_only` True].
"""
from __future__ import annotations

import os
import sys
from typing import Iterator

from absl import flags
from array_record.python import array_record_module
from etils import epath
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from contextpose_jax import paths
from contextpose_jax import skeleton
from contextpose_jax.data import transforms

# The datasets `capf-build-dataset` makes (named in errors).
DATASETS = ('human36m', 'mpi_inf_3dhp', 'synthetic_human36m')
VERSION = '1.0.0'
KEYPOINT_KEYS = ('keypoints_2d', 'keypoints_2d_crop', 'keypoints_3d')
METADATA_KEYS = ('subject', 'action', 'subaction', 'camera', 'frame',
                 'video_id')


def _get(cfg, key, default=None):
  try:
    value = cfg.get(key, default) if hasattr(cfg, 'get') else getattr(
        cfg, key, default)
  except (AttributeError, KeyError):
    value = default
  return default if value is None else value


def dataset_kind(name: str) -> str:
  """'3dhp' (flip joints, root 14) for MPI-INF-3DHP, else 'h36m'."""
  return '3dhp' if name == 'mpi_inf_3dhp' else 'h36m'


def resolve_data_dir(config) -> str:
  """Fills an empty `config.data.data_dir` with the TFDS default."""
  if not config.data.data_dir:
    config.data.data_dir = paths.expand(os.environ.get('TFDS_DATA_DIR')
                                        or '~/tensorflow_datasets')
  return config.data.data_dir


def default_eval_split(name: str) -> str:
  return 'test' if name == 'mpi_inf_3dhp' else 'validation'


def sequence_id(sequence) -> int:
  """3DHP sequence name -> int: 'TS3' -> 3; 'S2 Seq1' -> 21 (10*S + Seq)."""
  if isinstance(sequence, bytes):
    sequence = sequence.decode()
  sequence = str(sequence)
  if sequence.startswith('TS'):
    return int(sequence[2:])
  subject, seq = sequence.split()
  return 10 * int(subject[1:]) + int(seq[3:])


def _process_info():
  return jax.process_index(), jax.process_count()


def _local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f'config.data.batch_size={global_batch} is not divisible '
                     f'by the number of hosts ({process_count})')
  return global_batch // process_count


class DatasetError(FileNotFoundError):
  """A dataset that cannot be read; the one-line message names the
  dataset, directory or shard file and what to do."""


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f'{type(e).__name__}: ' + (text.splitlines()[0] if text else '')


def _shard_of(records, index) -> str:
  """The shard file holding record `index` of an ArrayRecordDataSource."""
  try:
    reader_index, _ = records._reader_idx_and_position(index)  # pylint: disable=protected-access
    return str(records._read_instructions[reader_index].filename)  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    return 'a shard'


def check_shards(records) -> None:
  """Every shard file of an ArrayRecordDataSource holds its records (a
  truncated shard reads as fewer records; it fails here, not mid-epoch)."""
  for instruction in getattr(records, '_read_instructions', ()):
    path = str(instruction.filename)
    try:
      reader = array_record_module.ArrayRecordReader(path)
      try:
        have = reader.num_records()
      finally:
        reader.close()
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetError(f'{path}: unreadable array_record shard '
                         f'({_first_line(e)}); rebuild the dataset with '
                         '`capf-build-dataset ... --overwrite`') from None
    if have < instruction.end:
      raise DatasetError(
          f'{path}: truncated or corrupt array_record shard ({have} records, '
          f'the dataset metadata says {instruction.end}); rebuild the dataset '
          'with `capf-build-dataset ... --overwrite`')


class RecordSource:
  """Random access to the records of a `tfds.data_source`, parsed fast.

  TFDS's own NumPy deserializer costs ~0.7 ms of Python per record; parsing
  the `tf.train.Example` proto directly (upb) costs ~30 us. Images stay
  encoded. Values are those `tfds.data_source` returns (tests check it).
  `keys` restricts the fields extracted: each costs Python time under the
  GIL, which is what limits threaded input pipelines on few cores.
  """

  def __init__(self, tfds_source, keys=None):
    self._records = tfds_source.data_source  # array_record data source
    self._fields = {}
    features = tfds_source.dataset_info.features
    for key, feature in features.items():
      if keys is not None and key not in keys:
        continue
      if key == 'image':
        kind = 'bytes'
      elif isinstance(feature, tfds.features.Text):
        kind = 'text'
      else:
        kind = (np.dtype(feature.np_dtype), tuple(feature.shape))
      self._fields[key] = kind
    missing = sorted(set(keys or ()) - set(self._fields))
    if missing:
      raise KeyError(f'dataset has no field(s) {missing}; it has '
                     f'{sorted(features.keys())}')

  def __len__(self):
    return len(self._records)

  @staticmethod
  def _parse(serialized):
    return tf_example_pb2.Example.FromString(serialized)

  def __getitem__(self, index):
    try:
      feature = self._parse(self._records[index]).features.feature
    except (RuntimeError, OSError) as e:  # riegeli / file errors
      raise DatasetError(f'{_shard_of(self._records, index)}: cannot read '
                         f'record {index} (truncated or corrupt shard; '
                         f'{_first_line(e)})') from None
    except Exception as e:  # pylint: disable=broad-except
      if type(e).__name__ != 'DecodeError':  # protobuf's, any implementation
        raise
      raise DatasetError(f'{_shard_of(self._records, index)}: record {index} '
                         'is not a tf.train.Example (corrupt shard)') from None
    out = {}
    for key, kind in self._fields.items():
      if kind == 'bytes' or kind == 'text':
        out[key] = feature[key].bytes_list.value[0]
        continue
      dtype, shape = kind
      values = (feature[key].float_list.value if dtype.kind == 'f'
                else feature[key].int64_list.value)
      if shape:
        out[key] = np.asarray(values).astype(dtype, copy=False).reshape(shape)
      else:  # a scalar: no array round trip (~3x cheaper)
        out[key] = dtype.type(values[0])
    return out


def data_source(config, split: str, keys=None) -> RecordSource:
  """The records of `split` (images left encoded; only `keys` if given)."""
  data = config.data
  try:
    source = tfds.data_source(
        data.name, split=split, data_dir=data.data_dir,
        decoders={'image': tfds.decode.SkipDecoding()})
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetError(_why_not_found(data.name, split, data.data_dir, e)
                       ) from None
  check_shards(source.data_source)
  return RecordSource(source, keys)


def _why_not_found(name, split, data_dir, error) -> str:
  """One line: why `name` / `split` cannot be opened under `data_dir`."""
  build = f"capf-build-dataset {name} --data_dir={data_dir or 'DIR'}"
  dataset_dir = version_dir = None
  if data_dir:
    dataset_dir = epath.Path(data_dir) / str(name)
    version_dir = dataset_dir / VERSION
  if dataset_dir is None or not dataset_dir.exists():
    present = []
    if data_dir and epath.Path(data_dir).is_dir():
      present = sorted(p.name for p in epath.Path(data_dir).iterdir()
                       if p.is_dir() and not p.name.startswith('.'))
    if name not in DATASETS:
      return (f'config.data.name={name!r} is not a known dataset; known: '
              f'{", ".join(DATASETS)}' + (
                  f' (data_dir={data_dir} holds: {", ".join(present)})'
                  if present else ''))
    return (f'dataset {name!r} is not built under data_dir={data_dir}; build '
            f'it with `{build} ...`' + (
                f' (that data_dir holds: {", ".join(present)})'
                if present else ''))
  if not version_dir.exists():
    unfinished = dataset_dir / f'.incomplete-{VERSION}'
    if unfinished.exists():
      return (f'data_dir={data_dir} holds only an unfinished build of '
              f'{name!r} ({unfinished}); finish it by running the same '
              f'`{build} ...` command again (it resumes where it stopped)')
    return (f'{dataset_dir} has no finished build (no {VERSION}/); build it '
            f'with `{build} ...`')
  if 'split' in str(error).lower():
    return (f'dataset {name!r} under data_dir={data_dir} has no split '
            f'{split!r} ({_first_line(error)})')
  return (f'cannot open dataset {name!r} split {split!r} under '
          f'data_dir={data_dir} ({_first_line(error)}); rebuild it with '
          f'`{build} --overwrite ...`')


def num_examples(config, split: str) -> int:
  """Number of records of `split` (with the errors of `data_source`)."""
  return len(data_source(config, split, keys=()))


class _Decode(grain.transforms.Map):
  """One stored record -> uint8 BGR image (OpenCV's order; the normalisation
  makes it RGB) and float32 keypoints."""

  def __init__(self, keys):
    self._keys = keys

  def map(self, record):
    out = {'image': transforms.decode_image(record['image'], bgr=True)}
    for key in self._keys:
      value = record[key]
      out[key] = value.astype(np.float32) if key in KEYPOINT_KEYS else value
    return out


class _Lookup(grain.transforms.Map):
  """(source index, mask) -> the decoded record plus its mask."""

  def __init__(self, source, keys):
    self._source = source
    self._decode = _Decode(keys)

  def map(self, item):
    index, mask = item
    out = self._decode.map(self._source[int(index)])
    out['mask'] = mask
    return out


def _collate(examples):
  """Stacks everything but the images, which stay a list of uint8 arrays
  (they are written once, normalised, into the float32 batch)."""
  out = {'image': [e['image'] for e in examples]}
  for key in examples[0]:
    if key != 'image':
      out[key] = np.stack([e[key] for e in examples])
  return out


class _TrainBatch(grain.transforms.MapWithIndex):
  """Root-relative targets, the flip augmentation and the normalisation."""

  def __init__(self, *, seed, start_step, backbone, kind, flip, flip_prob,
               per_example, global_batch, process_index):
    self._seed = seed
    self._start_step = start_step
    self._backbone = backbone
    self._kind = kind
    self._flip = flip
    self._flip_prob = flip_prob
    self._per_example = per_example
    self._global_batch = global_batch
    self._process_index = process_index
    self._pool = transforms.BufferPool()

  def flips(self, step: int, local_batch: int) -> np.ndarray:
    """The flip decisions of `step`, identical on every host."""
    if not self._flip:
      return np.zeros(local_batch, bool)
    rng = np.random.default_rng([self._seed, step])
    if self._per_example:
      coins = rng.random(self._global_batch) < self._flip_prob
      start = self._process_index * local_batch
      return coins[start:start + local_batch]
    return np.full(local_batch, rng.random() < self._flip_prob)

  def map_with_index(self, index, batch):
    step = self._start_step + index
    batch = dict(batch)
    batch['keypoints_3d'] = transforms.root_relative(
        batch['keypoints_3d'], skeleton.ROOT_JOINT[self._kind])
    flips = self.flips(step, len(batch['image']))
    images = batch.pop('image')
    batch = transforms.flip_batch(batch, flips, self._kind)
    batch['image'] = transforms.normalize_images(images, self._backbone, flips,
                                                 pool=self._pool, bgr=True)
    return batch


def _backbone(config):
  backbone = _get(config.data, 'backbone')
  if not backbone and 'model' in config:
    backbone = _get(config.model, 'backbone')
  if not backbone:
    raise ValueError('set config.model.backbone (or config.data.backbone)')
  return backbone


def _finish(ds: grain.MapDataset, config) -> grain.IterDataset:
  data = config.data
  threads = max(1, int(_get(data, 'num_workers', 2)))
  prefetch = max(1, int(_get(data, 'prefetch', 2)))
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(prefetch, threads)))
  processes = int(_get(data, 'worker_processes', 0))
  if processes > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=processes, per_worker_buffer_size=prefetch))
  return it


def epoch_steps(num_examples: int, global_batch: int) -> int:
  """Steps of one official epoch: ceil(N / global batch), the last partial."""
  return -(-int(num_examples) // int(global_batch))


class _EpochOrder:
  """The endless stream of this host's rows: row j -> (record, mask).

  Row j is row k of step s's local batch; step s is batch b of epoch e; its
  global position p = b * global_batch + host * local_batch + k indexes the
  epoch's permutation (grain's index shuffle, seeded by seed + e). Positions
  past the N records are the padding of the last batch: mask 0, filled with
  the epoch's first records. With N a multiple of the global batch and one
  host this is the stream of the earlier floor(N / batch) pipeline.
  """

  def __init__(self, num_examples, global_batch, local_batch, host, seed):
    self._n, self._global, self._local, self._host = (
        num_examples, global_batch, local_batch, host)
    self._steps = epoch_steps(num_examples, global_batch)
    self._order = grain.MapDataset.range(num_examples).shuffle(
        seed=seed % 2**32).repeat()

  def __len__(self):
    return sys.maxsize

  def __getitem__(self, row):
    step, k = divmod(int(row), self._local)
    epoch, b = divmod(step, self._steps)
    p = b * self._global + self._host * self._local + k
    real = p < self._n
    index = self._order[epoch * self._n + (p if real else (p - self._n) % self._n)]
    return int(index), np.float32(real)


def make_train_iterator(config, *, seed: int, start_step: int = 0
                        ) -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator of this host's training batches, from `start_step`.

  Batches: `image` float32 (B, 256, 192, 3) normalised for the backbone,
  `keypoints_2d` (B, 17, 2), `keypoints_2d_crop` (B, 17, 2), `keypoints_3d`
  (B, 17, 3) root-relative metres, `mask` float32 (B,) (0 on the padding of
  an epoch's last batch); B = global batch / number of hosts. Step s is batch
  s % `epoch_steps` of epoch s // `epoch_steps`.
  """
  data = config.data
  kind = dataset_kind(data.name)
  process_index, process_count = _process_info()
  global_batch = int(data.batch_size)
  local_batch = _local_batch_size(global_batch, process_count)
  shuffle_seed = int(_get(data, 'shuffle_seed', seed))
  source = data_source(config, _get(data, 'train_split', 'train'),
                       keys=('image',) + KEYPOINT_KEYS)
  if len(source) == 0:
    raise ValueError(f'{data.name}: the training split has no examples')
  order = _EpochOrder(len(source), global_batch, local_batch, process_index,
                      shuffle_seed)
  ds = grain.MapDataset.source(order).map(_Lookup(source, KEYPOINT_KEYS))
  ds = ds.batch(local_batch, drop_remainder=True, batch_fn=_collate)
  ds = ds[int(start_step):]
  ds = ds.map_with_index(_TrainBatch(
      seed=shuffle_seed, start_step=int(start_step), backbone=_backbone(config),
      kind=kind, flip=bool(_get(data, 'flip_augmentation', True)),
      flip_prob=float(_get(data, 'flip_prob', 0.5)),
      per_example=bool(_get(data, 'flip_per_example', False)),
      global_batch=int(data.batch_size), process_index=process_index))
  return iter(_finish(ds, config))


class _EvalBatch(grain.transforms.Map):
  """Eval batch: normalised images, flip-test pairs, metadata and mask."""

  def __init__(self, backbone, kind, mpi_inf_3dhp):
    self._backbone = backbone
    self._kind = kind
    self._mpi = mpi_inf_3dhp
    self._pool = transforms.BufferPool()

  def map(self, batch):
    out = {}
    images = batch['image']
    out['image'] = transforms.normalize_images(images, self._backbone,
                                               pool=self._pool, bgr=True)
    out['image_flip'] = transforms.normalize_images(
        images, self._backbone, flips=np.ones(len(images), bool),
        pool=self._pool, bgr=True)
    out['keypoints_2d'] = batch['keypoints_2d']
    out['keypoints_2d_crop'] = batch['keypoints_2d_crop']
    out['keypoints_2d_flip'] = skeleton.flip_keypoints_2d(
        batch['keypoints_2d'], self._kind)
    out['keypoints_2d_crop_flip'] = skeleton.flip_keypoints_crop(
        batch['keypoints_2d_crop'], self._kind)
    out['keypoints_3d'] = transforms.root_relative(
        batch['keypoints_3d'], skeleton.ROOT_JOINT[self._kind])
    for key in METADATA_KEYS:
      out[key] = np.asarray(batch[key], np.int32)
    if self._mpi:
      out['sequence'] = np.asarray([sequence_id(s) for s in batch['sequence']],
                                   np.int32)
      out['valid'] = np.asarray(batch['valid'], bool)
    out['mask'] = np.asarray(batch['mask'], np.float32)
    return out


def eval_indices(config, split: str, source=None) -> np.ndarray:
  """Record indices evaluated on `split` (3DHP: the valid frames)."""
  source = source if source is not None else data_source(config, split)
  if (dataset_kind(config.data.name) == '3dhp'
      and bool(_get(config.data, 'eval_valid_only', True))):
    valid = [bool(source[i]['valid']) for i in range(len(source))]
    return np.flatnonzero(valid)
  return np.arange(len(source))


def make_eval_iterator(config, split: str | None = None
                       ) -> Iterator[dict[str, np.ndarray]]:  # with len()
  """One pass over `split`: every example exactly once, in stored order.

  Each host yields its local part of every global batch; the last global
  batch is padded (with copies of the first example) and `mask` marks the
  real examples, so all hosts run the same number of steps.
  """
  data = config.data
  split = split or default_eval_split(data.name)
  kind = dataset_kind(data.name)
  mpi = data.name == 'mpi_inf_3dhp'
  process_index, process_count = _process_info()
  global_batch = int(_get(data, 'eval_batch_size', data.batch_size))
  local_batch = _local_batch_size(global_batch, process_count)
  source = data_source(config, split)
  indices = eval_indices(config, split, source)
  if len(indices) == 0:
    raise ValueError(f'{data.name} split {split!r} has no examples to evaluate')
  num_batches = -(-len(indices) // global_batch)
  # Global position p = b * global_batch + host * local_batch + k.
  positions = np.arange(num_batches * global_batch).reshape(
      num_batches, process_count, local_batch)[:, process_index].reshape(-1)
  mask = (positions < len(indices)).astype(np.float32)
  items = list(zip(np.where(mask > 0, indices[np.minimum(
      positions, len(indices) - 1)], indices[0]), mask))
  keys = KEYPOINT_KEYS + METADATA_KEYS + (('sequence', 'valid') if mpi else ())
  ds = grain.MapDataset.source(items).map(_Lookup(source, keys))
  ds = ds.batch(local_batch, drop_remainder=True, batch_fn=_collate)
  ds = ds.map(_EvalBatch(_backbone(config), kind, mpi))
  return _Batches(iter(_finish(ds, config)), num_batches)


class _Batches:
  """An iterator that knows how many batches it yields (a progress bar
  shows an ETA)."""

  def __init__(self, iterator, length: int):
    self._iterator, self._length = iterator, length

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._iterator)

  def __len__(self) -> int:
    return self._length


def num_eval_batches(config, split: str | None = None) -> int:
  split = split or default_eval_split(config.data.name)
  n = len(eval_indices(config, split))
  return -(-n // int(_get(config.data, 'eval_batch_size',
                          config.data.batch_size)))
