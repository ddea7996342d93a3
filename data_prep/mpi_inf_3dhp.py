"""`mpi_inf_3dhp`: MPI-INF-3DHP from the files the official 3DHP code reads.

--manual_dir is ContextPose_mpi's `dataset/` (P-STMO layout):

  data_train_3dhp.npz   {'S1 Seq1': [{'0': {data_2d, data_2d_crop, data_3d},
                          ...cameras 0 1 2 4 5 6 7 8}, fps], ...}
  data_test_3dhp.npz    {'TS1': {data_2d, data_2d_crop, data_3d, valid}, ...}
  mpi_inf_3dhp/images/s_XX_seq_XX_ca_XX/s_XX_seq_XX_ca_XX_NNNNNN.jpg
  mpi_inf_3dhp_test_set/images/TSk/TSk_NNNNNN.jpg
                        the 256x192 crops (`convert_to_small*.py`); a frame
                        that is still full size is cropped here with the
                        official box and affine, as those scripts do

Records (split `train` = every frame of S1-S8, `test` = TS1-TS6, every frame
with its `valid` flag; the official evaluation uses the valid ones):
`keypoints_2d` = ground-truth 2D normalised with 2048x2048 (train, TS1-TS4)
or 1920x1080 (TS5, TS6), `keypoints_2d_crop` = `data_2d_crop`,
`keypoints_3d` = `data_3d` (univ_annot3) converted from millimetres to metres
(the official code keeps millimetres), camera frame, not root-relative (root
= joint 14). `sequence` = 'S1 Seq1' / 'TS1'; `subject` = 1..8 (train) or
1..6 (TSk); `action` = the Seq number (0 on test); `subaction` = 0;
`camera` = the camera index (-1 on test); `frame` = 1-based image number;
`video_id` = index of the (sequence, camera) video.
With --image_format=jpeg the stored crop is the source JPEG itself (no
re-encoding: bit-exact with the official pipeline); png stores its decoded
pixels losslessly. A frame still at full size is made into what the official
path reads after `convert_to_small*.py`: its crop (box from `data_3d`'s root
in the npz's own dtype, with the scripts' float32 arithmetic) written as
OpenCV's quality-95 JPEG (`cv2.imwrite`'s default), stored as those JPEG
bytes (jpeg, whatever --jpeg_quality says) or as their decoded pixels (png).
"""
from __future__ import annotations

import functools
import os

import cv2
import numpy as np

from contextpose_jax import geometry
from contextpose_jax import image_io
from contextpose_jax import skeleton
from data_prep import records

NAME = 'mpi_inf_3dhp'
# `convert_to_small*.py` writes its crops with cv2.imwrite's default quality.
OFFICIAL_JPEG_QUALITY = 95
TRAIN_NPZ = 'data_train_3dhp.npz'
TEST_NPZ = 'data_test_3dhp.npz'
ROOT = skeleton.ROOT_JOINT['3dhp']

# (fx, fy, cx, cy) of the 14 training cameras, then the TS5/TS6 camera, as in
# ContextPose_mpi/dataset/data_util/convert_to_small*.py (only used to crop
# frames that are not yet 256x192). TS1-TS4 use camera 8.
INTRINSICS = (
    (1497.693, 1497.103, 1024.704, 1051.394),
    (1495.217, 1495.52, 1030.519, 1052.626),
    (1495.587, 1497.828, 983.8873, 987.5902),
    (1495.886, 1496.033, 1029.06, 1041.409),
    (1490.952, 1491.108, 987.6075, 1019.069),
    (1500.414, 1499.971, 1012.331, 998.5009),
    (1498.471, 1498.8, 999.7319, 1010.251),
    (1498.831, 1499.674, 987.2716, 976.8773),
    (1500.172, 1500.837, 1017.387, 1043.032),
    (1501.554, 1501.9, 1010.423, 1037.096),
    (1498.423, 1498.585, 1041.614, 997.0433),
    (1495.779, 1493.703, 1009.802, 999.9984),
    (1501.326, 1501.491, 1000.56, 1014.975),
    (1496.961, 1497.378, 1005.702, 1004.214),
    (1683.98345952, 1672.59370772, 939.85754016, 560.140743168),
)


