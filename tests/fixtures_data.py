"""Fixture generators for the data tests, in the real on-disk formats.

- H36M-Toolbox: `h36m_train.pkl` / `h36m_validation.pkl` (lists of dicts with
  the field names `generate_labels_h36m.py` writes) and the
  `images/s_XX_act_XX_subact_XX_ca_XX/s_..._XXXXXX.jpg` tree of full-size
  1000x1000 frames; raw route: `extracted/S*/Poses_D3_Positions_mono/*.cdf`,
  `Poses_D2_Positions/*.cdf`, `Videos/*.mp4` and VideoPose3D's
  `data_2d_h36m_cpn_ft_h36m_dbb.npz`.
- P-STMO / ContextPose_mpi: `data_train_3dhp.npz`, `data_test_3dhp.npz` and the
  256x192 crops under `mpi_inf_3dhp/images/` and
  `mpi_inf_3dhp_test_set/images/`.
The official code (the spec) is loaded from the bare mirror as the reference.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import types

import cv2
import numpy as np
import pytest

# A bare (or full) git clone of QitaoZhao/ContextAware-PoseFormer; the tests
# that run the official code itself as the reference skip without one.
MIRROR = os.environ.get('CONTEXTPOSE_JAX_OFFICIAL_REPO',
                        '/work/.mirror/QitaoZhao+ContextAware-PoseFormer/repo')
H36M_JOINT_IDX = [0, 1, 2, 3, 6, 7, 8, 12, 16, 14, 15, 17, 18, 19, 25, 26, 27]


def official_bytes(path: str) -> bytes:
  """A file of the official repository at HEAD (skips if no mirror)."""
  if not os.path.isdir(MIRROR):
    pytest.skip('official repository mirror not available '
                '(set CONTEXTPOSE_JAX_OFFICIAL_REPO to a clone)')
  return subprocess.run(['git', '-C', MIRROR, 'show', f'HEAD:{path}'],
                        check=True, capture_output=True).stdout


def official_source(path: str) -> str:
  """Text of a file of the official repository (skips if no mirror)."""
  return official_bytes(path).decode('utf-8')


def official_module(path: str, name: str) -> types.ModuleType:
  """Executes an official source file as a module (the reference)."""
  module = types.ModuleType(name)
  exec(compile(official_source(path), path, 'exec'), module.__dict__)  # pylint: disable=exec-used
  return module


def official_transform():
  """`H36M-Toolbox/transform.py`: get_affine_transform, _infer_box, ..."""
  return official_module('H36M-Toolbox/transform.py', 'official_transform')


def official_crop_image(image, center, scale):
  """`ContextPose/mvn/utils/img.py: crop_image` without its torch import."""
  transform = official_transform()
  trans = transform.get_affine_transform(center, scale, 0, [192, 256])
  return cv2.warpAffine(image, trans, (192, 256), flags=cv2.INTER_LINEAR)


# ---------------------------------------------------------------------------
# Human3.6M (H36M-Toolbox pickles + JPEG tree)

CAMERA = {'fx': 1145.04940459, 'fy': 1143.78109572, 'cx': 512.54150496,
          'cy': 515.45148698}


def random_pose_mm(rng, depth=4500.0):
  """A plausible-looking 17-joint pose around a root at `depth` mm."""
  root = np.array([rng.uniform(-300, 300), rng.uniform(0, 300), depth])
  offsets = rng.normal(0, 250, size=(17, 3))
  offsets[0] = 0
  return root + offsets


def textured_frame(rng, h=1000, w=1000):
  """A full-size frame with structure at every scale (so crops are checked)."""
  coarse = rng.integers(0, 255, size=(h // 50, w // 50, 3)).astype(np.uint8)
  frame = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
  noise = rng.integers(0, 60, size=(h, w, 3)).astype(np.uint8)
  return cv2.add(frame, noise)


def h36m_records(rng, videos, frames_per_video=2):
  """Official label dicts for (subject, action, subaction, camera_id) videos."""
  from contextpose_jax import geometry  # pylint: disable=g-import-not-at-top
  train, validation = [], []
  for video_id, (s, a, sa, cam) in enumerate(videos):
    for i in range(frames_per_video):
      pose = random_pose_mm(rng)
      gt = geometry.weak_project(pose, CAMERA['fx'], CAMERA['fy'],
                                 CAMERA['cx'], CAMERA['cy'])
      cpn = (gt + rng.normal(0, 3, gt.shape)).astype(np.float32)
      box = geometry.infer_box(pose[0], **CAMERA)
      center = (0.5 * (box[0] + box[2]), 0.5 * (box[1] + box[3]))
      scale = ((box[2] - box[0]) / 200.0, (box[3] - box[1]) / 200.0)
      trans = official_transform().get_affine_transform(center, scale, 0,
                                                        [192, 256])
      cpn_crop = np.zeros([17, 2], dtype='float32')
      gt_crop = np.zeros([17, 2], dtype='float32')
      for j in range(17):
        cpn_crop[j] = (trans @ np.array([cpn[j, 0], cpn[j, 1], 1.0]))[:2]
        gt_crop[j] = (trans @ np.array([gt[j, 0], gt[j, 1], 1.0]))[:2]
      subdir = f's_{s:02d}_act_{a:02d}_subact_{sa:02d}_ca_{cam + 1:02d}'
      datum = {
          'image': f'{subdir}/{subdir}_{i + 1:06d}.jpg',
          'joints_2d_gt': gt / 1000 * 2 - [1, 1],
          'joints_2d_cpn': cpn / 1000 * 2 - [1, 1],
          'joints_3d': pose / 1000.0,
          'joints_vis': np.ones((17, 3)),
          'video_id': video_id, 'image_id': i + 1, 'subject': s, 'action': a,
          'subaction': sa, 'camera_id': cam, 'source': 'h36m',
          'camera': {'R': np.eye(3), 'T': np.zeros((3, 1)), **CAMERA,
                     'k': np.zeros((3, 1)), 'p': np.zeros((2, 1))},
          'nposes': frames_per_video, 'center': center, 'scale': scale,
          'box': box, 'joints_2d_gt_crop': gt_crop,
          'joints_2d_cpn_crop': cpn_crop,
      }
      (train if s in (1, 5, 6, 7, 8) else validation).append(datum)
  return train, validation


def make_h36m_manual_dir(root, seed=0, videos=None, frames_per_video=2):
  """H36M-Toolbox layout: pickles + JPEG tree of 1000x1000 frames."""
  rng = np.random.default_rng(seed)
  videos = videos or [(1, 2, 1, 0), (5, 3, 2, 1), (9, 4, 1, 2), (11, 2, 2, 3)]
  train, validation = h36m_records(rng, videos, frames_per_video)
  os.makedirs(root, exist_ok=True)
  for datum in train + validation:
    path = os.path.join(root, 'images', datum['image'])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, textured_frame(rng))
  with open(os.path.join(root, 'h36m_train.pkl'), 'wb') as f:
    pickle.dump(train, f)
  with open(os.path.join(root, 'h36m_validation.pkl'), 'wb') as f:
    pickle.dump(validation, f)
  return train, validation


def read_split(name, split, data_dir):
  """All examples of a split as tfds decodes them."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  return [source[i] for i in range(len(source))]


