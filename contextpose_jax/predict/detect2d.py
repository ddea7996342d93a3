"""2D keypoints from a COCO backbone, for every instance whose 2D is not given.

Each instance's square box is cropped with the official warp, normalized for
the detector's backbone and handed to ``detector.detect_2d`` (keypoints in
crop pixels, COCO order; scores) ``batch_size`` crops at a time; the
keypoints go back to the frame through the inverse affine and are mapped to
Human3.6M (a derived joint's score is the mean of its sources').
"""
from __future__ import annotations

import numpy as np

from contextpose_jax import geometry
from contextpose_jax import skeleton
from contextpose_jax.data import transforms
from contextpose_jax.predict.errors import InputError


def detector_backbone(detector) -> str:
  config = getattr(detector, "model_config", None) or {}
  return config.get("backbone", "hrnet_32")


class Detector2D:
  """Batches crops for ``detector.detect_2d``; fills each instance's 2D.

  ``add`` queues instances across frames and ``flush`` detects whole batches
  only, so that several people per frame never make a padded partial batch
  per frame group; ``done`` counts the instances detected so far, in the
  order they were queued.
  """

  def __init__(self, detector, *, batch_size: int, pad: bool, path: str = "--detector"):
    self.detector, self.batch_size, self.pad, self.path = detector, batch_size, pad, path
    self.backbone = detector_backbone(detector)
    self.queue, self.queued, self.done = [], 0, 0

  def add(self, instance, image) -> int:
    """Queues one instance; returns its number (1-based) in queue order."""
    self.queue.append((instance, image))
    self.queued += 1
    return self.queued

  def flush(self, final: bool = False) -> None:
    """Detects every whole batch queued (and the rest when ``final``)."""
    while len(self.queue) >= self.batch_size or (final and self.queue):
      chunk, self.queue = self.queue[:self.batch_size], self.queue[self.batch_size:]
      self.detect(chunk)
      self.done += len(chunk)

  def detect(self, items) -> None:
    """``items``: (instance, image) pairs; each instance's ``detection_box`` is
    the square box to crop. Fills ``coco``, ``coco_scores``, ``keypoints``,
    ``scores`` in place, ``batch_size`` crops per call."""
    for start in range(0, len(items), self.batch_size):
      chunk = items[start:start + self.batch_size]
      crops, inverses = [], []
      for instance, image in chunk:
        center, scale = geometry.box_to_center_scale(instance.detection_box)
        crops.append(geometry.crop_image(image, center, scale))
        inverses.append(geometry.affine_matrix(center, scale, inverse=True))
      n = len(crops)
      images = transforms.normalize_image(np.stack(crops), self.backbone)
      if self.pad and n < self.batch_size:  # one compiled shape
        images = np.concatenate([images, np.repeat(images[-1:], self.batch_size - n, 0)])
      try:
        keypoints, scores = self.detector.detect_2d(images)
      except ValueError as e:  # e.g. a backbone converted without its heatmap head
        raise InputError(f"{self.path}: {str(e).splitlines()[0]}") from e
      keypoints = np.asarray(keypoints, np.float64)[:n]
      scores = np.asarray(scores, np.float64)[:n]
      for (instance, _), kp, sc, inverse in zip(chunk, keypoints, scores, inverses):
        coco = geometry.apply_affine(kp, inverse)
        mapped = skeleton.coco_to_h36m(np.concatenate([coco, sc[:, None]], -1))
        instance.coco, instance.coco_scores = coco, sc
        instance.keypoints, instance.scores = mapped[:, :2], mapped[:, 2]
