"""Joint conventions and the official flip (augmentation and flip test).

The crop is 192x256 (W x H). A horizontal flip maps crop x to ``191 - x``
(``CROP_WIDTH - 1 - x``), normalized screen x to ``-x``, 3D x to ``-x`` and
swaps the left/right joints.
"""
from __future__ import annotations

import numpy as np

CROP_WIDTH = 192
CROP_HEIGHT = 256
NUM_JOINTS = 17

# (left, right) joint index lists, as the official code uses them.
FLIP_PAIRS = {
    "h36m": ([4, 5, 6, 11, 12, 13], [1, 2, 3, 14, 15, 16]),
    "3dhp": ([5, 6, 7, 11, 12, 13], [2, 3, 4, 8, 9, 10]),
}
ROOT_JOINT = {"h36m": 0, "3dhp": 14}

# Human3.6M 17-joint order of the official code (``union_joints``).
H36M_JOINT_NAMES = ("pelvis", "right_hip", "right_knee", "right_ankle", "left_hip",
                    "left_knee", "left_ankle", "spine", "thorax", "nose", "head",
                    "left_shoulder", "left_elbow", "left_wrist", "right_shoulder",
                    "right_elbow", "right_wrist")
COCO_JOINT_NAMES = ("nose", "left_eye", "right_eye", "left_ear", "right_ear",
                    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
                    "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                    "right_knee", "left_ankle", "right_ankle")

# COCO has no head top: it is extrapolated from the thorax through the
# mid-eye point by this fraction of the thorax-eyes distance (an adult's head
# top is ~12 cm above the eyes, which are ~20 cm above the shoulder line).
HEAD_TOP_EXTRAPOLATION = 0.5


def coco_to_h36m(coco):
  """COCO-17 keypoints (..., 17, D) -> Human3.6M-17 (..., 17, D).

  Direct: hips, knees, ankles, shoulders, elbows, wrists, and the nose (H36M
  joint 9). Derived: pelvis = mid-hips; thorax = mid-shoulders; spine =
  mid(pelvis, thorax); head (top) = mid-eyes + HEAD_TOP_EXTRAPOLATION *
  (mid-eyes - thorax). Works for any trailing D (a score column is mapped like
  a coordinate, so derived joints get the mean score).
  """
  c = np.asarray(coco, dtype=np.float64)
  if c.shape[-2] != 17:
    raise ValueError(f"coco_to_h36m: expected 17 COCO joints, got shape {c.shape}")
  pelvis = (c[..., 11, :] + c[..., 12, :]) / 2
  thorax = (c[..., 5, :] + c[..., 6, :]) / 2
  eyes = (c[..., 1, :] + c[..., 2, :]) / 2
  head = eyes + HEAD_TOP_EXTRAPOLATION * (eyes - thorax)
  joints = [pelvis, c[..., 12, :], c[..., 14, :], c[..., 16, :],
            c[..., 11, :], c[..., 13, :], c[..., 15, :],
            (pelvis + thorax) / 2, thorax, c[..., 0, :], head,
            c[..., 5, :], c[..., 7, :], c[..., 9, :],
            c[..., 6, :], c[..., 8, :], c[..., 10, :]]
  return np.stack(joints, axis=-2)


def flip_permutation(dataset: str) -> np.ndarray:
  """Index array that swaps left and right joints (an involution)."""
  left, right = FLIP_PAIRS[dataset]
  perm = np.arange(NUM_JOINTS)
  perm[left + right] = right + left
  return perm


def flip_keypoints_2d(kp, dataset: str):
  """Normalized screen keypoints (..., 17, 2): x -> -x, joints swapped."""
  kp = kp[..., flip_permutation(dataset), :]
  return kp * np.asarray([-1.0, 1.0], dtype=kp.dtype)


def flip_keypoints_crop(kp, dataset: str):
  """Crop-pixel keypoints (..., 17, 2): x -> 191 - x, joints swapped."""
  kp = kp[..., flip_permutation(dataset), :]
  return kp * np.asarray([-1.0, 1.0], dtype=kp.dtype) + np.asarray(
      [CROP_WIDTH - 1, 0.0], dtype=kp.dtype)


def flip_pose_3d(pose, dataset: str):
  """3D joints (..., 17, 3): x -> -x, joints swapped (its own inverse)."""
  pose = pose[..., flip_permutation(dataset), :]
  return pose * np.asarray([-1.0, 1.0, 1.0], dtype=pose.dtype)


def flip_images(images):
  """NHWC images mirrored horizontally."""
  return images[..., :, ::-1, :]