# ---------------------------------------------------------------------------
# Raw Human3.6M (CDF poses, VideoPose3D CPN npz, JPEG tree)


def write_cdf_pose(path, pose, dtype=np.float64):
  """A Human3.6M-style CDF: one record, variable 'Pose' of (frames, 32*k),
  stored as CDF_DOUBLE (float64) or CDF_FLOAT (float32)."""
  from cdflib.cdfwrite import CDF  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if os.path.exists(path):
    os.remove(path)
  data = pose.reshape(1, pose.shape[0], -1).astype(dtype)
  cdf = CDF(path, cdf_spec={'Majority': 'Row_major'})
  kind = CDF.CDF_FLOAT if np.dtype(dtype) == np.float32 else CDF.CDF_DOUBLE
  cdf.write_var({'Variable': 'Pose', 'Data_Type': kind,
                 'Num_Elements': 1, 'Rec_Vary': True,
                 'Dim_Sizes': list(data.shape[1:])}, var_data=data)
  cdf.close()


def make_h36m_raw_dir(root, subjects=(1, 9), actions=(2,), frames=3, seed=0,
                      missing_cpn=((9, 'Directions'),),
                      missing_images=((1, 2, 1, 1, 2),), dtype=np.float64):
  """Raw Human3.6M files for a few videos, in H36M-Toolbox's layout; the CDF
  poses in `dtype` (the real files exist in float32 and float64)."""
  from data_prep import h36m_metadata  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  positions = {}
  for s in subjects:
    for a in actions:
      for sa in (1, 2):
        for c in range(4):
          base = h36m_metadata.base_filename(s, a, sa, c)
          fx, fy, cx, cy = h36m_metadata.INTRINSICS[c]
          w, h = h36m_metadata.FRAME_SIZES[c]
          pose3d = np.stack([np.concatenate([random_pose_mm(rng)] * 2)[:32]
                             for _ in range(frames)])
          pose2d = pose3d[..., :2] / pose3d[..., 2:] * [fx, fy] + [cx, cy]
          write_cdf_pose(os.path.join(root, 'extracted', f'S{s}',
                                      'Poses_D3_Positions_mono',
                                      base + '.cdf'), pose3d, dtype)
          write_cdf_pose(os.path.join(root, 'extracted', f'S{s}',
                                      'Poses_D2_Positions', base + '.cdf'),
                         pose2d, dtype)
          key = base.split('.')[0]
          if (s, key) not in missing_cpn:
            cams = positions.setdefault(f'S{s}', {}).setdefault(key, [None] * 4)
            cpn = pose2d[:, H36M_JOINT_IDX] + rng.normal(0, 3, (frames, 17, 2))
            # One detection too many, as in VideoPose3D (truncated to nposes).
            cams[c] = np.concatenate([cpn, cpn[-1:]]).astype(np.float32)
          for i in range(frames):
            if (s, a, sa, c + 1, i + 1) in missing_images:
              continue
            subdir = f's_{s:02d}_act_{a:02d}_subact_{sa:02d}_ca_{c + 1:02d}'
            path = os.path.join(root, 'images', subdir,
                                f'{subdir}_{i + 1:06d}.jpg')
            os.makedirs(os.path.dirname(path), exist_ok=True)
            cv2.imwrite(path, textured_frame(rng, h=h, w=w))
  metadata = {'layout_name': 'h36m', 'num_joints': 17,
              'keypoints_symmetry': [[4, 5, 6, 11, 12, 13],
                                     [1, 2, 3, 14, 15, 16]]}
  np.savez_compressed(os.path.join(root, 'data_2d_h36m_cpn_ft_h36m_dbb.npz'),
                      positions_2d=positions, metadata=metadata)