def _load_npz(path):
  if not os.path.exists(path):
    raise records.DataError(f'missing {path}')
  return records.load_npz_dict(path, 'data', "a P-STMO 3DHP label file (want an npz "
                               "with a pickled dict 'data')")


def _arrays(anim, where, keys):
  out = {}
  for key in keys:
    if not isinstance(anim, dict) or key not in anim:
      raise records.DataError(f'{where}: no field {key!r}')
    out[key] = np.asarray(anim[key])
  n = len(out['data_3d'])
  for key, shape in (('data_2d', (17, 2)), ('data_2d_crop', (17, 2)),
                     ('data_3d', (17, 3))):
    if out[key].shape != (n,) + shape:
      raise records.DataError(f'{where}: {key} has shape {out[key].shape}, '
                              f'want ({n}, {shape[0]}, {shape[1]})')
  if 'valid' in out and out['valid'].reshape(-1).shape != (n,):
    raise records.DataError(f'{where}: valid has shape {out["valid"].shape}, '
                            f'want ({n},)')
  return out


ROW_DTYPE = np.dtype([
    ('keypoints_2d', np.float32, (17, 2)),
    ('keypoints_2d_crop', np.float32, (17, 2)),
    ('keypoints_3d', np.float32, (17, 3)),
    ('subject', np.int32), ('action', np.int32), ('subaction', np.int32),
    ('camera', np.int32), ('frame', np.int32), ('video_id', np.int32),
    ('valid', np.bool_), ('intrinsics', np.int32), ('sequence', 'U16'),
    ('image', 'U256'),
    # data_3d's root joint as the npz holds it (millimetres; float32 in the
    # P-STMO files): the box of a full-size frame is computed from it.
    ('root_mm', np.float64, (3,)), ('float32_pose', np.bool_)])


def _rows(arrays, *, sequence, subject, action, camera, video_id, size,
          intrinsics, image_fmt, valid=None):
  n = len(arrays['data_3d'])
  rows = np.zeros(n, ROW_DTYPE)
  w, h = size
  rows['keypoints_2d'] = geometry.normalize_screen_coordinates(
      arrays['data_2d'][..., :2].astype(np.float64), w, h)
  rows['keypoints_2d_crop'] = arrays['data_2d_crop']
  rows['keypoints_3d'] = arrays['data_3d'] / 1000.0
  rows['subject'], rows['action'], rows['subaction'] = subject, action, 0
  rows['camera'], rows['video_id'] = camera, video_id
  rows['frame'] = np.arange(1, n + 1)
  rows['valid'] = True if valid is None else valid.reshape(-1).astype(bool)
  rows['intrinsics'], rows['sequence'] = intrinsics, sequence
  rows['image'] = [image_fmt.format(i + 1) for i in range(n)]
  rows['root_mm'] = arrays['data_3d'][:, ROOT]
  rows['float32_pose'] = arrays['data_3d'].dtype == np.float32
  return rows


def official_crop(image_bgr, row) -> bytes:
  """`convert_to_small*.py` on a full-size frame: the box from the root
  joint 14 in the npz's dtype (float32: the scripts' float32 arithmetic, the
  intrinsics as the Python floats they list), the official warp, and the JPEG
  `cv2.imwrite` writes (quality 95). Returns that JPEG's bytes."""
  fx, fy, cx, cy = INTRINSICS[int(row['intrinsics'])]
  root = row['root_mm'].astype(np.float32 if row['float32_pose'] else np.float64)
  center, scale = geometry.box_to_center_scale(geometry.infer_box(root, fx, fy, cx, cy))
  return records.encode_crop(geometry.crop_image(image_bgr, center, scale), 'jpeg',
                             OFFICIAL_JPEG_QUALITY)


