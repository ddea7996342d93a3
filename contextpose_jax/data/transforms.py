"""Per-example and per-batch transforms of the input pipeline (NumPy only).

They reproduce the official loader (`ContextPose/mvn/datasets/utils.py`,
`data_prefetcher`; `ContextPose_mpi/common/utils.py`, `get_varialbe`):
RGB image -> backbone normalisation, root-relative 3D targets, the flip
augmentation and the flip-test pairs.
"""
from __future__ import annotations

import sys
import threading

import cv2
import numpy as np

from contextpose_jax import image_io
from contextpose_jax import skeleton
from contextpose_jax.models import BACKBONES
from contextpose_jax.models import HRNET_WIDTHS
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
_IMAGENET_STD = np.array([0.229, 0.224, 0.225])
_CPN_MEAN_RGB = np.array([122.7717, 115.9465, 102.9801])


def _affine(backbone: str) -> np.ndarray:
  """3x4 per-channel map with normalized = uint8 * scale + offset."""
  if backbone in HRNET_WIDTHS:
    # (x / 255 - mean) / std
    scale = 1.0 / (255.0 * _IMAGENET_STD)
    offset = -_IMAGENET_MEAN / _IMAGENET_STD
  elif backbone == 'cpn':
    # x / 255 - pixel_means / 255: no std for CPN.
    scale = np.full(3, 1.0 / 255.0)
    offset = -_CPN_MEAN_RGB / 255.0
  else:
    raise ValueError(f'backbone must be one of {BACKBONES}, got {backbone!r}')
  return np.concatenate([np.diag(scale), offset[:, None]], axis=1)


class BufferPool:
  """Recycles large output arrays once nobody else references them.

  Touching freshly allocated memory costs more than the normalisation itself
  (page faults; much more in VMs that hand freed memory back to the host).
  A pooled array is handed out again only when its reference count shows
  that the pool holds the last reference: batches (or views of them, or
  zero-copy device arrays) still in use are never overwritten.
  """

  def __init__(self, max_size: int = 8):
    self._arrays: list[np.ndarray] = []
    self._max_size = max_size
    self._lock = threading.Lock()

  def __getstate__(self):  # picklable for worker processes: start empty
    return {'max_size': self._max_size}

  def __setstate__(self, state):
    self.__init__(state['max_size'])

  def get(self, shape, dtype=np.float32) -> np.ndarray:
    with self._lock:
      for array in self._arrays:
        # Three references: the pool's list, `array` and getrefcount's
        # argument. Any more means the array (or a view of it) is in use.
        if (array.shape == tuple(shape) and array.dtype == dtype
            and sys.getrefcount(array) <= 3):
          return array
      array = np.empty(shape, dtype)
      if len(self._arrays) < self._max_size:
        self._arrays.append(array)
      return array


def normalize_images(images, backbone: str, flips=None,
                     pool: BufferPool | None = None,
                     bgr: bool = False) -> np.ndarray:
  """uint8 RGB images (a sequence or (N, H, W, 3)) -> float32 (N, H, W, 3).

  `flips` (N,) bool mirrors the chosen images horizontally on the way;
  `bgr` takes OpenCV's BGR images (the output is RGB either way). OpenCV
  does the per-channel affine map (~10x faster than NumPy broadcasting over a
  last axis of 3, which matters at 1500+ images/s on two cores).
  """
  matrix = _affine(backbone)
  if bgr:  # read the input channels in reverse order
    matrix = matrix[:, [2, 1, 0, 3]]
  n = len(images)
  if n == 0:
    raise ValueError('no images to normalize')
  h, w, c = np.shape(images[0])
  shape = (n, h, w, c)
  out = pool.get(shape) if pool is not None else np.empty(shape, np.float32)
  for i in range(n):
    image = images[i]
    if flips is not None and flips[i]:
      image = cv2.flip(image, 1)
    cv2.transform(np.asarray(image, np.float32), matrix, dst=out[i])
  return out


def normalize_image(uint8_rgb, backbone: str) -> np.ndarray:
  """uint8 RGB (..., H, W, 3) -> float32 normalised for `backbone`."""
  uint8_rgb = np.asarray(uint8_rgb)
  if uint8_rgb.ndim < 3 or uint8_rgb.shape[-1] != 3:
    raise ValueError(f'want (..., H, W, 3) RGB, got {uint8_rgb.shape}')
  flat = uint8_rgb.reshape((-1,) + uint8_rgb.shape[-3:])
  return normalize_images(flat, backbone).reshape(uint8_rgb.shape)


def decode_image(encoded: bytes, where: str = 'image',
                 bgr: bool = False) -> np.ndarray:
  """JPEG/PNG bytes -> uint8 RGB (H, W, 3) (BGR, one pass less, if `bgr`)."""
  return image_io.decode_image(encoded, where, bgr=bgr)


def root_relative(keypoints_3d, root: int) -> np.ndarray:
  """(..., 17, 3) with the root joint moved to the origin (and set to 0)."""
  keypoints_3d = np.asarray(keypoints_3d, dtype=np.float32)
  out = keypoints_3d - keypoints_3d[..., root:root + 1, :]
  out[..., root, :] = 0.0
  return out


def flip_batch(batch: dict, flip: np.ndarray, dataset: str) -> dict:
  """Flips the examples where `flip` (B,) is True, as the official loader.

  Image mirrored horizontally, normalised x -> -x, crop x -> 191 - x, 3D
  x -> -x, left and right joints swapped. Keys that are absent are skipped.
  """
  flip = np.asarray(flip, dtype=bool)
  if not flip.any():
    return batch
  out = dict(batch)
  ops = {'image': skeleton.flip_images,
         'keypoints_2d': lambda x: skeleton.flip_keypoints_2d(x, dataset),
         'keypoints_2d_crop': lambda x: skeleton.flip_keypoints_crop(x,
                                                                     dataset),
         'keypoints_3d': lambda x: skeleton.flip_pose_3d(x, dataset)}
  for key, op in ops.items():
    if key not in batch:
      continue
    value = batch[key]
    if flip.all():
      out[key] = np.ascontiguousarray(op(value))
    else:
      value = value.copy()
      value[flip] = op(value[flip])
      out[key] = value
  return out
