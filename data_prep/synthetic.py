"""`synthetic_human36m`: a download-free set in the Human3.6M record schema.

Every frame is a 17-joint Human3.6M skeleton (realistic bone lengths per
subject, random plausible joint angles that move smoothly within a video,
random global rotation) placed 3.5-7 m in front of one of the four Human3.6M
cameras (published intrinsics). Crops are made with the official geometry
(box from the 3D root, the official affine) and rendered directly in crop
space, so `keypoints_2d_crop` and the pixels agree exactly:
- a textured background, rendered in frame coordinates and warped like the
  real frames (so it moves consistently with the crop);
- limbs drawn far-to-near (nearer limbs occlude farther ones), with a width
  that follows perspective and a shade that brightens with nearness: depth is
  visible, but only through cues the model has to learn;
- left limbs bluish, right limbs reddish, torso and head greenish-grey;
- `keypoints_2d` are the projections plus detector-like noise (a few pixels,
  occasional outliers), like the CPN detections of the real set.
Subjects 1, 5, 6, 7, 8 make `train`, 9 and 11 `validation`.
"""
from __future__ import annotations

import functools
import zlib

import cv2
import numpy as np

from configs import synthetic as synthetic_config
from contextpose_jax import geometry
from data_prep import h36m_metadata
from data_prep import records

NAME = synthetic_config.SYNTHETIC_NAME
# The default size and seed: the quick start's (configs/synthetic.py).
OPTIONS = synthetic_config.SYNTHETIC_OPTIONS
TRAIN_SUBJECTS = h36m_metadata.TRAIN_SUBJECTS
VALIDATION_SUBJECTS = h36m_metadata.VALIDATION_SUBJECTS
ACTIONS = h36m_metadata.ACTIONS
SUBACTIONS = h36m_metadata.SUBACTIONS

# Published Human3.6M intrinsics (fx, fy, cx, cy) and frame size (w, h) of the
# four cameras, index = the official 0-based `camera_id`.
CAMERAS = tuple(zip(h36m_metadata.INTRINSICS, h36m_metadata.FRAME_SIZES))

# Human3.6M 17-joint order: 0 pelvis, 1-3 right hip/knee/ankle, 4-6 left
# hip/knee/ankle, 7 spine, 8 thorax, 9 nose, 10 head, 11-13 left
# shoulder/elbow/wrist, 14-16 right shoulder/elbow/wrist.
PARENTS = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 9, 8, 11, 12, 8, 14, 15)
# Rest offsets from the parent in a body frame (mm; x = subject's left, y up,
# z = facing direction); lengths close to the Human3.6M subjects' averages.
REST = np.array([
    [0, 0, 0], [-132, 0, 0], [0, -442, 0], [0, -454, 0],
    [132, 0, 0], [0, -442, 0], [0, -454, 0],
    [0, 233, 0], [0, 257, 0], [0, 100, 68], [0, 110, -30],
    [151, -10, 0], [0, -278, 0], [0, -251, 0],
    [-151, -10, 0], [0, -278, 0], [0, -251, 0]], dtype=np.float64)
