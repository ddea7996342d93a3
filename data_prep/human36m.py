"""`human36m`: the Human3.6M builder (one example per frame, every frame).

--manual_dir holds the labels and the frames, as H36M-Toolbox leaves them:

  h36m_train.pkl, h36m_validation.pkl   labels (`generate_labels_h36m.py`);
                                        or, to generate them here, the raw
                                        files (see `h36m_labels.py`)
  images/s_XX_act_XX_subact_XX_ca_XX/s_XX_act_XX_subact_XX_ca_XX_NNNNNN.jpg
                                        the frames (`video_to_images.py`), or
  extracted/S*/Videos/*.mp4             the original videos (--frame_source
                                        video: no 200 GB JPEG dump needed)

Each crop is made exactly as the official loader makes it
(`ContextPose/mvn/datasets/human36m.py`): the frame read by OpenCV, warped
with the official affine from the label's (center, scale) with bilinear
`cv2.warpAffine` to 192x256. `keypoints_2d` / `keypoints_2d_crop` are the
labels' CPN detections (`joints_2d_cpn`, `joints_2d_cpn_crop`),
`keypoints_3d` their `joints_3d` (metres, camera frame), `camera` the
0-based `camera_id`, `frame` the 1-based `image_id`.
"""
from __future__ import annotations

import functools
import os
import pickle

import cv2
import numpy as np

from contextpose_jax import geometry
from data_prep import h36m_labels
from data_prep import h36m_metadata
from data_prep import records
from data_prep import safe_pickle

NAME = 'human36m'
SPLITS = {'train': h36m_metadata.TRAIN_SUBJECTS,
          'validation': h36m_metadata.VALIDATION_SUBJECTS}
LABEL_FILES = {'train': 'h36m_train.pkl', 'validation': 'h36m_validation.pkl'}

OFFICIAL_FIELDS = {
    'keypoints_2d': ('joints_2d_cpn', (17, 2)),
    'keypoints_2d_crop': ('joints_2d_cpn_crop', (17, 2)),
    'keypoints_3d': ('joints_3d', (17, 3)),
    'center': ('center', (2,)), 'scale': ('scale', (2,)),
    'subject': ('subject', ()), 'action': ('action', ()),
    'subaction': ('subaction', ()), 'camera': ('camera_id', ()),
    'frame': ('image_id', ()), 'video_id': ('video_id', ()),
}


def labels_from_records(items, where: str) -> np.ndarray:
  """Official label dicts -> our table, with one-line errors on bad input."""
  if not isinstance(items, (list, tuple)):
    raise records.DataError(f'{where}: want a list of label dicts, got '
                            f'{type(items).__name__}')
  table = np.zeros(len(items), h36m_metadata.LABEL_DTYPE)
  for i, item in enumerate(items):
    if not isinstance(item, dict):
      raise records.DataError(f'{where}: record {i} is a '
                              f'{type(item).__name__}, not a dict')
    for ours, (field, shape) in OFFICIAL_FIELDS.items():
      if field not in item:
        raise records.DataError(f'{where}: record {i} has no field {field!r}')
      try:
        value = np.asarray(item[field], dtype=np.float64)
      except (TypeError, ValueError) as e:
        raise records.DataError(f'{where}: record {i} field {field!r} is not '
                                f'numeric ({e})') from None
      if value.shape != shape:
        raise records.DataError(f'{where}: record {i} field {field!r} has '
                                f'shape {value.shape}, want {shape}')
      if not np.all(np.isfinite(value)):
        raise records.DataError(f'{where}: record {i} field {field!r} has '
                                'NaN or inf values')
      table[ours][i] = value
    # Labels made from a float32 CDF hold float32 (center, scale) scalars.
    table['float32_box'][i] = np.asarray(item['center']).dtype == np.float32
  return table


def crop_box(row):
  """The row's (center, scale) in the dtype they were computed in: the
  official loader crops with the pickle's values, float32 ones included."""
  if row['float32_box']:
    return row['center'].astype(np.float32), row['scale'].astype(np.float32)
  return row['center'], row['scale']


def check_split(table, split, where):
  allowed = SPLITS[split]
  bad = ~np.isin(table['subject'], allowed)
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise records.DataError(
        f'{where}: record {i} is subject S{table["subject"][i]}, but split '
        f'{split!r} holds only subjects {list(allowed)}')


def load_toolbox_pickle(path: str, split: str) -> np.ndarray:
  """`h36m_{train,validation}.pkl` of H36M-Toolbox -> our label table."""
  try:
    items = safe_pickle.load(path)
  except FileNotFoundError:
    raise records.DataError(f'{path}: no such file') from None
  except safe_pickle.UnsafePickleError as e:
    raise records.DataError(str(e)) from None
  except (pickle.UnpicklingError, EOFError, AttributeError, ImportError,
          ValueError, TypeError, IndexError, OSError) as e:
    raise records.DataError(f'{path}: not a readable pickle ({e})') from None
  table = labels_from_records(items, path)
  if len(table) == 0:
    raise records.DataError(f'{path}: no records')
  check_split(table, split, path)
  return table


# ---------------------------------------------------------------------------
# Frames


def read_jpeg_frame(image_root, row) -> np.ndarray:
  path = h36m_metadata.frame_path(image_root, row)
  if not os.path.exists(path):
    raise records.DataError(f'missing frame {path} ({h36m_metadata.describe(row)})')
  return records.read_frame(path)