def run_official_label_script(raw_root, work, subjects=(1, 9), actions=(2,)):
  """Runs H36M-Toolbox/generate_labels_h36m.py on the raw fixture (its loops
  restricted to the fixture's subjects/actions); returns (train, test)."""
  os.makedirs(os.path.join(work, 'common'), exist_ok=True)
  os.makedirs(os.path.join(work, 'data'), exist_ok=True)
  for name in ('transform.py', 'metadata.py', 'metadata.xml',
               'common/camera.py', 'common/utils.py', 'common/quaternion.py'):
    with open(os.path.join(work, name), 'w') as f:
      f.write(official_source(f'H36M-Toolbox/{name}'))
  camera_pkl = official_bytes('H36M-Toolbox/camera_data.pkl')
  with open(os.path.join(work, 'camera_data.pkl'), 'wb') as f:
    f.write(camera_pkl)
  script = official_source('H36M-Toolbox/generate_labels_h36m.py')
  script = script.replace('subject_list = [1, 5, 6, 7, 8, 9, 11]',
                          f'subject_list = {list(subjects)}')
  script = script.replace('action_list = [x for x in range(2, 17)]',
                          f'action_list = {list(actions)}')
  with open(os.path.join(work, 'generate_labels_h36m.py'), 'w') as f:
    f.write(script)
  for name in ('extracted', 'images'):
    os.symlink(os.path.join(raw_root, name), os.path.join(work, name))
  os.symlink(os.path.join(raw_root, 'data_2d_h36m_cpn_ft_h36m_dbb.npz'),
             os.path.join(work, 'data', 'data_2d_h36m_cpn_ft_h36m_dbb.npz'))
  subprocess.run([sys.executable, 'generate_labels_h36m.py'], cwd=work,
                 check=True, capture_output=True)
  out = []
  for name in ('h36m_train.pkl', 'h36m_validation.pkl'):
    with open(os.path.join(work, name), 'rb') as f:
      out.append(pickle.load(f))
  return out


# ---------------------------------------------------------------------------
# MPI-INF-3DHP (P-STMO npz + 256x192 crops)


def make_3dhp_manual_dir(root, seed=0, frames=3):
  """ContextPose_mpi `dataset/`: both npz files and the crop trees."""
  rng = np.random.default_rng(seed)

  def anim(n, valid=None):
    d = {'data_2d': rng.uniform(0, 2048, (n, 17, 2)).astype(np.float32),
         'data_2d_crop': rng.uniform(0, 192, (n, 17, 2)).astype(np.float32),
         'data_3d': np.stack([random_pose_mm(rng) for _ in range(n)]).astype(
             np.float32)}
    if valid is not None:
      d['valid'] = np.asarray(valid, np.float64)
    return d

  def crop_file(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, textured_frame(rng, 256, 192),
                [cv2.IMWRITE_JPEG_QUALITY, 90])

  train = {}
  for subject, seq in ((1, 1), (8, 2)):
    cams = {}
    for cam in (0, 4):
      cams[str(cam)] = anim(frames)
      subdir = f's_{subject:02d}_seq_{seq:02d}_ca_{cam:02d}'
      for i in range(frames):
        crop_file(os.path.join(root, 'mpi_inf_3dhp', 'images', subdir,
                               f'{subdir}_{i + 1:06d}.jpg'))
    train[f'S{subject} Seq{seq}'] = [cams, 25]
  test = {}
  for seq in ('TS1', 'TS5'):
    test[seq] = anim(frames, valid=[1, 0, 1][:frames])
    for i in range(frames):
      crop_file(os.path.join(root, 'mpi_inf_3dhp_test_set', 'images', seq,
                             f'{seq}_{i + 1:06d}.jpg'))
  np.savez_compressed(os.path.join(root, 'data_train_3dhp.npz'), data=train)
  np.savez_compressed(os.path.join(root, 'data_test_3dhp.npz'), data=test)
  return train, test
