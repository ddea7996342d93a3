"""What the user gives about the people: keypoints files, detector outputs, boxes.

- ``load_keypoints``: this project's single-person keypoints file (JSON / npz);
- ``load_coco_results``: COCO results JSON from any detector, several
  instances per image: person boxes (``--detections``) or COCO-17 keypoints
  (``--keypoints`` with ``--keypoint_format=coco``), keyed by ``image_id``;
- boxes: ``parse_bbox`` (``--bbox``), ``check_box`` and ``check_keypoints``
  (a box or keypoints that miss the frame, or hostile numbers, are one line).
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from contextpose_jax import geometry
from contextpose_jax import skeleton
from contextpose_jax.predict.errors import InputError

KEYPOINT_FORMATS = ("h36m", "coco", "3dhp")
ORDER_NAMES = {"h36m": "Human3.6M", "coco": "COCO", "3dhp": "MPI-INF-3DHP"}
COCO_JOINT_NAMES = ("nose", "left_eye", "right_eye", "left_ear", "right_ear",
                    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
                    "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                    "right_knee", "left_ankle", "right_ankle")
# Coordinates further than this many frame sizes outside the frame are
# refused (a unit mix-up or garbage), not lifted into a garbage pose.
FAR_OUTSIDE = 10.0
# A detector's person box is tight: the 2D detector's crop is this much
# larger (then made square), as top-down 2D models crop.
DETECTION_BOX_ENLARGE = 1.25
PERSON_CATEGORY = 1  # COCO's "person"


@dataclasses.dataclass
class Instance:
  """One person in one frame, as far as the inputs know it.

  ``keypoints`` (17, 2) frame pixels in the lifter's order, or None (to be
  detected in ``box``); ``box`` x0, y0, x1, y1 pixels, or None.
  """
  box: np.ndarray | None = None
  keypoints: np.ndarray | None = None
  scores: np.ndarray | None = None        # (17,), the lifter's order
  coco: np.ndarray | None = None          # (17, 2) COCO order, when known
  coco_scores: np.ndarray | None = None   # (17,)
  score: float = 1.0                      # the detector's score of the person
  lift_box: np.ndarray | None = None      # a box to lift in (else the keypoints')
  detection_box: np.ndarray | None = None  # the square box the 2D detector cropped


# ----------------------------------------------------------------------------
# This project's keypoints file (one person per frame).
# ----------------------------------------------------------------------------


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(f"{path}: cannot be read: {type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}") from e


def is_coco_results(path: str) -> bool:
  """True for a COCO results file: a JSON list of objects with an ``image_id``."""
  if not path.lower().endswith(".json") or not os.path.isfile(path):
    return False
  data = _read_json(path)
  return (isinstance(data, list) and len(data) > 0
          and all(isinstance(d, dict) for d in data) and "image_id" in data[0])


def _read_keypoint_file(path: str) -> dict:
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such keypoints file")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".json":
    data = _read_json(path)
    if not isinstance(data, dict):
      data = {"keypoints": data}
  elif ext == ".npz":
    try:
      with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    except Exception as e:  # pylint: disable=broad-except
      raise InputError(f"{path}: cannot be read: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from e
  else:
    raise InputError(f"{path}: keypoints must be a .json or .npz file")
  unknown = set(data) - {"keypoints", "frames", "bbox"}
  if "keypoints" not in data or unknown:
    raise InputError(f"{path}: expected a 'keypoints' entry (and optional 'frames', "
                     f"'bbox'); found keys {sorted(data)}")
  return data


def _first_bad(values) -> tuple:
  """(row, joint) of the first non-finite value of a (N, J, ...) array."""
  bad = ~np.isfinite(values)
  while bad.ndim > 2:
    bad = bad.any(-1)
  row, joint = np.argwhere(bad)[0]
  return int(row), int(joint)


def load_keypoints(path: str, keypoint_format: str = "h36m"):
  """Reads a keypoints file: ``(keypoints (N, 17, 2), frames or None, bbox or None)``.

  Layouts (JSON or npz, the same fields):
    - ``keypoints``: (17, 2|3) for one image or (N, 17, 2|3) for N frames, in
      image pixels; a third column (a detector score) is kept as the score.
    - ``frames`` (optional): N image file names, pairing the keypoints with
      the frames of a folder (without it, the folder's images sorted by name).
    - ``bbox`` (optional): (4,) or (N, 4) boxes ``x0, y0, x1, y1`` in pixels.
  """
  kp, frames, bbox, _ = load_keypoints_and_scores(path, keypoint_format)
  return kp, frames, bbox


def load_keypoints_and_scores(path: str, keypoint_format: str = "h36m"):
  """``load_keypoints`` plus the scores: (N, 17) from a third column, else None."""
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
                     f"({ORDER_NAMES[keypoint_format]} order), got {kp.shape[1]}")
  if not np.all(np.isfinite(kp[..., :2])):
    row, joint = _first_bad(kp[..., :2])
    raise InputError(f"{path}: 'keypoints' holds NaN or infinite values "
                     f"(set {row}, joint {joint})")
  scores = None
  if kp.shape[-1] == 3:
    scores = np.where(np.isfinite(kp[..., 2]), kp[..., 2], 0.0)
  kp = kp[..., :2]
  if keypoint_format == "coco":
    if scores is not None:
      mapped = skeleton.coco_to_h36m(np.concatenate([kp, scores[..., None]], -1))
      kp, scores = mapped[..., :2], mapped[..., 2]
    else:
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
    if not np.all(np.isfinite(bbox)):
      raise InputError(f"{path}: 'bbox' of set {int(np.argwhere(~np.isfinite(bbox))[0, 0])} "
                       "holds NaN or infinite values")
  return kp, frames, bbox, scores


# ----------------------------------------------------------------------------
# COCO results files (several people per image).
# ----------------------------------------------------------------------------


def _number(value, where: str) -> float:
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise InputError(f"{where} is not a number: {value!r}") from None
  if not np.isfinite(v):
    raise InputError(f"{where} is not finite: {value!r}")
  return v


def _xywh(value, where: str) -> np.ndarray:
  if not isinstance(value, (list, tuple)) or len(value) != 4:
    raise InputError(f"{where}: 'bbox' must be [x, y, width, height], got {value!r}")
  x, y, w, h = (_number(v, f"{where}: 'bbox'") for v in value)
  if not (w > 0 and h > 0):
    raise InputError(f"{where}: 'bbox' {[x, y, w, h]} is empty (width and height must be > 0)")
  return np.array([x, y, x + w, y + h])


def load_coco_results(path: str, kind: str, *, min_score: float = 0.0) -> dict:
  """A COCO results JSON -> ``{image_id: [Instance, ...]}`` (file order).

  ``kind="detections"``: ``[{"image_id", "bbox": [x, y, w, h], "score",
  "category_id"}]``; entries of another category than person (1) and under
  ``min_score`` are dropped. ``kind="keypoints"``: ``[{"image_id",
  "keypoints": [x1, y1, v1, ...] (17 COCO joints), "score", "bbox"
  (optional)}]``, mapped to Human3.6M (``skeleton.coco_to_h36m``; the third
  value of each joint is its score).
  """
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such {'detections' if kind == 'detections' else 'keypoints'} file")
  data = _read_json(path)
  if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
    raise InputError(f"{path}: expected a COCO results list "
                     "[{\"image_id\": ..., ...}, ...]")
  out: dict = {}
  for n, entry in enumerate(data):
    if "image_id" not in entry:
      raise InputError(f"{path}: entry {n} has no 'image_id'")
    image_id = entry["image_id"]
    if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
      raise InputError(f"{path}: entry {n}: 'image_id' must be a frame index or a file "
                       f"name, got {image_id!r}")
    where = f"{path}: entry {n} (image_id {image_id!r})"
    score = _number(entry.get("score", 1.0), f"{where}: 'score'")
    if kind == "detections":
      if "bbox" not in entry:
        raise InputError(f"{where}: no 'bbox'")
      if entry.get("category_id", PERSON_CATEGORY) != PERSON_CATEGORY or score < min_score:
        continue
      instance = Instance(box=_xywh(entry["bbox"], where), score=score)
    else:
      values = entry.get("keypoints")
      if not isinstance(values, list):
        raise InputError(f"{where}: no 'keypoints' list")
      if len(values) != 3 * skeleton.NUM_JOINTS:
        raise InputError(f"{where}: 'keypoints' has {len(values)} numbers; expected "
                         f"{3 * skeleton.NUM_JOINTS} (17 COCO joints x (x, y, score))")
      kp = np.empty((skeleton.NUM_JOINTS, 3))
      for j in range(skeleton.NUM_JOINTS):
        for c in range(3):
          kp[j, c] = _number(values[3 * j + c],
                             f"{where}: joint {j} ({COCO_JOINT_NAMES[j]})")
      if score < min_score:
        continue
      mapped = skeleton.coco_to_h36m(kp)
      box = _xywh(entry["bbox"], where) if entry.get("bbox") is not None else None
      instance = Instance(box=box, keypoints=mapped[:, :2], scores=mapped[:, 2],
                          coco=kp[:, :2], coco_scores=kp[:, 2], score=score)
    out.setdefault(image_id, []).append(instance)
  return out


def key_frames(results: dict, path: str, names, *, video: bool, source: str) -> dict:
  """``{image_id: instances}`` -> ``{frame index: instances}``.

  ``image_id`` is the frame index for a video (an int, or digits), or a
  file name / stem of the frames for images. An ``image_id`` that names no
  frame is one error (the file is not for these frames).
  """
  lookup = {}
  if not video:
    # The name as given, else its file name or stem where only one frame has it.
    bases: dict = {}
    stems: dict = {}
    for i, name in enumerate(names):
      lookup[name] = i
      bases.setdefault(os.path.basename(name), []).append(i)
      stems.setdefault(os.path.splitext(os.path.basename(name))[0], []).append(i)
    for table in (bases, stems):
      for key, idx in table.items():
        if len(idx) == 1:
          lookup.setdefault(key, idx[0])
  out = {}
  for image_id, instances in results.items():
    if video:
      index = image_id if isinstance(image_id, int) else (
          int(image_id) if str(image_id).isdigit() else None)
      if index is None or not 0 <= index < len(names):
        raise InputError(f"{path}: image_id {image_id!r} is not a frame of {source} "
                         f"(frames 0 to {len(names) - 1})")
    else:
      given = os.path.normpath(str(image_id))
      index = next((lookup[k] for k in (str(image_id), given, os.path.basename(given))
                    if k in lookup), None)
      if index is None:
        raise InputError(f"{path}: image_id {image_id!r} names no frame of {source}")
    out.setdefault(index, []).extend(instances)
  return out


# ----------------------------------------------------------------------------
# Boxes and keypoints against a frame.
# ----------------------------------------------------------------------------


def parse_bbox(text: str) -> np.ndarray:
  try:
    box = np.asarray([float(v) for v in text.split(",")], dtype=np.float64)
  except ValueError:
    box = np.zeros(0)
  if box.shape != (4,) or not np.all(np.isfinite(box)):
    raise InputError(f"--bbox must be x0,y0,x1,y1 (4 numbers), got {text!r}")
  return box


def check_box(box, width: int, height: int, where: str) -> None:
  """A box must be finite, non-empty, overlap the frame, and not be absurdly large."""
  box = np.asarray(box, np.float64)
  if not np.all(np.isfinite(box)):
    raise InputError(f"{where}: box {box.tolist()} holds NaN or infinite values")
  x0, y0, x1, y1 = box
  if not (x1 > x0 and y1 > y0):
    raise InputError(f"{where}: box {np.round(box, 2).tolist()} is empty "
                     "(need x0 < x1 and y0 < y1)")
  if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
    raise InputError(f"{where}: box {np.round(box, 2).tolist()} lies outside the "
                     f"{width}x{height} image")
  if max(x1 - x0, y1 - y0) > FAR_OUTSIDE * max(width, height):
    raise InputError(f"{where}: box {np.round(box, 2).tolist()} is over {FAR_OUTSIDE:g} "
                     f"times the size of the {width}x{height} image")


def check_keypoints(kp, width: int, height: int, where: str, joint_names) -> None:
  """Keypoints must be finite and within ``FAR_OUTSIDE`` frame sizes of the frame."""
  kp = np.asarray(kp, np.float64)
  lo = -FAR_OUTSIDE * np.array([width, height])
  hi = (1 + FAR_OUTSIDE) * np.array([width, height])
  bad = ~np.isfinite(kp).all(-1) | (kp < lo).any(-1) | (kp > hi).any(-1)
  if bad.any():
    j = int(np.argmax(bad))
    raise InputError(f"{where}: joint {j} ({joint_names[j]}) at {kp[j].tolist()} is "
                     f"{'not finite' if not np.isfinite(kp[j]).all() else 'far outside'} "
                     f"the {width}x{height} image")


def frame_box(box, name: str, width: int, height: int, fallback, fallback_what: str,
              what: str = "--bbox"):
  """A frame's box: the given one, made square, else ``fallback``; either must
  overlap the frame."""
  if box is not None:
    check_box(box, width, height, f"{name}: {what}")
    return geometry.square_box(box)
  check_box(fallback, width, height, f"{name}: {fallback_what}")
  return fallback


def whole_frame_box(width: int, height: int) -> np.ndarray:
  """The whole frame, made square about its centre."""
  return geometry.square_box([0.0, 0.0, width - 1.0, height - 1.0])


def detection_crop_box(box) -> np.ndarray:
  """The 2D detector's square crop about a (tight) person box."""
  box = np.asarray(box, np.float64)
  centre = (box[:2] + box[2:]) / 2
  half = (box[2:] - box[:2]) * DETECTION_BOX_ENLARGE / 2
  return geometry.square_box(np.concatenate([centre - half, centre + half]))
