"""Heatmaps -> 2D keypoints, as the official HRNet test code decodes them.

Behaviour of ``get_max_preds`` + ``get_final_preds`` (TEST.POST_PROCESS on) of
the HRNet reference code (``lib/core/inference.py``), used for both backbones
(no DARK / Taylor refinement, no Gaussian blur):

1. arg-max over each joint's heatmap; ties go to the FIRST maximum in
   row-major order (y, then x); the score is the heatmap maximum;
2. a joint whose maximum is ``<= 0`` gets heatmap coordinate (0, 0) (the
   official mask), its score stays the (non-positive) maximum;
3. quarter-pixel shift toward the higher neighbour: ``+0.25 * sign(hm[y, x+1]
   - hm[y, x-1])`` in x and likewise in y (``sign(0) = 0``: equal neighbours,
   no shift), applied only when ``1 < x < W - 1 and 1 < y < H - 1``. Note the
   strict ``1 <``: a peak in column/row 1 is not shifted although both its
   neighbours exist (an official quirk, kept);
4. heatmap -> crop pixels: ``x4``. The official ``transform_preds`` maps a
   heatmap point ``p`` to ``center + (p - [W/2, H/2]) * (200 * scale_w / W)``
   (``get_affine_transform`` with output size = heatmap size, the box WIDTH
   for both axes). For the 192x256 crop the same (center, scale) maps to crop
   pixel ``96 + (frame - cx) * 192 / (200 * scale_w)`` (and 128 + ... in y), so
   the composition is exactly ``crop = 4 * p`` for a 64x48 heatmap (no
   half-pixel term; the stride-4 stem centres heatmap pixel k on input pixel
   4k);
5. crop pixels -> frame pixels (only when a ``(center, scale)`` is given):
   the inverse of THIS project's crop warp (``geometry.affine_matrix``, the
   H36M-Toolbox one: crop centre ``(191/2, 255/2)``, scale
   ``191 / (200 * scale_w - 1)``), because that warp made the crop. HRNet's
   own ``transform_preds`` would use centre ``(96, 128)`` and ``192 / (200 *
   scale_w)``; the two differ by about half a crop pixel.

CPN's own test script decodes differently (Gaussian blur, shift toward the
second maximum, ``4 * x + 2``); it is not reproduced here.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from contextpose_jax import geometry

# Heatmap pixel -> crop pixel (64x48 heatmaps of a 256x192 crop).
HEATMAP_STRIDE = 4
QUARTER = 0.25


def decode_heatmaps(heatmaps):
  """NHWC heatmaps (B, H, W, J) -> (coords (B, J, 2) in heatmap pixels, x then y;
  scores (B, J)). Pure jnp, jittable; coords in the heatmaps' float dtype."""
  heatmaps = jnp.asarray(heatmaps)
  b, h, w, j = heatmaps.shape
  dtype = jnp.promote_types(heatmaps.dtype, jnp.float32)
  flat = jnp.moveaxis(heatmaps, -1, 1).reshape(b, j, h * w)
  index = jnp.argmax(flat, axis=-1)  # the first maximum, as np.argmax
  scores = jnp.max(flat, axis=-1)
  positive = scores > 0
  x = jnp.where(positive, index % w, 0)
  y = jnp.where(positive, index // w, 0)

  def value_at(yy, xx):
    # Clipped gathers; the results are only used where the peak is interior.
    yy, xx = jnp.clip(yy, 0, h - 1), jnp.clip(xx, 0, w - 1)
    return jnp.take_along_axis(flat, (yy * w + xx)[..., None], axis=-1)[..., 0]

  interior = (x > 1) & (x < w - 1) & (y > 1) & (y < h - 1)
  dx = jnp.sign(value_at(y, x + 1) - value_at(y, x - 1))
  dy = jnp.sign(value_at(y + 1, x) - value_at(y - 1, x))
  shift = jnp.where(interior[..., None], QUARTER * jnp.stack([dx, dy], -1), 0)
  coords = jnp.stack([x, y], -1).astype(dtype) + shift.astype(dtype)
  return coords, scores


def heatmap_to_crop(coords):
  """Heatmap pixels -> crop pixels (x4, see the module docstring)."""
  return coords * HEATMAP_STRIDE


def crop_to_frame(crop_points, center, scale):
  """Crop pixels (..., J, 2) -> frame pixels through the inverse crop warp of
  ``geometry.affine_matrix`` (one (center, scale) for all, or one per batch row)."""
  crop_points = np.asarray(crop_points, np.float64)
  center = np.asarray(center, np.float64)
  scale = np.asarray(scale, np.float64)
  if center.ndim == 1:
    matrix = geometry.affine_matrix(center, scale, inverse=True)
    return geometry.apply_affine(crop_points.reshape(-1, 2), matrix).reshape(crop_points.shape)
  if crop_points.ndim != 3 or center.shape != (crop_points.shape[0], 2) or \
     scale.shape != center.shape:
    raise ValueError(f"center/scale: expected (2,) or ({crop_points.shape[0]}, 2), got "
                     f"{center.shape} and {scale.shape}")
  return np.stack([geometry.apply_affine(p, geometry.affine_matrix(c, s, inverse=True))
                   for p, c, s in zip(crop_points, center, scale)])


def keypoints_from_heatmaps(heatmaps, center=None, scale=None):
  """NHWC heatmaps -> (keypoints (B, J, 2), scores (B, J)) as numpy arrays.

  Keypoints are in crop pixels, or in frame pixels when the crop's
  ``(center, scale)`` (``geometry.box_to_center_scale``) is given.
  """
  if (center is None) != (scale is None):
    raise ValueError("give both center and scale, or neither")
  heatmaps = np.asarray(heatmaps)
  if heatmaps.ndim != 4:
    raise ValueError(f"heatmaps: expected (B, H, W, J), got {heatmaps.shape}")
  coords, scores = decode_heatmaps(heatmaps)
  keypoints = np.asarray(heatmap_to_crop(coords))
  if center is not None:
    keypoints = crop_to_frame(keypoints, center, scale)
  return keypoints, np.asarray(scores)
