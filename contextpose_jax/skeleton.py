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
