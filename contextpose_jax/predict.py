r"""3D poses from a user's own images and videos: 2D keypoints, crop, lift, plots.

    python -m contextpose_jax.predict --checkpoint=MODEL_DIR \
        --image=frame.jpg --keypoints=frame_kp.json [--bbox=x0,y0,x1,y1] --output=out/
    python -m contextpose_jax.predict --checkpoint=MODEL_DIR --detector=COCO_DIR \
        --video=clip.mp4 [--bbox=...] [--smooth=5] --output=out/

``--checkpoint`` is any model directory ``checkpoints.load_model`` reads: a
converter output, a training workdir (its best checkpoint) or one of its step
checkpoints. Frames come from ``--image`` (one image or a folder),
``--images`` (a folder) or ``--video``. The 2D keypoints (image pixels) come
from ``--keypoints`` (see ``load_keypoints`` for the JSON / npz layouts, in the
Human3.6M 17-joint order or, with ``--keypoint_format=coco``, the COCO-17 order)
or, without it, from the COCO backbone ``--detector`` run on the box (``--bbox``,
else the whole frame) and mapped to Human3.6M (``skeleton.coco_to_h36m``).

``--output`` is a NEW directory: ``poses.npz`` and ``poses.json`` (3D joints
in metres relative to the root joint -- Human3.6M joint 0 (pelvis),
MPI-INF-3DHP joint 14 -- in camera axes: x right, y down, z forward; the
model's raw output as ``keypoints_3d_raw``), one ``<frame>.png`` per frame
(the crop with the 2D skeleton beside the 3D skeleton) and, for several
frames, ``skeleton.gif``. See docs/inference.md.

Each example is built as the training data is (``contextpose_jax/geometry.py``): the
official (center, scale) affine warp to 192x256, ``keypoints_2d`` normalized
by the full image size (``X / w * 2 - [1, h / w]``), ``keypoints_2d_crop``
through the same affine, and the crop normalized for the checkpoint's
backbone. The frozen backbone's BatchNorms are folded into its convolutions at
load time (``Predictor(fold_batch_norm=True)``; ``--nofold_batch_norm`` to keep them): the
same numbers up to float rounding, and faster (docs/benchmarks.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Iterator, Sequence

from absl import flags
import cv2
import numpy as np

from contextpose_jax import checkpoints
from contextpose_jax import cli
from contextpose_jax import compile_cache
from contextpose_jax import fileio
from contextpose_jax import geometry
from contextpose_jax import host_devices
from contextpose_jax import host_memory
from contextpose_jax import image_io
from contextpose_jax import skeleton
from contextpose_jax import visualize
from contextpose_jax.api import Predictor
from contextpose_jax.data import transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Suspect 2D keypoints (a warning and a per-frame flag, never an error): more
# than half of the joints outside the crop, or the joints' extent (larger
# side, pixels) under COLLAPSE_BOX_FRACTION of the box side or under
# COLLAPSE_FRAME_FRACTION of the frame's shorter side.
COLLAPSE_BOX_FRACTION = 0.05
COLLAPSE_FRAME_FRACTION = 0.02
MAX_WARNINGS = 10  # per run; then one summary line


class InputError(ValueError):
  """Bad user input; the message names the file / flag / field."""


# ----------------------------------------------------------------------------
# Keypoints.
# ----------------------------------------------------------------------------


def _read_keypoint_file(path: str) -> dict:
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such keypoints file")
  ext = os.path.splitext(path)[1].lower()
  try:
    if ext == ".json":
      with open(path) as f:
        data = json.load(f)
      if not isinstance(data, dict):
        data = {"keypoints": data}
    elif ext == ".npz":
      with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    else:
      raise InputError(f"{path}: keypoints must be a .json or .npz file")
  except InputError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(f"{path}: cannot be read: {type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}") from e
  unknown = set(data) - {"keypoints", "frames", "bbox"}
  if "keypoints" not in data or unknown:
    raise InputError(f"{path}: expected a 'keypoints' entry (and optional 'frames', "
                     f"'bbox'); found keys {sorted(data)}")
  return data


KEYPOINT_FORMATS = ("h36m", "coco", "3dhp")
_ORDER_NAMES = {"h36m": "Human3.6M", "coco": "COCO", "3dhp": "MPI-INF-3DHP"}


def load_keypoints(path: str, keypoint_format: str = "h36m"):
  """Reads a keypoints file: ``(keypoints (N, 17, 2), frames or None, bbox or None)``.

  Layouts (JSON or npz, the same fields):
    - ``keypoints``: (17, 2|3) for one image or (N, 17, 2|3) for N frames, in
      image pixels; a third column (a detector score) is ignored. A JSON file
      may also be just this array.
    - ``frames`` (optional): N image file names, pairing the keypoints with
      the frames of a folder (without it, the folder's images sorted by name).
    - ``bbox`` (optional): (4,) or (N, 4) boxes ``x0, y0, x1, y1`` in pixels.
  """
  if keypoint_format not in KEYPOINT_FORMATS:
    raise InputError(f"--keypoint_format must be one of {KEYPOINT_FORMATS}, "
                     f"got {keypoint_format!r}")
  data = _read_keypoint_file(path)
  try:
    kp = np.asarray(data["keypoints"], dtype=np.float64)
  except (ValueError, TypeError) as e:
    raise InputError(f"{path}: 'keypoints' is not a numeric array "
                     f"(ragged or non-numeric entries?)") from e
  if kp.ndim == 2:
    kp = kp[None]
  if kp.ndim != 3 or kp.shape[-1] not in (2, 3):
    raise InputError(f"{path}: 'keypoints' must be (17, 2|3) or (N, 17, 2|3), "
                     f"got shape {kp.shape}")
  if kp.shape[1] != skeleton.NUM_JOINTS:
    raise InputError(f"{path}: expected {skeleton.NUM_JOINTS} joints per frame "
                     f"({_ORDER_NAMES[keypoint_format]} order), got {kp.shape[1]}")
  kp = kp[..., :2]
  if not np.all(np.isfinite(kp)):
    raise InputError(f"{path}: 'keypoints' holds NaN or infinite values")
  if keypoint_format == "coco":
    kp = skeleton.coco_to_h36m(kp)

  frames = None
  if "frames" in data:
    frames = [str(f) for f in np.atleast_1d(np.asarray(data["frames"]))]
    if len(frames) != len(kp):
      raise InputError(f"{path}: {len(frames)} 'frames' but {len(kp)} keypoint sets")
    if len(set(frames)) != len(frames):
      raise InputError(f"{path}: 'frames' names a frame twice")
  bbox = None
  if "bbox" in data:
    try:
      bbox = np.asarray(data["bbox"], dtype=np.float64)
    except (ValueError, TypeError) as e:
      raise InputError(f"{path}: 'bbox' is not a numeric array") from e
    if bbox.shape == (4,):
      bbox = np.broadcast_to(bbox, (len(kp), 4))
    if bbox.shape != (len(kp), 4):
      raise InputError(f"{path}: 'bbox' must be (4,) or ({len(kp)}, 4), got {bbox.shape}")
  return kp, frames, bbox


def parse_bbox(text: str) -> np.ndarray:
  try:
    box = np.asarray([float(v) for v in text.split(",")], dtype=np.float64)
  except ValueError:
    box = np.zeros(0)
  if box.shape != (4,) or not np.all(np.isfinite(box)):
    raise InputError(f"--bbox must be x0,y0,x1,y1 (4 numbers), got {text!r}")
  return box


# ----------------------------------------------------------------------------
# Boxes and crops (the training convention, contextpose_jax/geometry.py).
# ----------------------------------------------------------------------------


def check_box(box, width: int, height: int, where: str) -> None:
  x0, y0, x1, y1 = box
  if not (x1 > x0 and y1 > y0):
    raise InputError(f"{where}: box {list(np.round(box, 2))} is empty "
                     "(need x0 < x1 and y0 < y1)")
  if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
    raise InputError(f"{where}: box {list(np.round(box, 2))} lies outside the "
                     f"{width}x{height} image")


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


@contextlib.contextmanager
def _as_input_error(*errors):
  """Turns the library's one-line errors into the CLI's InputError."""
  try:
    yield
  except errors as e:
    raise InputError(str(e)) from e


def read_image(path: str) -> np.ndarray:
  """An image file as uint8 RGB (H, W, 3); truncated or corrupt files are errors."""
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such image")
  with _as_input_error(image_io.ImageError):
    return image_io.read_image(path)


# ----------------------------------------------------------------------------
# Frames: images, a folder, a video.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Frames:
  """Where the frames come from: image files, or a video read in order."""
  names: list            # per-frame names: file names, or 000000, 000001, ... for a video
  paths: list | None = None
  video: str | None = None
  fps: float | None = None
  # A container's frame count can be off by a few: without a keypoints file
  # to match, a video may end early (``trim`` then drops the missing names).
  strict: bool = True
  decoded: int | None = None

  def __len__(self):
    return len(self.names)

  def batches(self, batch_size: int) -> Iterator[list]:
    """Yields lists of (index, name, uint8 RGB frame), ``batch_size`` at a time."""
    batch = []
    for item in (self._video_frames() if self.video else self._image_frames()):
      batch.append(item)
      if len(batch) == batch_size:
        yield batch
        batch = []
    if batch:
      yield batch

  def _image_frames(self):
    for i, path in enumerate(self.paths):
      yield i, self.names[i], read_image(path)

  def _video_frames(self):
    with _quiet_native_stderr():
      capture = cv2.VideoCapture(self.video)
    try:
      i = 0
      while True:
        with _quiet_native_stderr():
          ok, frame = capture.read()
        if not ok:
          break
        if i >= len(self.names):
          raise InputError(f"{self.video}: more than the {len(self.names)} frames it "
                           "announced (or than the keypoints file holds)")
        yield i, self.names[i], cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        i += 1
    finally:
      capture.release()
    self.decoded = i
    if i != len(self.names) and (self.strict or i == 0):
      raise InputError(f"{self.video}: {i} frames decoded, {len(self.names)} expected "
                       "(truncated or corrupt video, or a keypoints file of another length)")


@contextlib.contextmanager
def _quiet_native_stderr():
  """Silences FFmpeg's own stderr lines ("moov atom not found", ...): the CLI
  says what went wrong in one line of its own."""
  sys.stderr.flush()
  try:
    saved = os.dup(2)
  except OSError:  # no fd 2 (embedded interpreters)
    yield
    return
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def open_video(path: str) -> Frames:
  """A video's frame names and rate; an unreadable video is one error."""
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such video")
  with _quiet_native_stderr():
    capture = cv2.VideoCapture(path)
    try:
      ok = capture.isOpened()
      count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if ok else 0
      fps = float(capture.get(cv2.CAP_PROP_FPS)) if ok else 0.0
      ok = ok and capture.read()[0]
    finally:
      capture.release()
  if not ok or count < 1:
    raise InputError(f"{path}: cannot be read as a video (corrupt, empty or unsupported)")
  return Frames(names=[f"{i:06d}" for i in range(count)], video=path,
                fps=fps if 0 < fps < 1000 else None)


def list_frames(image_arg: str, keypoints, frames, kp_path: str | None) -> list[str]:
  """Image paths: one per keypoint set, or (``keypoints=None``) all of a folder."""
  if os.path.isdir(image_arg):
    if frames is not None:
      paths = [os.path.join(image_arg, f) for f in frames]
      for p in paths:
        if not os.path.isfile(p):
          raise InputError(f"{kp_path}: frame {os.path.basename(p)!r} is not in {image_arg}")
      return paths
    names = sorted(f for f in os.listdir(image_arg)
                   if f.lower().endswith(IMAGE_EXTENSIONS)
                   and os.path.isfile(os.path.join(image_arg, f)))
    if not names:
      raise InputError(f"{image_arg}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    if keypoints is not None and len(names) != len(keypoints):
      raise InputError(f"{kp_path}: {len(keypoints)} keypoint sets for the {len(names)} "
                       f"images in {image_arg} (add 'frames' to pair them by name)")
    return [os.path.join(image_arg, n) for n in names]
  if not os.path.isfile(image_arg):
    raise InputError(f"{image_arg}: no such image or folder")
  if keypoints is not None and len(keypoints) != 1:
    raise InputError(f"{kp_path}: {len(keypoints)} keypoint sets for one image "
                     f"({image_arg})")
  return [image_arg]


# ----------------------------------------------------------------------------
# Progress, smoothing, suspect keypoints.
# ----------------------------------------------------------------------------


class Progress:
  """``label  done/total  rate`` on one stderr line, rewritten in place."""

  def __init__(self, label: str, total: int, stream=None):
    self.label, self.total = label, total
    self.stream = stream or sys.stderr
    self.enabled = total > 1
    self.start = time.monotonic()

  def update(self, done: int):
    if not self.enabled:
      return
    rate = done / max(time.monotonic() - self.start, 1e-9)
    width = 24
    bar = "#" * (width * done // self.total) + "." * (width - width * done // self.total)
    self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} {rate:.1f} frames/s")
    if done >= self.total:
      self.stream.write("\n")
    self.stream.flush()


def smooth_keypoints(keypoints, window: int) -> np.ndarray:
  """Centred moving average over frames of (N, 17, 2) keypoints.

  ``window`` (odd) frames are averaged about each frame; near the ends the
  window shrinks symmetrically (frame i averages i - h .. i + h with
  h = min(window // 2, i, N - 1 - i)), so a steady motion is not shifted.
  ``window <= 1`` returns the keypoints unchanged.
  """
  kp = np.asarray(keypoints, dtype=np.float64)
  if window <= 1 or len(kp) < 3:
    return kp
  n = len(kp)
  idx = np.arange(n)
  half = np.minimum(np.minimum(window // 2, idx), n - 1 - idx)
  cums = np.concatenate([np.zeros_like(kp[:1]), np.cumsum(kp, axis=0)])
  total = cums[idx + half + 1] - cums[idx - half]
  return total / (2 * half + 1)[:, None, None]


def suspect_reason(keypoints_px, keypoints_crop, box, width: int, height: int) -> str | None:
  """Why a frame's 2D keypoints look wrong (None if they do not)."""
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


# ----------------------------------------------------------------------------
# 2D detection with a COCO backbone.
# ----------------------------------------------------------------------------


def _frame_box(boxes, i: int, name: str, width: int, height: int, fallback, fallback_what: str):
  """Frame i's box: the given one (--bbox or the keypoints file), made square,
  else `fallback`; either must overlap the frame."""
  if boxes is not None:
    check_box(boxes[i], width, height, f"{name}: --bbox")
    return geometry.square_box(boxes[i])
  check_box(fallback, width, height, f"{name}: {fallback_what}")
  return fallback


def _detector_backbone(detector) -> str:
  config = getattr(detector, "model_config", None) or {}
  return config.get("backbone", "hrnet_32")


def detect_frames(detector, frames: Frames, boxes, *, batch_size: int,
                  detector_path: str = "--detector") -> dict:
  """COCO keypoints on every frame, mapped to Human3.6M and to frame pixels.

  Each frame is cropped with the official warp around its box (``boxes[i]``,
  made square, else the whole frame), normalized for the detector's backbone
  and handed to ``detector.detect_2d`` (keypoints in crop pixels, COCO order;
  scores); the keypoints go back to the frame through the inverse affine.
  """
  backbone = _detector_backbone(detector)
  out = {"coco_px": [], "coco_scores": [], "detection_bbox": []}
  progress = Progress("detect 2D", len(frames))
  done = 0
  for batch in frames.batches(batch_size):
    crops, inverses = [], []
    for i, name, image in batch:
      h, w = image.shape[:2]
      box = _frame_box(boxes, i, name, w, h, geometry.square_box([0.0, 0.0, w - 1.0, h - 1.0]),
                       "the whole frame")
      center, scale = geometry.box_to_center_scale(box)
      crops.append(geometry.crop_image(image, center, scale))
      inverses.append(geometry.affine_matrix(center, scale, inverse=True))
      out["detection_bbox"].append(box)
    n = len(crops)
    images = transforms.normalize_image(np.stack(crops), backbone)
    if n < batch_size and len(frames) > batch_size:  # one compiled shape
      images = np.concatenate([images, np.repeat(images[-1:], batch_size - n, 0)])
    try:
      keypoints, scores = detector.detect_2d(images)
    except ValueError as e:  # e.g. a backbone converted without its heatmap head
      raise InputError(f"{detector_path}: {str(e).splitlines()[0]}") from e
    keypoints = np.asarray(keypoints, np.float64)[:n]
    scores = np.asarray(scores, np.float64)[:n]
    for j in range(n):
      out["coco_px"].append(geometry.apply_affine(keypoints[j], inverses[j]))
      out["coco_scores"].append(scores[j])
    done += n
    progress.update(done)
  result = {k: np.stack(v) for k, v in out.items()}
  # Scores are mapped like coordinates: derived joints get the mean score.
  mapped = skeleton.coco_to_h36m(np.concatenate(
      [result["coco_px"], result["coco_scores"][..., None]], axis=-1))
  result["keypoints_px"] = mapped[..., :2]
  result["scores"] = mapped[..., 2]
  return result


# ----------------------------------------------------------------------------
# Lifting and output.
# ----------------------------------------------------------------------------


def predict_frames(predictor, frames, keypoints, boxes, *, flip_test: bool, batch_size: int,
                   keypoint_box_enlarge: float = geometry.KEYPOINT_BOX_ENLARGE,
                   on_batch=None) -> dict:
  """Crops every frame and lifts it; returns a dict of per-frame arrays.

  ``frames`` is a ``Frames`` (or a list of image paths). Frames are read,
  cropped and lifted ``batch_size`` at a time, so a long video never holds
  more than one batch of crops in memory; ``on_batch(result_of_batch)`` sees
  each batch (with its uint8 crops) before they are dropped.
  ``keypoints_3d_raw`` is the model's output; ``keypoints_3d`` has the root
  joint (``skeleton.ROOT_JOINT``) moved to the origin.
  """
  if not isinstance(frames, Frames):
    frames = Frames(names=[os.path.basename(p) for p in frames], paths=list(frames))
  backbone = predictor.model_config.get("backbone", "hrnet_32")
  root = skeleton.ROOT_JOINT[predictor.model_config.get("dataset", "h36m")]
  keys = ("keypoints_2d", "keypoints_2d_crop", "bbox", "center", "scale", "suspect",
          "image_size")
  out = {k: [] for k in keys + ("keypoints_3d_raw", "keypoints_3d")}
  reasons = []
  progress = Progress("lift 3D", len(frames))
  done = 0
  for batch in frames.batches(batch_size):
    examples = []
    for i, name, image in batch:
      h, w = image.shape[:2]
      box = _frame_box(boxes, i, name, w, h,
                       geometry.box_from_keypoints(keypoints[i], keypoint_box_enlarge),
                       "the keypoints' box")
      example = make_example(image, keypoints[i], box, backbone)
      example["bbox"] = box
      example["image_size"] = np.array([w, h])
      reason = suspect_reason(keypoints[i], example["keypoints_2d_crop"], box, w, h)
      example["suspect"] = reason is not None
      reasons.append((name, reason))
      examples.append(example)
    n = len(examples)
    # Pad to a whole batch: one compiled shape for any number of frames.
    if len(frames) > batch_size:
      examples += [examples[-1]] * (batch_size - n)
    stack = lambda key: np.stack([e[key] for e in examples])  # pylint: disable=cell-var-from-loop
    pose = predictor.predict(stack("image"), stack("keypoints_2d"),
                             stack("keypoints_2d_crop"), flip_test=flip_test)
    raw = pose[:n, 0].astype(np.float32)
    batch_out = {k: stack(k)[:n] for k in keys}
    batch_out["keypoints_3d_raw"] = raw
    batch_out["keypoints_3d"] = raw - raw[:, root:root + 1]
    for k in out:
      out[k].append(batch_out[k])
    if on_batch is not None:
      on_batch({**batch_out, "crop": stack("crop")[:n],
                "names": [name for _, name, _ in batch]})
    done += n
    progress.update(done)
  result = {k: np.concatenate(v) for k, v in out.items()}
  result["reasons"] = reasons
  return result


def warn_suspects(reasons, stream=None) -> None:
  stream = stream or sys.stderr
  flagged = [(name, why) for name, why in reasons if why]
  for name, why in flagged[:MAX_WARNINGS]:
    print(f"warning: {name}: {why}; its pose is flagged suspect_keypoints", file=stream)
  if len(flagged) > MAX_WARNINGS:
    print(f"warning: {len(flagged)} of {len(reasons)} frames have suspect 2D keypoints "
          "(suspect_keypoints in poses.npz)", file=stream)


def _unique_stems(names):
  stems = [os.path.splitext(n)[0] for n in names]
  if len(set(stems)) != len(stems):  # a.jpg and a.png in one folder
    stems = [n.replace(".", "_") for n in names]
  return stems


def write_records(directory: str, names, keypoints_px, result, *, dataset: str,
                  detection: dict | None = None, extra: dict | None = None) -> None:
  """poses.npz and poses.json into ``directory`` (a staging directory)."""
  root = skeleton.ROOT_JOINT[dataset]
  arrays = dict(
      frames=np.asarray(names), keypoints_3d=result["keypoints_3d"],
      keypoints_3d_raw=result["keypoints_3d_raw"], root_joint=np.int32(root),
      keypoints_2d_px=np.asarray(keypoints_px, np.float32),
      keypoints_2d=result["keypoints_2d"], keypoints_2d_crop=result["keypoints_2d_crop"],
      bbox=result["bbox"], center=result["center"], scale=result["scale"],
      image_size=result["image_size"], suspect_keypoints=result["suspect"].astype(bool))
  if detection is not None:
    arrays.update(scores=detection["scores"].astype(np.float32),
                  keypoints_2d_coco_px=detection["coco_px"].astype(np.float32),
                  scores_coco=detection["coco_scores"].astype(np.float32),
                  detection_bbox=detection["detection_bbox"])
  arrays.update(extra or {})
  np.savez(os.path.join(directory, "poses.npz"), **arrays)
  joint_names = (skeleton.H36M_JOINT_NAMES if dataset == "h36m"
                 else tuple(f"3dhp_{i}" for i in range(skeleton.NUM_JOINTS)))
  frames = {}
  for i, name in enumerate(names):
    frame = {"keypoints_3d": result["keypoints_3d"][i].round(6).tolist(),
             "keypoints_3d_raw": result["keypoints_3d_raw"][i].round(6).tolist(),
             "keypoints_2d_px": np.asarray(keypoints_px[i]).round(3).tolist(),
             "bbox": result["bbox"][i].round(3).tolist(),
             "suspect_keypoints": bool(result["suspect"][i])}
    if detection is not None:
      frame["scores"] = detection["scores"][i].round(4).tolist()
    frames[name] = frame
  record = {
      "joint_names": list(joint_names),
      "root_joint": root,
      "units": (f"metres; keypoints_3d is root-relative (joint {root} = "
                f"{'pelvis' if dataset == 'h36m' else 'pelvis (MPI-INF-3DHP joint 14)'}"
                " at 0), keypoints_3d_raw is the model's output; camera axes: x right, "
                "y down, z forward; keypoints_2d_px in image pixels"),
      "frames": frames,
  }
  with open(os.path.join(directory, "poses.json"), "w") as f:
    json.dump(record, f, indent=1)


# ----------------------------------------------------------------------------
# Flags (absl, on a private FlagValues: importing this module defines no
# global flag).
# ----------------------------------------------------------------------------

_FLAGS = flags.FlagValues()
_BOOLEAN_FLAGS = ("flip_test", "plot", "fold_batch_norm", "animation")
_REQUIRED = ("checkpoint", "output")


def _define_flags(fv: flags.FlagValues) -> None:
  d = dict(flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "a model directory: a converter output "
                      "(model_config.json + variables/), a training workdir (its best "
                      "checkpoint, else its latest) or a step checkpoint "
                      "(WORKDIR/best/<step>, WORKDIR/checkpoints/<step>)", **d)
  flags.DEFINE_string("image", None, "an image, or a folder of frames", **d)
  flags.DEFINE_string("images", None, "a folder of frames (sorted by name)", **d)
  flags.DEFINE_string("video", None, "a video file (read with OpenCV)", **d)
  flags.DEFINE_string("keypoints", None, "JSON or npz with 'keypoints' (pixels), optional "
                      "'frames', 'bbox'; without it, --detector finds them", **d)
  flags.DEFINE_string("detector", None, "a converted COCO backbone (with its heatmap head) "
                      "that detects the 2D keypoints when --keypoints is not given", **d)
  flags.DEFINE_enum("keypoint_format", None, list(KEYPOINT_FORMATS),
                    "joint order of --keypoints: the checkpoint's own (h36m, or 3dhp for "
                    "MPI-INF-3DHP models; the default) or coco (mapped to Human3.6M)", **d)
  flags.DEFINE_string("bbox", None, "x0,y0,x1,y1 person box in pixels, for every frame "
                      "(overrides a 'bbox' in the keypoints file; made square); default: "
                      "the keypoints' extent, enlarged (detection: the whole frame)", **d)
  flags.DEFINE_float("keypoint_box_enlarge", geometry.KEYPOINT_BOX_ENLARGE,
                     "box side / keypoints' extent when no box is given", **d)
  flags.DEFINE_integer("smooth", 0, "centred moving average of the 2D keypoints over this "
                       "many frames (odd; 0 or 1: off)", **d)
  flags.DEFINE_string("output", None, "new directory to write", **d)
  flags.DEFINE_boolean("flip_test", False, "average with the prediction on the mirrored "
                       "input", **d)
  flags.DEFINE_boolean("plot", True, "write a PNG per frame", **d)
  flags.DEFINE_boolean("animation", True, "with --plot and several frames, also write "
                       "skeleton.gif (the 3D skeleton over time)", **d)
  flags.DEFINE_float("fps", None, "frame rate of skeleton.gif (default: the video's, or 10)",
                     **d)
  flags.DEFINE_float("elev", 15.0, "3D view elevation (degrees)", **d)
  flags.DEFINE_float("azim", -70.0, "3D view azimuth (degrees)", **d)
  flags.DEFINE_integer("batch_size", 8, "frames per model call", **d)
  flags.DEFINE_boolean("fold_batch_norm", True, "fold the backbone's BatchNorms into its "
                       "convs at load time (same numbers up to rounding; faster)", **d)
  flags.DEFINE_string("compilation_cache", "default", "JAX's persistent compilation cache "
                      "directory; 'default': $CONTEXTPOSE_JAX_CACHE or "
                      "~/.cache/contextpose_jax/xla; off: off", **d)
  flags.DEFINE_enum("host_malloc", None, host_memory.SETTINGS, "glibc malloc settings "
                    "for XLA:CPU's per-run temporaries (contextpose_jax/host_memory.py); "
                    "default: $CONTEXTPOSE_JAX_HOST_MALLOC, else auto", **d)


_define_flags(_FLAGS)

USAGE = """usage: python -m contextpose_jax.predict --checkpoint=MODEL_DIR
    (--image=IMG_OR_DIR | --images=DIR | --video=FILE)
    (--keypoints=FILE | --detector=COCO_DIR) [--bbox=x0,y0,x1,y1] --output=NEW_DIR

Lift 2D keypoints on your own images or videos to 3D with a CA-PF model
(docs/inference.md).
"""


def parse_flags(argv: Sequence[str]):
  """argv (without the program name) -> an options namespace; InputError on misuse."""
  # argparse spelled negated booleans --no-NAME; absl spells them --noNAME.
  argv = [("--no" + a[5:]) if a.startswith("--no-") and a[5:].split("=")[0] in _BOOLEAN_FLAGS
          else a for a in argv]
  rest = cli.parse(_FLAGS, argv, USAGE)
  if rest:
    raise InputError(f"unexpected arguments {rest} (flags are --name=value)")
  for name in _REQUIRED:
    if _FLAGS[name].value is None:
      raise InputError(f"--{name} is required (see --help)")
  return cli.values(_FLAGS)


# ----------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------


def check_output(output: str) -> None:
  """A new directory that can be created: checked before any model work."""
  if os.path.lexists(output):
    raise InputError(f"{output}: already exists; choose a new --output directory")
  parent = os.path.dirname(os.path.abspath(output))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise InputError(f"{output}: cannot be created ({parent} is not a directory)")
  try:  # a real probe: os.access says yes to root on a read-only mount
    os.rmdir(tempfile.mkdtemp(prefix=".predict-probe-", dir=parent))
  except OSError as e:
    raise InputError(f"{output}: cannot be created in {parent} "
                     f"({e.strerror or type(e).__name__})") from e


def check_keypoint_format(keypoint_format: str | None, dataset: str) -> str:
  """The keypoint order to read, given the checkpoint's dataset."""
  if keypoint_format is None:
    return dataset
  allowed = ("h36m", "coco") if dataset == "h36m" else ("3dhp",)
  if keypoint_format not in allowed:
    raise InputError(f"--keypoint_format={keypoint_format}: this checkpoint "
                     f"({_ORDER_NAMES[dataset]}) takes keypoints in the "
                     f"{' or '.join(_ORDER_NAMES[a] for a in allowed)} order")
  return keypoint_format


def _check_options(args) -> None:
  if args.batch_size < 1:
    raise InputError(f"--batch_size must be >= 1, got {args.batch_size}")
  if not args.keypoint_box_enlarge > 0:
    raise InputError(f"--keypoint_box_enlarge must be > 0, got {args.keypoint_box_enlarge}")
  if args.smooth < 0 or (args.smooth > 1 and args.smooth % 2 == 0):
    raise InputError(f"--smooth must be 0 (off) or an odd number of frames, got {args.smooth}")
  if args.fps is not None and not args.fps > 0:
    raise InputError(f"--fps must be > 0, got {args.fps}")
  sources = [f"--{n}" for n in ("image", "images", "video") if getattr(args, n)]
  if len(sources) != 1:
    raise InputError("give exactly one of --image, --images, --video"
                     + (f" (got {', '.join(sources)})" if sources else ""))


def _read_model_config(path: str):
  if not os.path.exists(path):
    raise InputError(f"{path}: no such checkpoint directory")
  with _as_input_error(checkpoints.ModelDirectoryError):
    return checkpoints.read_model_config(path)


def _load_predictor(path: str, fold_batch_norm: bool = True) -> Predictor:
  with _as_input_error(checkpoints.ModelDirectoryError):
    return Predictor.load(path, fold_batch_norm=fold_batch_norm)


def _frames_of(args, keypoints, frame_names, kp_path) -> Frames:
  if args.video:
    if frame_names is not None:
      raise InputError(f"{kp_path}: 'frames' pairs keypoints with a folder's images; a "
                       "video's keypoints are given in frame order")
    frames = open_video(args.video)
    frames.strict = keypoints is not None
    if keypoints is not None and len(keypoints) != len(frames):
      raise InputError(f"{kp_path}: {len(keypoints)} keypoint sets for the {len(frames)} "
                       f"frames of {args.video}")
    return frames
  folder = args.images
  if folder is not None and not os.path.isdir(folder):
    raise InputError(f"{folder}: --images wants a folder ({'a file' if os.path.exists(folder) else 'no such folder'}); "
                     "use --image for one image")
  paths = list_frames(folder or args.image, keypoints, frame_names, kp_path)
  return Frames(names=[os.path.basename(p) for p in paths], paths=paths)


def run(args, detector=None) -> str:
  """Checks every input, predicts, writes ``args.output``; returns its path.

  ``detector``: an object with ``detect_2d(images)`` (keypoints (B, 17, 2) in
  crop pixels, COCO order; scores (B, 17)) used instead of loading
  ``--detector`` (tests inject one).
  """
  check_output(args.output)
  _check_options(args)
  model_config = _read_model_config(args.checkpoint)
  dataset = model_config.get("dataset", "h36m")
  keypoints = frame_names = boxes = None
  if args.keypoints is not None:
    keypoint_format = check_keypoint_format(args.keypoint_format, dataset)
    keypoints, frame_names, boxes = load_keypoints(args.keypoints, keypoint_format)
  else:
    if detector is None and args.detector is None:
      raise InputError("give the 2D keypoints (--keypoints=FILE) or a COCO backbone to "
                       "detect them (--detector=DIR)")
    if dataset != "h36m":
      raise InputError(f"--detector: COCO keypoints map to Human3.6M joints only; this "
                       f"checkpoint ({_ORDER_NAMES[dataset]}) needs --keypoints")
    if args.keypoint_format is not None:
      raise InputError("--keypoint_format describes a --keypoints file; none is given")
  frames = _frames_of(args, keypoints, frame_names, args.keypoints)
  if args.bbox is not None:
    boxes = np.broadcast_to(parse_bbox(args.bbox), (len(frames), 4))
  if detector is None and keypoints is None:
    detector = _load_predictor(args.detector)
    if not hasattr(detector, "detect_2d"):
      raise InputError(f"{args.detector}: this version's Predictor cannot detect 2D "
                       "keypoints (no detect_2d)")
    if not getattr(detector, "has_heatmap_head", True):
      raise InputError(f"{args.detector}: no COCO heatmap head; convert a COCO backbone "
                       "file with its head (docs/inference.md)")

  predictor = _load_predictor(args.checkpoint, args.fold_batch_norm)
  if not predictor.has_lifter:
    raise InputError(f"{args.checkpoint}: holds only a backbone; give a CA-PF model "
                     "(a converted --kind=capf checkpoint or a training workdir)")

  with fileio.new_directory(args.output) as staging:
    detection = None
    if keypoints is None:
      detection = detect_frames(detector, frames, boxes, batch_size=args.batch_size,
                                detector_path=args.detector or "--detector")
      keypoints = detection["keypoints_px"]
      if args.bbox is None:
        boxes = None  # lift around the detected person, as with given keypoints
      if frames.decoded is not None and frames.decoded < len(frames):
        frames.names = frames.names[:frames.decoded]  # the container over-counted
    extra = {}
    if args.smooth > 1:
      extra["keypoints_2d_px_unsmoothed"] = np.asarray(keypoints, np.float32)
      keypoints = smooth_keypoints(keypoints, args.smooth)
    if frames.video:
      extra.update(video=np.asarray(os.path.basename(frames.video)),
                   fps=np.float32(frames.fps or 0.0))
    stems = iter(_unique_stems(frames.names))

    def plot_batch(b):
      if not args.plot:
        return
      for i, name in enumerate(b["names"]):
        visualize.plot_pose(os.path.join(staging, next(stems) + ".png"), b["crop"][i],
                            b["keypoints_2d_crop"][i], b["keypoints_3d"][i],
                            dataset=dataset, elev=args.elev, azim=args.azim, title=name)

    result = predict_frames(predictor, frames, keypoints, boxes, flip_test=args.flip_test,
                            batch_size=args.batch_size,
                            keypoint_box_enlarge=args.keypoint_box_enlarge,
                            on_batch=plot_batch)
    warn_suspects(result["reasons"])
    write_records(staging, frames.names, keypoints, result, dataset=dataset,
                  detection=detection, extra=extra)
    if args.plot and args.animation and len(frames) > 1:
      visualize.animate_poses(os.path.join(staging, "skeleton.gif"), result["keypoints_3d"],
                              dataset=dataset, fps=args.fps or frames.fps or 10.0,
                              elev=args.elev, azim=args.azim, titles=frames.names)
  return args.output


def main(argv: Sequence[str] | None = None, *, detector=None) -> int:
  """The CLI: ``main(["--checkpoint=...", ...])`` -> exit status (0 or 1)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    args = parse_flags(argv)
    host_devices.skip_absent_backends()
    try:  # before the JAX backend starts
      host_memory.configure(args.host_malloc)
    except ValueError as e:  # a bad $CONTEXTPOSE_JAX_HOST_MALLOC
      raise InputError(str(e)) from None
    compile_cache.enable(args.compilation_cache)
    out = run(args, detector=detector)
  except cli.Exit as e:  # --help (0), or a flag error already printed as one line
    return 0 if e.code == 0 else 1
  except (InputError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
