"""Lifting: each instance cropped with the official warp, lifted in batches.

Each example is built as the training data is (``contextpose_jax/geometry.py``):
the official (center, scale) affine warp to 192x256, ``keypoints_2d``
normalized by the full image size (``X / w * 2 - [1, h / w]``),
``keypoints_2d_crop`` through the same affine, and the crop normalized for
the checkpoint's backbone.
"""
from __future__ import annotations

import sys

import numpy as np

from contextpose_jax import geometry
from contextpose_jax import skeleton
from contextpose_jax.data import transforms
from contextpose_jax.predict import detections

# Suspect 2D keypoints (a warning and a per-row flag, never an error): more
# than half of the joints outside the crop, or the joints' extent (larger
# side, pixels) under COLLAPSE_BOX_FRACTION of the box side or under
# COLLAPSE_FRAME_FRACTION of the frame's shorter side.
COLLAPSE_BOX_FRACTION = 0.05
COLLAPSE_FRAME_FRACTION = 0.02
MAX_WARNINGS = 10  # per run; then one summary line


def make_example(image_rgb: np.ndarray, keypoints_px, box, backbone: str) -> dict:
  """One model input from a full RGB frame, its keypoints (pixels) and a box.

  Returns the crop (uint8 RGB and normalized float32), ``keypoints_2d``
  (normalized screen coordinates of the full frame), ``keypoints_2d_crop``
  (crop pixels, the official affine) and the (center, scale) used.
  """
  h, w = image_rgb.shape[:2]
  kp = np.asarray(keypoints_px, dtype=np.float64)
  center, scale = geometry.box_to_center_scale(box)
  matrix = geometry.affine_matrix(center, scale)
  crop = geometry.crop_image(image_rgb, center, scale)
  return {
      "crop": crop,
      "image": transforms.normalize_image(crop, backbone),
      "keypoints_2d": geometry.normalize_screen_coordinates(kp, w, h).astype(np.float32),
      "keypoints_2d_crop": geometry.apply_affine(kp, matrix).astype(np.float32),
      "center": np.asarray(center, np.float64),
      "scale": np.asarray(scale, np.float64),
  }


def suspect_reason(keypoints_px, keypoints_crop, box, width: int, height: int) -> str | None:
  """Why an instance's 2D keypoints look wrong (None if they do not)."""
  # Collapse first: a box made from collapsed keypoints also throws them out of the crop.
  kp = np.asarray(keypoints_px, np.float64)
  extent = float((kp.max(0) - kp.min(0)).max())
  side = float(box[2] - box[0])
  if extent < COLLAPSE_BOX_FRACTION * side or extent < COLLAPSE_FRAME_FRACTION * min(width, height):
    return f"the keypoints collapse to nearly one point ({extent:.1f} px across)"
  crop = np.asarray(keypoints_crop, np.float64)
  inside = ((crop >= 0) & (crop <= [skeleton.CROP_WIDTH - 1, skeleton.CROP_HEIGHT - 1])).all(-1)
  outside = int((~inside).sum())
  if outside > skeleton.NUM_JOINTS // 2:
    return (f"{outside} of {skeleton.NUM_JOINTS} keypoints fall outside the crop "
            "(does the box miss the person?)")
  return None


class Warnings:
  """At most ``MAX_WARNINGS`` ``warning:`` lines on stderr, then one count."""

  def __init__(self, stream=None):
    self.stream = stream or sys.stderr
    self.count = self.total = 0

  def suspect(self, label: str, why: str | None):
    self.total += 1
    if why is None:
      return
    self.count += 1
    if self.count <= MAX_WARNINGS:
      print(f"warning: {label}: {why}; its pose is flagged suspect_keypoints", file=self.stream)

  def close(self):
    if self.count > MAX_WARNINGS:
      print(f"warning: {self.count} of {self.total} poses have suspect 2D keypoints "
            "(suspect_keypoints in poses.npz)", file=self.stream)


class Lifter:
  """Crops rows (one person in one frame) and lifts them ``batch_size`` at a time.

  ``add(row, image)`` prepares a row's example (crop, normalized inputs);
  ``flush(final)`` runs full batches (every pending row when ``final``) and
  returns the lifted rows with ``keypoints_3d_raw`` (the model's output) and
  ``keypoints_3d`` (the root joint moved to the origin). ``pad``: every call
  gets a whole batch (one compiled shape).
  """

  def __init__(self, predictor, *, batch_size: int, flip_test: bool, pad: bool,
               keypoint_box_enlarge: float = geometry.KEYPOINT_BOX_ENLARGE):
    self.predictor, self.batch_size = predictor, batch_size
    self.flip_test, self.pad = flip_test, pad
    self.enlarge = keypoint_box_enlarge
    self.backbone = predictor.model_config.get("backbone", "hrnet_32")
    self.root = skeleton.ROOT_JOINT[predictor.model_config.get("dataset", "h36m")]
    self.pending = []

  def add(self, row: dict, image: np.ndarray, label: str) -> None:
    """``row``: ``keypoints`` (17, 2) frame pixels, ``lift_box`` (a box to
    crop, made square; None: the keypoints' extent, enlarged)."""
    h, w = image.shape[:2]
    box = detections.frame_box(row.get("lift_box"), label, w, h,
                               geometry.box_from_keypoints(row["keypoints"], self.enlarge),
                               "the keypoints' box", what=row.get("lift_box_what", "--bbox"))
    example = make_example(image, row["keypoints"], box, self.backbone)
    row.update(example)
    row["bbox"] = box
    row["image_size"] = np.array([w, h])
    row["reason"] = row.get("failed") or suspect_reason(
        row["keypoints"], example["keypoints_2d_crop"], box, w, h)
    row["suspect"] = row["reason"] is not None
    self.pending.append(row)

  def flush(self, final: bool = False) -> list[dict]:
    out = []
    while len(self.pending) >= self.batch_size or (final and self.pending):
      rows, self.pending = self.pending[:self.batch_size], self.pending[self.batch_size:]
      examples = rows + [rows[-1]] * (self.batch_size - len(rows) if self.pad else 0)
      stack = lambda key: np.stack([e[key] for e in examples])  # pylint: disable=cell-var-from-loop
      pose = self.predictor.predict(stack("image"), stack("keypoints_2d"),
                                    stack("keypoints_2d_crop"), flip_test=self.flip_test)
      raw = np.asarray(pose)[:len(rows), 0].astype(np.float32)
      for row, r in zip(rows, raw):
        del row["image"]
        row["keypoints_3d_raw"] = r
        row["keypoints_3d"] = r - r[self.root:self.root + 1]
      out += rows
    return out
