"""Record schema and a beam-free writer of TFDS `array_record` datasets.

The stock `tfds build` needs apache_beam for datasets this size; we write the
shards ourselves in the TFDS on-disk layout

  DATA_DIR/NAME/VERSION/NAME-SPLIT.array_record-0000X-of-0000N
  DATA_DIR/NAME/VERSION/{dataset_info.json, features.json}

so that `tfds.data_source(NAME, split=..., data_dir=DATA_DIR)` reads them.

Builds are complete-or-nothing and resumable: shards are written (in
parallel) into `DATA_DIR/NAME/.incomplete-VERSION/`, each one renamed into
place only when finished, and the directory becomes `VERSION` (the only name
TFDS looks at) after the last shard and the metadata are written. Re-running
an interrupted build with the same options reuses its finished shards.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np
from array_record.python import array_record_module
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.core import naming

from contextpose_jax import image_io
from contextpose_jax import locking
from contextpose_jax import skeleton
from data_prep import safe_pickle

VERSION = '1.0.0'
NUM_JOINTS = skeleton.NUM_JOINTS
IMAGE_SHAPE = (skeleton.CROP_HEIGHT, skeleton.CROP_WIDTH, 3)
INT_FIELDS = ('subject', 'action', 'subaction', 'camera', 'frame', 'video_id')


class DataError(ValueError):
  """Bad input data; the message names the file or record."""


def features(image_format: str = 'jpeg', mpi_inf_3dhp: bool = False):
  """The agreed record schema (one example per frame)."""
  if image_format not in ('jpeg', 'png'):
    raise DataError(f'--image_format must be jpeg or png, got {image_format!r}')
  spec = {
      'image': tfds.features.Image(shape=IMAGE_SHAPE,
                                   encoding_format=image_format),
      'keypoints_2d': tfds.features.Tensor(shape=(NUM_JOINTS, 2),
                                           dtype=np.float32),
      'keypoints_2d_crop': tfds.features.Tensor(shape=(NUM_JOINTS, 2),
                                                dtype=np.float32),
      'keypoints_3d': tfds.features.Tensor(shape=(NUM_JOINTS, 3),
                                           dtype=np.float32),
  }
  for name in INT_FIELDS:
    spec[name] = tfds.features.Scalar(dtype=np.int32)
  if mpi_inf_3dhp:
    spec['sequence'] = tfds.features.Text()
    spec['valid'] = tfds.features.Scalar(dtype=np.bool_)
  return tfds.features.FeaturesDict(spec)


def encode_crop(crop_bgr: np.ndarray, image_format: str,
                jpeg_quality: int) -> bytes:
  """Encodes an OpenCV (BGR) crop; the stored image is RGB."""
  if crop_bgr.shape != IMAGE_SHAPE or crop_bgr.dtype != np.uint8:
    raise DataError(f'crop must be uint8 {IMAGE_SHAPE}, got '
                    f'{crop_bgr.dtype} {crop_bgr.shape}')
  if image_format == 'png':
    ok, buf = cv2.imencode('.png', crop_bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
  else:
    ok, buf = cv2.imencode('.jpg', crop_bgr,
                           [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
  if not ok:
    raise DataError('OpenCV failed to encode a crop')
  return buf.tobytes()


def check_example(example: dict[str, Any], where: str) -> None:
  """Shapes and finiteness of one example; `where` names the source record."""
  shapes = {'keypoints_2d': (NUM_JOINTS, 2), 'keypoints_2d_crop':
            (NUM_JOINTS, 2), 'keypoints_3d': (NUM_JOINTS, 3)}
  for key, shape in shapes.items():
    value = np.asarray(example[key])
    if value.shape != shape:
      raise DataError(f'{where}: {key} has shape {value.shape}, want {shape}')
    if not np.all(np.isfinite(value)):
      raise DataError(f'{where}: {key} is not finite (NaN or inf)')


# --------------------------------------------------------------------------
# Sharded, resumable, parallel writing.


@dataclasses.dataclass(frozen=True)
class ShardTask:
  """One output shard: a split, its index and the items that make it."""
  split: str
  index: int
  num_shards: int
  items: Any  # Picklable; handed to the dataset's `make_examples`.


def shard_filename(name: str, split: str, index: int, num_shards: int) -> str:
  return f'{name}-{split}.array_record-{index:05d}-of-{num_shards:05d}'


def split_into_shards(split: str, items: Sequence[Any] | np.ndarray,
                      examples_per_shard: int) -> list[ShardTask]:
  n = len(items)
  num_shards = max(1, -(-n // examples_per_shard))
  bounds = np.linspace(0, n, num_shards + 1).round().astype(int)
  return [ShardTask(split, i, num_shards, items[bounds[i]:bounds[i + 1]])
          for i in range(num_shards)]


def _write_shard(name: str, work_dir: str, task: ShardTask,
                 make_examples: Callable[[ShardTask], Iterable[dict]],
                 feature_spec) -> dict[str, int]:
  """Writes one shard atomically; returns its length and size."""
  serializer = example_serializer.ExampleSerializer(
      feature_spec.get_serialized_info())
  final = os.path.join(work_dir, shard_filename(
      name, task.split, task.index, task.num_shards))
  partial = final + '.part'
  writer = array_record_module.ArrayRecordWriter(partial, 'group_size:1')
  count = num_bytes = 0
  try:
    for example in make_examples(task):
      # Deterministic: proto map order must not depend on the process.
      record = serializer.get_tf_example(
          feature_spec.encode_example(example)).SerializeToString(
              deterministic=True)
      writer.write(record)
      count += 1
      num_bytes += len(record)
  finally:
    writer.close()
  stats = {'num_examples': count, 'num_bytes': num_bytes}
  with open(final + '.json.part', 'w') as f:
    json.dump(stats, f)
  os.replace(partial, final)
  os.replace(final + '.json.part', final + '.json')
  return stats


def _shard_worker(args):
  return _write_shard(*args)


def _end_with_parent(parent_pid: int) -> None:
  """Worker initializer: the worker dies when the build process dies.

  Without it a `kill -9` of the build leaves the workers running (they only
  notice the broken pipe after their current shard). Linux: the kernel sends
  SIGKILL on the parent's death (PR_SET_PDEATHSIG); elsewhere, and as a
  fallback, a thread polls the parent pid.
  """
  if sys.platform.startswith('linux'):
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      pr_set_pdeathsig = 1
      libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
      pass
  if os.getppid() != parent_pid:  # died before prctl took effect
    os._exit(1)  # pylint: disable=protected-access

  def watch():
    while os.getppid() == parent_pid:
      time.sleep(1.0)
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=watch, name='end-with-parent', daemon=True).start()


def fingerprint(options: dict[str, Any]) -> str:
  return hashlib.sha256(
      json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()


def built_options(final_dir: str) -> dict[str, Any] | None:
  """The options a finished build was made with (None: built before they
  were kept)."""
  path = os.path.join(final_dir, 'build_options.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get('options')


def split_sizes(final_dir: str) -> dict[str, int]:
  """Examples per split of a finished build (its dataset_info.json)."""
  with open(os.path.join(final_dir, 'dataset_info.json')) as f:
    info = json.load(f)
  return {s['name']: sum(int(n) for n in s.get('shardLengths', ()))
          for s in info.get('splits', ())}


def build(*, name: str, data_dir: str, feature_spec,
          shards: Sequence[ShardTask],
          make_examples: Callable[[ShardTask], Iterable[dict]],
          options: dict[str, Any], description: str = '',
          num_workers: int = 1, overwrite: bool = False,
          log=print) -> str:
  """Builds NAME into DATA_DIR; returns the finished version directory.

  `make_examples` must be a picklable (module level) function when
  `num_workers > 1`. `options` identify the build: an interrupted build is
  resumed only when they are unchanged.
  """
  dataset_dir = os.path.join(data_dir, name)
  final_dir = os.path.join(dataset_dir, VERSION)
  if os.path.exists(final_dir) and not overwrite:
    raise DataError(f'{final_dir} already exists (pass --overwrite to '
                    'rebuild it)')
  # One build of a dataset at a time (a second one gets LockHeldError).
  lock = locking.DirLock(dataset_dir, purpose=f'building {name}')
  lock.acquire()
  try:
    if lock.recovered:
      log(f'[{name}] taking over the lock of '
          f'{locking.describe_holder(lock.recovered)}, which ended')
    return _build_locked(
        name=name, dataset_dir=dataset_dir, final_dir=final_dir,
        feature_spec=feature_spec, shards=shards, make_examples=make_examples,
        options=options, description=description, num_workers=num_workers,
        overwrite=overwrite, log=log)
  finally:
    lock.release()


def _build_locked(*, name, dataset_dir, final_dir, feature_spec, shards,
                  make_examples, options, description, num_workers, overwrite,
                  log):
  work_dir = os.path.join(dataset_dir, f'.incomplete-{VERSION}')
  if os.path.exists(final_dir) and not overwrite:  # finished meanwhile
    raise DataError(f'{final_dir} already exists (pass --overwrite to '
                    'rebuild it)')
  stamp = os.path.join(work_dir, 'build_options.json')
  key = fingerprint(options)
  if os.path.isdir(work_dir):
    previous = None
    if os.path.exists(stamp):
      with open(stamp) as f:
        previous = json.load(f).get('fingerprint')
    if previous != key:
      log(f'[{name}] discarding an interrupted build made with other options')
      shutil.rmtree(work_dir)
  os.makedirs(work_dir, exist_ok=True)
  with open(stamp + '.part', 'w') as f:
    json.dump({'fingerprint': key, 'options': options}, f, default=str)
  os.replace(stamp + '.part', stamp)

  stats: dict[tuple[str, int], dict[str, int]] = {}
  todo = []
  for task in shards:
    path = os.path.join(work_dir, shard_filename(
        name, task.split, task.index, task.num_shards))
    if os.path.exists(path) and os.path.exists(path + '.json'):
      with open(path + '.json') as f:
        stats[(task.split, task.index)] = json.load(f)
    else:
      todo.append(task)
  total = sum(len(t.items) for t in shards)
  done = sum(s['num_examples'] for s in stats.values())
  if stats:
    log(f'[{name}] resuming: {len(stats)}/{len(shards)} shards already done')
  start = time.time()
  new = 0

  def report(task, result):
    nonlocal done, new
    stats[(task.split, task.index)] = result
    done += result['num_examples']
    new += result['num_examples']
    rate = new / max(time.time() - start, 1e-6)
    log(f'[{name}] {task.split} shard {task.index + 1}/{task.num_shards} '
        f'done; {done}/{total} examples ({rate:.0f} examples/s)')

  if num_workers <= 1 or len(todo) <= 1:
    for task in todo:
      report(task, _write_shard(name, work_dir, task, make_examples,
                                feature_spec))
  else:
    ctx = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=ctx, initializer=_end_with_parent,
        initargs=(os.getpid(),)) as pool:
      futures = {pool.submit(_shard_worker, (name, work_dir, task,
                                             make_examples, feature_spec)): task
                 for task in todo}
      try:
        for future in concurrent.futures.as_completed(futures):
          report(futures[future], future.result())
      except BaseException:
        for future in futures:
          future.cancel()
        raise

  split_infos = []
  for split in dict.fromkeys(t.split for t in shards):
    tasks = sorted((t for t in shards if t.split == split),
                   key=lambda t: t.index)
    split_infos.append(tfds.core.SplitInfo(
        name=split,
        shard_lengths=[stats[(split, t.index)]['num_examples'] for t in tasks],
        num_bytes=sum(stats[(split, t.index)]['num_bytes'] for t in tasks),
        filename_template=_template(work_dir, name, split)))
  for info in split_infos:
    if info.num_examples == 0:
      raise DataError(f'[{name}] split {info.name!r} has no examples')
  tfds.folder_dataset.write_metadata(
      data_dir=work_dir, features=feature_spec, split_infos=split_infos,
      version=VERSION, filename_template=_template(work_dir, name, None),
      check_data=False, description=description)
  for path in os.listdir(work_dir):
    if path.endswith('.json') and '.array_record-' in path:
      os.remove(os.path.join(work_dir, path))
  # build_options.json stays: what this build was made with (`built_options`).
  if os.path.exists(final_dir):  # --overwrite: swap, then delete the old one.
    old = os.path.join(dataset_dir, f'.old-{VERSION}-{os.getpid()}')
    os.replace(final_dir, old)
    os.replace(work_dir, final_dir)
    shutil.rmtree(old)
  else:
    os.replace(work_dir, final_dir)
  log(f'[{name}] finished: ' + ', '.join(
      f'{i.name}={i.num_examples}' for i in split_infos) + f' in {final_dir}')
  return final_dir


def _template(work_dir, name, split):
  return naming.ShardedFileTemplate(
      data_dir=work_dir, dataset_name=name, split=split,
      filetype_suffix='array_record')



def load_npz_dict(path: str, key: str, what: str) -> dict:
  """The pickled dict stored as the 0-d object array `key` of a legacy npz,
  read through the restricted unpickler (`safe_pickle`)."""
  try:
    value = safe_pickle.load_npz(path)[key].item()
    if not isinstance(value, dict):
      raise TypeError(f'{key!r} holds a {type(value).__name__}')
    return value
  except safe_pickle.UnsafePickleError as e:
    raise DataError(str(e)) from None
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{path}: not {what} ({type(e).__name__}: {e})') from None


def read_frame(path) -> np.ndarray:
  """A source frame as the official loader reads it (cv2.imread, BGR), but
  strictly: a truncated or corrupt image is an error naming the file."""
  try:
    return image_io.read_image(
        path, bgr=True,
        flags=cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
  except image_io.ImageError as e:
    raise DataError(str(e)) from None

def fail(message: str, status: int = 1) -> None:
  """One-line error for the command line."""
  print(f'error: {message}', file=sys.stderr)
  raise SystemExit(status)