SIDE = np.array([0, 2, 2, 2, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
# Limb radius in mm for the bone ending at each joint.
RADIUS = np.array([0, 70, 62, 50, 70, 62, 50, 95, 95, 55, 75, 60, 42, 36,
                   60, 42, 36], dtype=np.float64)
COLORS_BGR = np.array([[120, 170, 110], [215, 120, 50], [55, 70, 215]],
                      dtype=np.float64)  # centre, left, right

# Joint angle model: (joint, axis, low, high) in degrees; each joint rotates
# its child bone. Flexion is about x, abduction about z, twist about y.
DOFS = (
    (1, 'x', -70, 25), (1, 'z', -25, 10), (2, 'x', 0, 110),
    (4, 'x', -70, 25), (4, 'z', -10, 25), (5, 'x', 0, 110),
    (0, 'x', -10, 35), (7, 'x', -10, 20), (7, 'z', -12, 12), (7, 'y', -30, 30),
    (8, 'x', -20, 30), (8, 'y', -40, 40),
    (11, 'x', -110, 60), (11, 'z', 5, 100), (12, 'x', -140, 0),
    (14, 'x', -110, 60), (14, 'z', -100, -5), (15, 'x', -140, 0),
)


def _rot(axis, degrees):
  a = np.deg2rad(degrees)
  c, s = np.cos(a), np.sin(a)
  if axis == 'x':
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
  if axis == 'y':
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
  return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def forward_kinematics(angles, bone_scale):
  """Joint positions (17, 3) in the body frame for one set of DOF angles."""
  local = [np.eye(3) for _ in range(17)]
  for (joint, axis, _, _), angle in zip(DOFS, angles):
    local[joint] = local[joint] @ _rot(axis, angle)
  glob = [None] * 17
  pos = np.zeros((17, 3))
  for j in range(17):
    p = PARENTS[j]
    if p < 0:
      glob[j] = local[j]
      continue
    # The bone from parent p to j turns with p's accumulated rotation; the
    # pelvis' own rotation (trunk lean) only moves the spine, not the hips.
    parent_rot = glob[p] if not (p == 0 and j in (1, 4)) else np.eye(3)
    pos[j] = pos[p] + parent_rot @ (REST[j] * bone_scale)
    glob[j] = parent_rot @ local[j]
  return pos


def _video_rng(seed, split, video):
  return np.random.default_rng([seed, zlib.crc32(split.encode()), video])


def video_poses(seed, split, video, subject, camera, num_frames):
  """3D poses (F, 17, 3) in mm, camera frame, for one synthetic video."""
  rng = _video_rng(seed, split, video)
  subject_rng = np.random.default_rng([seed, subject])
  bone_scale = subject_rng.uniform(0.9, 1.1)
  lo = np.array([d[2] for d in DOFS], dtype=np.float64)
  hi = np.array([d[3] for d in DOFS], dtype=np.float64)
  base = rng.uniform(lo, hi)
  amp = rng.uniform(0.05, 0.35, size=len(DOFS)) * (hi - lo)
  freq = rng.uniform(0.3, 1.5, size=len(DOFS)) / 50.0  # cycles per frame
  phase = rng.uniform(0, 2 * np.pi, size=len(DOFS))
  yaw0, yaw_rate = rng.uniform(0, 360), rng.uniform(-1.5, 1.5)
  tilt = rng.uniform(-8, 8, size=2)
  depth0 = rng.uniform(3800, 6700)
  fx, fy, cx, cy = CAMERAS[camera][0]
  w, h = CAMERAS[camera][1]
  # Root placed so that the body stays in the frame at that depth.
  root_x = rng.uniform(-0.28, 0.28) * depth0 * w / (2 * fx)
  root_y = rng.uniform(-0.05, 0.3) * depth0 * h / (2 * fy)
  drift = rng.normal(0, 4, size=3)
  # Body frame (y up, z facing) -> camera frame (y down): 180 deg about x.
  to_camera = np.diag([1.0, -1.0, -1.0])
  poses = np.zeros((num_frames, 17, 3))
  for t in range(num_frames):
    angles = np.clip(base + amp * np.sin(2 * np.pi * freq * t + phase), lo, hi)
    body = forward_kinematics(angles, bone_scale)
    rotation = (to_camera @ _rot('y', yaw0 + yaw_rate * t)
                @ _rot('x', tilt[0]) @ _rot('z', tilt[1]))
    root = np.array([root_x, root_y, depth0]) + drift * t
    root[2] = np.clip(root[2], 3500, 7000)
    poses[t] = body @ rotation.T + root
  return poses


def _background(rng, w, h):
  """A textured background at a quarter of the frame resolution (BGR)."""
  lw, lh = w // 4, h // 4
  coarse = rng.uniform(40, 220, size=(4, 4, 3)).astype(np.float32)
  img = cv2.resize(coarse, (lw, lh), interpolation=cv2.INTER_CUBIC)
  yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
  angle = rng.uniform(0, np.pi)
  period = rng.uniform(4, 20)
  stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi
                   / period)
  img += (rng.uniform(10, 35) * stripes)[..., None]
  floor = yy > lh * rng.uniform(0.55, 0.75)  # a floor with a checkerboard
  checker = ((xx // 10 + yy // 10) % 2).astype(np.float32) * 40 - 20
  img[floor] = img[floor] * 0.7 + checker[floor][:, None]
  img += rng.normal(0, 6, size=img.shape).astype(np.float32)
  return np.clip(img, 0, 255).astype(np.uint8)


def render_crop(background, pose_mm, camera, matrix, rng):
  """Renders the 192x256 crop (BGR) of one frame."""
  fx, fy, cx, cy = CAMERAS[camera][0]
  # Background warped from quarter resolution with the frame->crop affine.
  low = matrix.copy()
  low[:, :2] *= 4.0
  img = cv2.warpAffine(background, low, geometry.CROP_SIZE,
                       flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REFLECT).astype(np.float32)
  pix = geometry.weak_project(pose_mm, fx, fy, cx, cy)
  crop_pts = geometry.apply_affine(pix, matrix)
  px_per_mm = matrix[0, 0] * fx / pose_mm[:, 2]  # crop px per mm at each joint
  root_depth = pose_mm[0, 2]
  bones = [j for j in range(17) if PARENTS[j] >= 0]
  # Painter's algorithm: far bones first, near ones drawn over them.
  bones.sort(key=lambda j: -(pose_mm[j, 2] + pose_mm[PARENTS[j], 2]))
  shift = 4  # sub-pixel precision for cv2 drawing
  for j in bones:
    p = PARENTS[j]
    depth = 0.5 * (pose_mm[j, 2] + pose_mm[p, 2])
    shade = np.clip(1.0 - (depth - root_depth) / 900.0, 0.35, 1.5)
    color = np.clip(COLORS_BGR[SIDE[j]] * shade, 0, 255)
    color = tuple(float(c) for c in color + rng.normal(0, 4, size=3))
    width = max(1, int(round(2 * RADIUS[j] * 0.5 * (px_per_mm[j] +
                                                    px_per_mm[p]))))
    a = tuple(int(v) for v in np.round(crop_pts[p] * (1 << shift)))
    b = tuple(int(v) for v in np.round(crop_pts[j] * (1 << shift)))
    cv2.line(img, a, b, color, width, cv2.LINE_AA, shift)
    if j == 10:  # the head: a disc around the head joint
      radius = int(round(RADIUS[10] * px_per_mm[10] * (1 << shift)))
      cv2.circle(img, b, radius, color, -1, cv2.LINE_AA, shift)
  return np.clip(img, 0, 255).astype(np.uint8)


def detections(pixels, rng, noise_px=2.5, outlier_prob=0.03, outlier_px=30.0):
  """Detector-like 2D: the projection plus noise and rare large outliers."""
  noisy = pixels + rng.normal(0, noise_px, size=pixels.shape)
  outliers = rng.random(pixels.shape[0]) < outlier_prob
  noisy[outliers] += rng.normal(0, outlier_px, size=(outliers.sum(), 2))
  return noisy


def _video_table(split, num_examples, frames_per_video, seed):
  """Rows (video, frame, subject, action, subaction, camera) for a split."""
  subjects = TRAIN_SUBJECTS if split == 'train' else VALIDATION_SUBJECTS
  combos = [(s, a, sa, c) for s in subjects for a in ACTIONS
            for sa in SUBACTIONS for c in range(4)]
  order = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(
      len(combos))
  num_videos = -(-num_examples // frames_per_video)
  if num_videos > len(combos):
    raise records.DataError(
        f'{split}: {num_examples} examples need {num_videos} videos of '
        f'{frames_per_video} frames, but only {len(combos)} (subject, action, '
        'subaction, camera) combinations exist; raise --frames_per_video')
  chosen = sorted(order[:num_videos])  # videos in the official nesting order
  rows = []
  for v, k in enumerate(chosen):
    n = min(frames_per_video, num_examples - v * frames_per_video)
    for f in range(n):
      rows.append((v, f, *combos[k]))
  return np.asarray(rows, dtype=np.int64)


def make_examples(options, task):
  """Examples of one shard (runs in a worker process)."""
  seed = options['seed']
  fpv = options['frames_per_video']
  video_id_offset = options['video_id_offset'][task.split]
  cache = {}
  for video, frame, subject, action, subaction, camera in task.items:
    video, camera = int(video), int(camera)
    if video not in cache:
      cache.clear()
      rng = _video_rng(seed, task.split, video)
      w, h = CAMERAS[camera][1]
      cache[video] = (video_poses(seed, task.split, video, subject, camera,
                                  fpv), _background(rng, w, h))
    poses, background = cache[video]
    pose = poses[frame]
    rng = np.random.default_rng([seed, zlib.crc32(task.split.encode()), video,
                                 frame, 1])
    fx, fy, cx, cy = CAMERAS[camera][0]
    w, h = CAMERAS[camera][1]
    center, scale = geometry.box_to_center_scale(
        geometry.infer_box(pose[0], fx, fy, cx, cy))
    matrix = geometry.affine_matrix(center, scale)
    image = render_crop(background, pose, camera, matrix, rng)
    det = detections(geometry.weak_project(pose, fx, fy, cx, cy), rng)
    yield {
        'image': records.encode_crop(image, options['image_format'],
                                     options['jpeg_quality']),
        'keypoints_2d': geometry.normalize_screen_coordinates(
            det, w, h).astype(np.float32),
        'keypoints_2d_crop': geometry.apply_affine(det, matrix).astype(
            np.float32),
        'keypoints_3d': (pose / 1000.0).astype(np.float32),
        'subject': int(subject), 'action': int(action),
        'subaction': int(subaction), 'camera': camera,
        'frame': int(frame) + 1,  # 1-based, like the official image_id
        'video_id': video_id_offset + video,
    }


def build(data_dir, *, num_train=OPTIONS['num_train'],
          num_validation=OPTIONS['num_validation'],
          frames_per_video=OPTIONS['frames_per_video'], image_format='jpeg',
          jpeg_quality=95, seed=OPTIONS['seed'], examples_per_shard=512,
          num_workers=1, overwrite=False, log=print):
  """Builds `synthetic_human36m` into DATA_DIR (~3 CPU-ms per example)."""
  tables = {'train': _video_table('train', num_train, frames_per_video, seed),
            'validation': _video_table('validation', num_validation,
                                       frames_per_video, seed)}
  num_train_videos = int(tables['train'][-1, 0]) + 1 if num_train else 0
  options = dict(seed=seed, frames_per_video=frames_per_video,
                 image_format=image_format, jpeg_quality=jpeg_quality,
                 num_train=num_train, num_validation=num_validation,
                 video_id_offset={'train': 0, 'validation': num_train_videos})
  shards = []
  for split, table in tables.items():
    shards += records.split_into_shards(split, table, examples_per_shard)
  return records.build(
      name=NAME, data_dir=data_dir,
      feature_spec=records.features(image_format), shards=shards,
      make_examples=functools.partial(make_examples, options),
      options=dict(options, examples_per_shard=examples_per_shard),
      description=__doc__, num_workers=num_workers, overwrite=overwrite,
      log=log)
