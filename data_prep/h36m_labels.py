"""Human3.6M labels from the raw files (what `generate_labels_h36m.py` does).

Inputs under --manual_dir (H36M-Toolbox's layout):

  extracted/S{s}/Poses_D3_Positions_mono/<name>.cdf   3D joints, camera frame
  extracted/S{s}/Poses_D2_Positions/<name>.cdf        ground-truth 2D
  data_2d_h36m_cpn_ft_h36m_dbb.npz (or data/...)      VideoPose3D CPN 2D
  camera_data.pkl (optional)                          H36M-Toolbox cameras;
                                                      default: the published
                                                      intrinsics
  images/... (JPEG tree) or extracted/S{s}/Videos/<name>.mp4

Per frame, as the official script: the 17 of 32 mocap joints, the box from
the 3D root (2 m around it), its (center, scale), the CPN detections mapped
into the crop with the official affine, the 2D normalised by the frame width
and height, 3D in metres. The pose keeps the CDF file's dtype, as in the
official script: float32 files give a float32 box, center and scale (the
intrinsics multiply in float64, as `camera_data.pkl`'s arrays do, and each
result is rounded to float32), float64 files float64 ones. A frame is labelled only if its image exists (JPEG
tree) / the video has it; a video whose CPN detections are missing from the
npz is skipped and does not advance `video_id` (the official counter).
Reading the CDF files needs `cdflib` (pure Python, on PyPI).
"""
from __future__ import annotations

import os

import cv2
import numpy as np

from contextpose_jax import geometry
from data_prep import h36m_metadata
from data_prep import records
from data_prep import safe_pickle

# The 17 Human3.6M joints among the 32 of the mocap files.
JOINT_IDX = [0, 1, 2, 3, 6, 7, 8, 12, 16, 14, 15, 17, 18, 19, 25, 26, 27]
CPN_FILE = 'data_2d_h36m_cpn_ft_h36m_dbb.npz'


def has_raw_files(manual_dir) -> bool:
  return (os.path.isdir(os.path.join(manual_dir, 'extracted'))
          and _cpn_path(manual_dir) is not None)


def _cpn_path(manual_dir):
  for path in (os.path.join(manual_dir, CPN_FILE),
               os.path.join(manual_dir, 'data', CPN_FILE)):
    if os.path.exists(path):
      return path
  return None


def read_cdf_pose(path, width) -> np.ndarray:
  """The 'Pose' variable of a Human3.6M CDF file as (frames, 32, width)."""
  try:
    import cdflib  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise records.DataError('reading the Human3.6M CDF files needs cdflib '
                            '(pip install cdflib)') from None
  if not os.path.exists(path):
    raise records.DataError(f'missing pose file {path}')
  try:
    pose = np.asarray(cdflib.CDF(path).varget('Pose'))
    if pose.dtype != np.float32:
      pose = pose.astype(np.float64)
  except Exception as e:  # pylint: disable=broad-except
    raise records.DataError(f'{path}: cannot read the Pose variable '
                            f'({type(e).__name__}: {e})') from None
  if pose.size % (32 * width):
    raise records.DataError(f'{path}: Pose has {pose.size} values, not a '
                            f'multiple of 32x{width}')
  return pose.reshape(-1, 32, width)


def load_cameras(manual_dir):
  """{(subject, camera 1-based): (fx, fy, cx, cy)}."""
  path = os.path.join(manual_dir, 'camera_data.pkl')
  cameras = {}
  if os.path.exists(path):
    try:
      data = safe_pickle.load(path)
    except safe_pickle.UnsafePickleError as e:
      raise records.DataError(str(e)) from None
    except Exception as e:  # pylint: disable=broad-except
      raise records.DataError(f'{path}: not a readable pickle '
                              f'({type(e).__name__}: {e})') from None
    try:
      for (s, c), cam in data.items():
        f_, c_ = np.ravel(cam[2]), np.ravel(cam[3])
        cameras[(int(s), int(c))] = (f_[0], f_[1], c_[0], c_[1])
    except (AttributeError, TypeError, ValueError, IndexError) as e:
      raise records.DataError(
          f'{path}: want {{(subject, camera): (R, T, f, c, ...)}} as '
          f'H36M-Toolbox writes it ({type(e).__name__}: {e})') from None
  for s in h36m_metadata.SUBJECTS:
    for c in range(4):
      cameras.setdefault((s, c + 1), h36m_metadata.INTRINSICS[c])
  return cameras


def load_cpn(manual_dir):
  path = _cpn_path(manual_dir)
  if path is None:
    raise records.DataError(f'--manual_dir={manual_dir} has no {CPN_FILE}')
  return records.load_npz_dict(path, 'positions_2d', 'a VideoPose3D 2D-detection file')