class VideoFrames:
  """Frames of the original mp4 videos, read forward (seeking is unreliable).

  Frame k (1-based, the labels' `image_id`) is the k-th decoded frame, as
  `ffmpeg -i video.mp4 %06d.jpg` numbers them.
  """

  def __init__(self, manual_dir):
    self._manual_dir = manual_dir
    self._path = None
    self._capture = None
    self._next = 0  # 0-based index of the frame the next grab() returns

  def _open(self, path):
    if self._capture is not None:
      self._capture.release()
    if not os.path.exists(path):
      raise records.DataError(f'missing video {path}')
    self._capture = cv2.VideoCapture(path)
    if not self._capture.isOpened():
      raise records.DataError(f'cannot open video {path}')
    self._path, self._next = path, 0

  def read(self, row) -> np.ndarray:
    path = h36m_metadata.video_path(self._manual_dir, row)
    index = int(row['frame']) - 1
    if path != self._path or index < self._next:
      self._open(path)
    while self._next < index:
      if not self._capture.grab():
        raise records.DataError(f'{path} ends before frame {index + 1}')
      self._next += 1
    ok, frame = self._capture.read()
    if not ok:
      raise records.DataError(f'{path} ends before frame {index + 1}')
    self._next += 1
    return frame

  def close(self):
    if self._capture is not None:
      self._capture.release()


def crop_example(frame_bgr, row, image_format, jpeg_quality) -> dict:
  """One record from a frame and its label row."""
  crop = geometry.crop_image(frame_bgr, *crop_box(row))
  example = {
      'image': records.encode_crop(crop, image_format, jpeg_quality),
      'keypoints_2d': row['keypoints_2d'],
      'keypoints_2d_crop': row['keypoints_2d_crop'],
      'keypoints_3d': row['keypoints_3d'],
  }
  for key in records.INT_FIELDS:
    example[key] = int(row[key])
  records.check_example(example, h36m_metadata.describe(row))
  return example


def make_examples(options, task):
  """Examples of one shard (runs in a worker process)."""
  if options['frame_source'] == 'video':
    frames = VideoFrames(options['manual_dir'])
    read = frames.read
  else:
    image_root = os.path.join(options['manual_dir'], 'images')
    read = functools.partial(read_jpeg_frame, image_root)
  for row in task.items:
    yield crop_example(read(row), row, options['image_format'],
                       options['jpeg_quality'])


def resolve_frame_source(manual_dir, frame_source):
  has_jpeg = os.path.isdir(os.path.join(manual_dir, 'images'))
  has_video = os.path.isdir(os.path.join(manual_dir, 'extracted'))
  if frame_source == 'auto':
    if has_jpeg:
      return 'jpeg'
    if has_video:
      return 'video'
    raise records.DataError(
        f'--manual_dir={manual_dir} has neither images/ (the JPEG tree) nor '
        'extracted/S*/Videos/ (the original videos)')
  if frame_source == 'jpeg' and not has_jpeg:
    raise records.DataError(f'--manual_dir={manual_dir} has no images/')
  if frame_source == 'video' and not has_video:
    raise records.DataError(f'--manual_dir={manual_dir} has no extracted/')
  return frame_source


def load_labels(manual_dir, labels='auto', frame_source='jpeg', log=print):
  """{split: label table} from the pickles or generated from raw files."""
  paths = {s: os.path.join(manual_dir, f) for s, f in LABEL_FILES.items()}
  have_pickles = all(os.path.exists(p) for p in paths.values())
  if labels == 'pickle' or (labels == 'auto' and have_pickles):
    return {s: load_toolbox_pickle(p, s) for s, p in paths.items()}
  if labels == 'auto' and not h36m_labels.has_raw_files(manual_dir):
    raise records.DataError(
        f'--manual_dir={manual_dir} has neither h36m_train.pkl + '
        'h36m_validation.pkl nor the raw files (extracted/S*/'
        'Poses_D3_Positions_mono, Poses_D2_Positions, '
        'data_2d_h36m_cpn_ft_h36m_dbb.npz)')
  return h36m_labels.generate(manual_dir, frame_source=frame_source, log=log)


def build(manual_dir, *, data_dir, frame_source='auto', labels='auto',
          image_format='jpeg', jpeg_quality=95, num_workers=1,
          examples_per_shard=10000, overwrite=False, log=print):
  """Builds `human36m` (train: S1 S5 S6 S7 S8, validation: S9 S11)."""
  frame_source = resolve_frame_source(manual_dir, frame_source)
  tables = load_labels(manual_dir, labels, frame_source, log)
  shards = []
  for split, table in tables.items():
    shards += records.split_into_shards(split, table, examples_per_shard)
  label_stamp = {s: [len(t), int(t['video_id'].sum()),
                     float(np.float64(t['keypoints_3d'].sum())),
                     float(t['center'].sum() + t['scale'].sum()),
                     int(t['float32_box'].sum())]
                 for s, t in tables.items()}
  options = dict(manual_dir=os.path.abspath(manual_dir),
                 frame_source=frame_source, image_format=image_format,
                 jpeg_quality=jpeg_quality)
  return records.build(
      name=NAME, data_dir=data_dir, feature_spec=records.features(image_format),
      shards=shards, make_examples=functools.partial(make_examples, options),
      options=dict(options, labels=label_stamp,
                   examples_per_shard=examples_per_shard),
      description=__doc__, num_workers=num_workers, overwrite=overwrite,
      log=log)
