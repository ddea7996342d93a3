"""Stable Python entry point: load a converted checkpoint, get features and 3D poses.

```python
from contextpose_jax.api import Predictor
p = Predictor.load(DIR)            # converter output, training workdir or step checkpoint
feats = p.features(images)         # list of 4 NHWC np.ndarrays
pose = p.predict(images, keypoints_2d, keypoints_2d_crop)   # (B, 1, 17, 3)

coco = Predictor.load(COCO_DIR)    # converted from a COCO backbone file (keeps its head)
hm = coco.heatmaps(images)         # (B, 64, 48, 17) raw heatmaps, NHWC
kp, scores = coco.detect_2d(images)   # (B, 17, 2) crop pixels, COCO order; (B, 17)
```
``images`` are float32 (B, 256, 192, 3), already normalized for the backbone
(``contextpose_jax.data.transforms.normalize_image``); ``keypoints_2d`` are in
normalized screen coordinates and ``keypoints_2d_crop`` in crop pixels, as the
official forward takes them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from contextpose_jax import checkpoints
from contextpose_jax import compiler_options
from contextpose_jax import skeleton
from contextpose_jax.models import capf
from contextpose_jax.models import folding
from contextpose_jax.models import heatmaps as heatmap_decoding


@dataclasses.dataclass
class Predictor:
  """A CA-PF model (or a bare backbone) with its variables, ready to run.

  ``variables`` are the model's own (official layout). With
  ``fold_batch_norm`` (the default) the frozen backbone's BatchNorms are
  folded into its convs once, at first use: the same numbers up to float
  rounding, faster (docs/benchmarks.md).
  """
  model: capf.CAPF
  variables: Any
  model_config: Any
  fold_batch_norm: bool = True

  @classmethod
  def load(cls, directory: str, *, fold_batch_norm: bool = True) -> "Predictor":
    """From a converter output, a training workdir (its best checkpoint, else
    its latest) or one of its step checkpoints: ``checkpoints.load_model``."""
    variables, model_config = checkpoints.load_model(directory)
    return cls(capf.build_model(model_config), variables, model_config, fold_batch_norm)

  @functools.cached_property
  def fold_pairs(self) -> tuple:
    """The (conv, BatchNorm) pairs folded at load time (empty: none)."""
    if not self.fold_batch_norm or "backbone" not in self.variables["params"]:
      return ()
    return capf.backbone_batch_norm_pairs(self.model, self.variables)

  @functools.cached_property
  def run_variables(self):
    """The variables the compiled functions run: ``variables``, folded."""
    if not self.fold_pairs:
      return self.variables
    return folding.fold_batch_norm(self.variables, self.fold_pairs)

  @functools.cached_property
  def _device_variables(self):
    # Placed once (folded ones already are): numpy variables would be copied
    # to the device (and re-laid out) on every call -- ~800 arrays for HRNet.
    return jax.device_put(self.run_variables)

  def _apply(self, variables, *args, **kwargs):
    return folding.apply_folded(self.model, variables, *args, pairs=self.fold_pairs, **kwargs)

  @property
  def has_lifter(self) -> bool:
    return "lifter" in self.variables["params"]

  @property
  def dataset(self) -> str:
    return self.model_config.get("dataset", "h36m")

  @functools.cached_property
  def _features_fn(self):
    return compiler_options.jit(lambda v, x: self._apply(v, x, method=capf.CAPF.features))

  @functools.cached_property
  def _predict_fn(self):
    return compiler_options.jit(lambda v, x, k, c: self._apply(v, x, k, c))

  @property
  def has_heatmap_head(self) -> bool:
    """True for a directory converted from a COCO backbone file."""
    return self.model.has_heatmap_head

  @functools.cached_property
  def _detect_fn(self):
    def detect(v, x):
      heat = self._apply(v, x, method=capf.CAPF.heatmaps)
      coords, scores = heatmap_decoding.decode_heatmaps(heat)
      return heat, heatmap_decoding.heatmap_to_crop(coords), scores
    return compiler_options.jit(detect)

  def _backbone_variables(self):
    return {k: {"backbone": v["backbone"]} for k, v in self._device_variables.items()
            if "backbone" in v}

  def _run_detector(self, images):
    if not self.has_heatmap_head:
      raise ValueError(capf.HEATMAP_HEAD_MISSING)
    images = np.asarray(images, np.float32)
    _check_images(images)
    return self._detect_fn(self._backbone_variables(), images)

  def heatmaps(self, images) -> np.ndarray:
    """Raw COCO heatmaps (B, 64, 48, 17), NHWC, from the backbone's head.

    ``images`` as for ``features``. Only for a directory converted from a COCO
    backbone file (any other model: ValueError).
    """
    return np.asarray(self._run_detector(images)[0])

  def detect_2d(self, images, *, center=None, scale=None
                ) -> tuple[np.ndarray, np.ndarray]:
    """2D keypoints from the heatmaps, decoded as the official HRNet test code.

    Returns ``(keypoints (B, 17, 2), scores (B, 17))``: keypoints in CROP
    pixels (x right, y down, 192x256 crop), COCO joint order; scores are the
    heatmap maxima. With the crop's ``center`` and ``scale`` (as
    ``geometry.box_to_center_scale`` gives them; (2,) or (B, 2)) keypoints are
    mapped back to frame pixels. See ``contextpose_jax.models.heatmaps``.
    """
    if (center is None) != (scale is None):
      raise ValueError("detect_2d: give both center and scale, or neither")
    _, keypoints, scores = self._run_detector(images)
    keypoints = np.asarray(keypoints)
    if center is not None:
      keypoints = heatmap_decoding.crop_to_frame(keypoints, center, scale)
    return keypoints, np.asarray(scores)

  def features(self, images) -> list[np.ndarray]:
    """The four NHWC backbone maps the lifter samples."""
    if "backbone" not in self.variables["params"]:
      raise ValueError("this checkpoint has no backbone (context-free model)")
    maps = self._features_fn(self._backbone_variables(), jnp.asarray(images, jnp.float32))
    return [np.asarray(m) for m in maps]

  def predict(self, images, keypoints_2d, keypoints_2d_crop, *,
              flip_test: bool = False) -> np.ndarray:
    """Root-relative 3D poses (B, 1, 17, 3) in metres.

    ``flip_test`` averages the prediction with the un-flipped prediction on
    the mirrored input (image mirrored, 2D keypoints flipped and left/right
    swapped), as the official evaluation does.
    """
    if not self.has_lifter:
      raise ValueError("this checkpoint holds only a backbone (converted from a COCO "
                       "file): convert a CA-PF checkpoint (--kind=capf) to predict 3D poses")
    images = np.asarray(images, np.float32)
    kp2d = np.asarray(keypoints_2d, np.float32)
    crop = np.asarray(keypoints_2d_crop, np.float32)
    _check_inputs(images, kp2d, crop)
    pose = np.asarray(self._predict_fn(self._device_variables, images, kp2d, crop))
    if not flip_test:
      return pose
    flipped = np.asarray(self._predict_fn(
        self._device_variables, np.ascontiguousarray(skeleton.flip_images(images)),
        skeleton.flip_keypoints_2d(kp2d, self.dataset),
        skeleton.flip_keypoints_crop(crop, self.dataset)))
    return (pose + skeleton.flip_pose_3d(flipped, self.dataset)) / 2


def _check_images(images):
  if images.ndim != 4 or images.shape[1:] != (skeleton.CROP_HEIGHT, skeleton.CROP_WIDTH, 3):
    raise ValueError(f"images: expected (B, {skeleton.CROP_HEIGHT}, {skeleton.CROP_WIDTH}, 3), "
                     f"got {images.shape}")


def _check_inputs(images, kp2d, crop):
  _check_images(images)
  for name, kp in (("keypoints_2d", kp2d), ("keypoints_2d_crop", crop)):
    if kp.shape != (images.shape[0], skeleton.NUM_JOINTS, 2):
      raise ValueError(f"{name}: expected ({images.shape[0]}, {skeleton.NUM_JOINTS}, 2), "
                       f"got {kp.shape}")