def _frames_available(manual_dir, frame_source, s, a, sa, c, nposes):
  """(exists mask over 0..nposes-1, frame width, frame height)."""
  if frame_source == 'video':
    path = h36m_metadata.video_path(manual_dir, {'subject': s, 'action': a,
                                            'subaction': sa, 'camera': c - 1})
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
      return np.zeros(nposes, bool), 0, 0
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    w = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    h = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    capture.release()
    return np.arange(nposes) < count, w, h
  image_root = os.path.join(manual_dir, 'images')
  exists = np.zeros(nposes, bool)
  size = None
  for i in range(nposes):
    row = {'subject': s, 'action': a, 'subaction': sa, 'camera': c - 1,
           'frame': i + 1}
    path = h36m_metadata.frame_path(image_root, row)
    exists[i] = os.path.isfile(path)
    if exists[i] and size is None:
      frame = records.read_frame(path)
      size = frame.shape[1], frame.shape[0]
  w, h = size or (0, 0)
  return exists, w, h


def video_labels(pose3d_mm, pose2d_gt, cpn, camera, exists, w, h, meta):
  """Label rows of one video (see the module doc)."""
  del pose2d_gt  # GT 2D is not part of our records (kept: same lengths)
  # float64 scalars, as the official (1,)-shaped float64 camera arrays: with
  # float32 poses the products are taken in float64, then rounded to float32.
  fx, fy, cx, cy = (np.float64(v) for v in camera)
  s, a, sa, c, video_id = meta
  frames = np.flatnonzero(exists)
  rows = np.zeros(len(frames), h36m_metadata.LABEL_DTYPE)
  for k, i in enumerate(frames):
    joints_3d = pose3d_mm[i, JOINT_IDX]
    center, scale = geometry.box_to_center_scale(
        geometry.infer_box(joints_3d[0], fx, fy, cx, cy))
    trans = geometry.affine_matrix(center, scale)
    rows['keypoints_2d_crop'][k] = geometry.apply_affine(
        cpn[i].astype(np.float32), trans).astype(np.float32)
    rows['keypoints_2d'][k] = geometry.normalize_screen_coordinates(
        cpn[i][..., :2], w=w, h=h)
    rows['keypoints_3d'][k] = joints_3d / 1000.0
    rows['center'][k], rows['scale'][k] = center, scale
    rows['float32_box'][k] = np.asarray(center).dtype == np.float32
  rows['subject'], rows['action'], rows['subaction'] = s, a, sa
  rows['camera'], rows['frame'], rows['video_id'] = c - 1, frames + 1, video_id
  return rows


def generate(manual_dir, frame_source='jpeg', log=print):
  """{'train': table, 'validation': table} from the raw files."""
  cpn_all = load_cpn(manual_dir)
  cameras = load_cameras(manual_dir)
  tables = {'train': [], 'validation': []}
  video_id = 0
  for s, a, sa, c0 in h36m_metadata.videos():
    c = c0 + 1
    basename = h36m_metadata.base_filename(s, a, sa, c0)
    subject_dir = os.path.join(manual_dir, 'extracted', f'S{s}')
    path3d = os.path.join(subject_dir, 'Poses_D3_Positions_mono',
                          basename + '.cdf')
    path2d = os.path.join(subject_dir, 'Poses_D2_Positions', basename + '.cdf')
    if not os.path.exists(path3d) and not os.path.exists(path2d):
      continue  # not downloaded: a subset of Human3.6M is fine
    cpn_subject = cpn_all.get(f'S{s}', {})
    key = basename.split('.')[0]
    if key not in cpn_subject:
      # VideoPose3D names two actions differently for some subjects.
      key = key.replace('TakingPhoto', 'Photo').replace('WalkingDog',
                                                         'WalkDog')
      if key not in cpn_subject:
        log(f'[human36m] {basename}: no CPN detections, skipped')
        continue
    pose3d = read_cdf_pose(path3d, 3)
    pose2d = read_cdf_pose(path2d, 2)
    cpn = np.asarray(cpn_subject[key][c0])
    nposes = min(len(pose3d), len(pose2d))
    cpn = cpn[:nposes]
    if not len(pose3d) == len(pose2d) == len(cpn):
      raise records.DataError(
          f'{basename}: frame counts differ: 3D {len(pose3d)}, 2D '
          f'{len(pose2d)}, CPN {len(cpn)} (in {path3d})')
    if cpn.shape[1:] != (17, 2) or not np.all(np.isfinite(cpn)):
      raise records.DataError(f'{CPN_FILE}: S{s} {key} camera {c0} has shape '
                              f'{cpn.shape} or non-finite values')
    exists, w, h = _frames_available(manual_dir, frame_source, s, a, sa, c,
                                     nposes)
    rows = video_labels(pose3d, pose2d, cpn, cameras[(s, c)], exists, w, h,
                        (s, a, sa, c, video_id))
    if not np.all(np.isfinite(rows['keypoints_3d'])):
      raise records.DataError(f'{path3d}: NaN or inf joints')
    split = ('train' if s in h36m_metadata.TRAIN_SUBJECTS else 'validation')
    tables[split].append(rows)
    video_id += 1
  out = {}
  for split, parts in tables.items():
    if not parts:
      raise records.DataError(f'--manual_dir={manual_dir}: no labelled '
                              f'{split} frames found in extracted/')
    out[split] = np.concatenate(parts)
  log('[human36m] labels: ' + ', '.join(f'{k}={len(v)}'
                                        for k, v in out.items()))
  return out
