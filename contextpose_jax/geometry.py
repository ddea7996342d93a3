"""The official crop: a box from the 3D root, an affine warp to 192x256.

Ported from the behaviour of `H36M-Toolbox/transform.py` and
`ContextPose/mvn/utils/img.py` (the same code is used for MPI-INF-3DHP).
Quirks kept on purpose, because every published label and crop depends on them:
- the box is 2 m wide and 2 m tall around the root (1 m left/right, 0.9 m up,
  1.1 m down), projected with the pinhole intrinsics only (no distortion);
- the warp uses ONE scale, `(192 - 1) / (box_width - 1)`, for both axes (the
  box height is ignored), and maps the box centre to the crop centre
  `((192 - 1) / 2, (256 - 1) / 2)`;
- the three point pairs are built in float32 before `cv2.getAffineTransform`,
  so we build them the same way to get the same matrix bit for bit.
"""
from __future__ import annotations

import numpy as np

from contextpose_jax import skeleton

# (width, height), as OpenCV wants it.
CROP_SIZE = (skeleton.CROP_WIDTH, skeleton.CROP_HEIGHT)

# Official boxes are 2 m x 2 m around a ~1.7 m person (`infer_box`):
# a box from the keypoints' extent is enlarged by about that ratio.
KEYPOINT_BOX_ENLARGE = 1.25


def _pose_dtype(points) -> np.ndarray:
  """float32 points stay float32 (the official label scripts keep the pose
  file's dtype); anything else becomes float64."""
  points = np.asarray(points)
  return points if points.dtype == np.float32 else points.astype(np.float64)


def weak_project(points_3d, fx, fy, cx, cy):
  """Pinhole projection (no distortion) of (N, 3) camera-frame points.

  The official order of operations, in place in the points' dtype: float32
  points give float32 pixels, each product and sum rounded to float32 after
  numpy's promotion of the intrinsics as passed (a Python float multiplies in
  float32; a float64 value, like `camera_data.pkl`'s, in float64).
  """
  points_3d = _pose_dtype(points_3d)
  xy = points_3d[:, :2] / points_3d[:, 2:3]
  xy[:, 0] *= fx
  xy[:, 1] *= fy
  xy[:, 0] += cx
  xy[:, 1] += cy
  return xy


def infer_box(root_mm, fx, fy, cx, cy):
  """Box (x0, y0, x1, y1) in pixels around the root joint (millimetres), in
  the root's dtype (float32 or float64; see `weak_project`)."""
  root = _pose_dtype(root_mm).reshape(3)
  corners = np.stack([root + np.array([-1000.0, -900.0, 0.0], root.dtype),
                      root + np.array([1000.0, 1100.0, 0.0], root.dtype)])
  (x0, y0), (x1, y1) = weak_project(corners, fx, fy, cx, cy)
  return np.array([x0, y0, x1, y1])


def box_to_center_scale(box):
  """The official (center, scale): scale is the box size in units of 200 px,
  by the official expressions on the box's own scalars (float32 boxes give
  float32 values under numpy >= 2, as the official scripts do there)."""
  x0, y0, x1, y1 = box
  center = (0.5 * (x0 + x1), 0.5 * (y0 + y1))
  scale = ((x1 - x0) / 200.0, (y1 - y0) / 200.0)
  return center, scale


def _rotate_90(a, b):
  """Third point: b plus (a - b) turned by +90 degrees, in float32."""
  d = (a - b).astype(np.float32)
  return (b + np.array([-d[1], d[0]], dtype=np.float32)).astype(np.float32)


def affine_matrix(center, scale, output_size=CROP_SIZE, inverse=False):
  """2x3 matrix mapping frame pixels to crop pixels (or back if `inverse`)."""
  # Keep the caller's dtypes (float64 tuples in the H36M-Toolbox pickles,
  # float32 elsewhere): the official arithmetic follows them.
  center = np.asarray(center).reshape(2)
  box_w = (np.asarray(scale).reshape(2) * 200.0)[0]
  out_w, out_h = output_size
  src = np.zeros((3, 2), dtype=np.float32)
  dst = np.zeros((3, 2), dtype=np.float32)
  # Point 0: the box centre -> crop centre. Point 1: half a width "up" (in y,
  # both sides measured with the WIDTH). Point 2: the perpendicular.
  src[0] = center
  src[1] = center + np.array([0.0, (box_w - 1) * -0.5], dtype=np.float32)
  dst[0] = [(out_w - 1) * 0.5, (out_h - 1) * 0.5]
  dst[1] = dst[0].astype(np.float64) + np.array(
      [0.0, (out_w - 1) * -0.5], dtype=np.float32)
  src[2] = _rotate_90(src[0], src[1])
  dst[2] = _rotate_90(dst[0], dst[1])
  import cv2  # here, not at the top: `capf-predict --help` starts without OpenCV
  if inverse:
    return cv2.getAffineTransform(dst, src)
  return cv2.getAffineTransform(src, dst)


def apply_affine(points, matrix):
  """(N, 2) points through a 2x3 matrix, in float64 like the official code."""
  points = np.asarray(points, dtype=np.float64)
  return points @ matrix[:, :2].T + matrix[:, 2]


def crop_image(frame, center, scale, output_size=CROP_SIZE):
  """The official crop: bilinear `cv2.warpAffine`, constant 0 border."""
  import cv2
  matrix = affine_matrix(center, scale, output_size)
  return cv2.warpAffine(frame, matrix, tuple(output_size),
                        flags=cv2.INTER_LINEAR)


def normalize_screen_coordinates(points, w, h):
  """Pixels -> [-1, 1] along x with the aspect ratio kept: `X/w*2 - [1, h/w]`."""
  points = np.asarray(points)
  return points / w * 2 - np.asarray([1, h / w])


def box_from_keypoints(kp, enlarge: float = KEYPOINT_BOX_ENLARGE) -> np.ndarray:
  """A square box about the keypoints' extent, enlarged like the official boxes."""
  kp = np.asarray(kp, dtype=np.float64)
  lo, hi = kp.min(axis=0), kp.max(axis=0)
  center = (lo + hi) / 2
  half = max(float((hi - lo).max()), 1.0) * enlarge / 2
  return np.array([center[0] - half, center[1] - half, center[0] + half, center[1] + half])


def square_box(box) -> np.ndarray:
  """The box made square about its centre, side max(width, height).

  The official warp scales BOTH axes by the box WIDTH (its boxes are square,
  2 m x 2 m): a tall detector box used as it is would cut the person off.
  A box at least as wide as tall keeps its centre and width, the only things
  the warp reads, so an official box gives the official crop.
  """
  x0, y0, x1, y1 = (float(v) for v in box)
  side = max(x1 - x0, y1 - y0)
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  if x1 - x0 >= y1 - y0:
    return np.array([x0, cy - side / 2, x1, cy + side / 2])
  return np.array([cx - side / 2, y0, cx + side / 2, y1])