def load_labels(manual_dir):
  """{'train': rows, 'test': rows} from the two npz files."""
  tables = {}
  video_id = 0
  train = _load_npz(os.path.join(manual_dir, TRAIN_NPZ))
  parts = []
  for seq, value in train.items():
    where = f'{TRAIN_NPZ}[{seq!r}]'
    try:
      subject_name, seq_name = seq.split(' ')
      subject, seq_number = int(subject_name[1:]), int(seq_name[3:])
      cameras = value[0]
    except (ValueError, TypeError, IndexError, KeyError):
      raise records.DataError(f"{where}: want key 'S<k> Seq<k>' holding "
                              '[{camera: arrays}, fps]') from None
    for cam, anim in cameras.items():
      arrays = _arrays(anim, f'{where}[0][{cam!r}]',
                       ('data_2d', 'data_2d_crop', 'data_3d'))
      subdir = f's_{subject:02d}_seq_{seq_number:02d}_ca_{int(cam):02d}'
      parts.append(_rows(
          arrays, sequence=seq, subject=subject, action=seq_number,
          camera=int(cam), video_id=video_id, size=(2048, 2048),
          intrinsics=int(cam),
          image_fmt=os.path.join('mpi_inf_3dhp', 'images', subdir,
                                 subdir + '_{:06d}.jpg')))
      video_id += 1
  if not parts:
    raise records.DataError(f'{TRAIN_NPZ}: no sequences')
  tables['train'] = np.concatenate(parts)
  test = _load_npz(os.path.join(manual_dir, TEST_NPZ))
  parts = []
  for seq, anim in test.items():
    where = f'{TEST_NPZ}[{seq!r}]'
    if not (isinstance(seq, str) and seq.startswith('TS')):
      raise records.DataError(f"{where}: want keys 'TS1'..'TS6'")
    arrays = _arrays(anim, where, ('data_2d', 'data_2d_crop', 'data_3d',
                                   'valid'))
    late = seq in ('TS5', 'TS6')  # outdoor sequences: 1920x1080 camera
    parts.append(_rows(
        arrays, sequence=seq, subject=int(seq[2:]), action=0, camera=-1,
        video_id=video_id, size=(1920, 1080) if late else (2048, 2048),
        intrinsics=14 if late else 8, valid=arrays['valid'],
        image_fmt=os.path.join('mpi_inf_3dhp_test_set', 'images', seq,
                               seq + '_{:06d}.jpg')))
    video_id += 1
  if not parts:
    raise records.DataError(f'{TEST_NPZ}: no sequences')
  tables['test'] = np.concatenate(parts)
  return tables


def make_examples(options, task):
  """Examples of one shard (runs in a worker process)."""
  for row in task.items:
    path = os.path.join(options['manual_dir'], str(row['image']))
    if not os.path.exists(path):
      raise records.DataError(f'missing image {path}')
    with open(path, 'rb') as f:
      encoded = f.read()
    try:
      image = image_io.decode_image(
          encoded, path, bgr=True,
          flags=cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except image_io.ImageError as e:
      raise records.DataError(str(e)) from None
    if image.shape != records.IMAGE_SHAPE:
      # Not yet cropped: the JPEG the official scripts would have left here.
      encoded = official_crop(image, row)
      image = image_io.decode_image(encoded, path, bgr=True)
    if options['image_format'] == 'png':
      encoded = records.encode_crop(image, 'png', options['jpeg_quality'])
    example = {'image': encoded, 'sequence': str(row['sequence']),
               'valid': bool(row['valid'])}
    for key in ('keypoints_2d', 'keypoints_2d_crop', 'keypoints_3d'):
      example[key] = row[key]
    for key in records.INT_FIELDS:
      example[key] = int(row[key])
    records.check_example(example, f'{row["sequence"]} camera '
                          f'{int(row["camera"])} frame {int(row["frame"])}')
    yield example


def build(manual_dir, *, data_dir, image_format='jpeg', jpeg_quality=95,
          num_workers=1, examples_per_shard=10000, overwrite=False,
          log=print):
  """Builds `mpi_inf_3dhp` (splits train, test)."""
  tables = load_labels(manual_dir)
  shards = []
  for split, table in tables.items():
    shards += records.split_into_shards(split, table, examples_per_shard)
  options = dict(manual_dir=os.path.abspath(manual_dir),
                 image_format=image_format, jpeg_quality=jpeg_quality)
  stamp = {s: [len(t), float(np.float64(t['keypoints_3d'].sum()))]
           for s, t in tables.items()}
  return records.build(
      name=NAME, data_dir=data_dir,
      feature_spec=records.features(image_format, mpi_inf_3dhp=True),
      shards=shards, make_examples=functools.partial(make_examples, options),
      options=dict(options, labels=stamp, full_frames='official jpeg',
                   examples_per_shard=examples_per_shard),
      description=__doc__, num_workers=num_workers, overwrite=overwrite,
      log=log)
