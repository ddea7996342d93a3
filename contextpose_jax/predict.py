r"""3D poses from a user's own images: crop, lift, write joints and plots.

    python -m contextpose_jax.predict --checkpoint=converted/capf_hrnet_32 \
        --image=frame.jpg --keypoints=frame_kp.json [--bbox=x0,y0,x1,y1] \
        --output=out/

``--image`` is one image or a folder of frames; ``--keypoints`` holds the 2D
keypoints in image pixels (see ``load_keypoints`` for the JSON / npz layouts),
in the Human3.6M 17-joint order or, with ``--keypoint_format=coco``, in the
COCO-17 order (mapped by ``coco_to_h36m``). ``--output`` is a NEW directory:
``poses.npz`` and ``poses.json`` (root-relative 3D joints in metres, camera
axes: x right, y down, z forward) and one ``<frame>.png`` per frame (the crop
with the 2D skeleton beside the 3D skeleton). See docs/inference.md.

Each example is built as the training data is (``contextpose_jax/geometry.py``): the
official (center, scale) affine warp to 192x256, ``keypoints_2d`` normalized
by the full image size (``X / w * 2 - [1, h / w]``), ``keypoints_2d_crop``
through the same affine, and the crop normalized for the checkpoint's
backbone. The frozen backbone's BatchNorms are folded into its convolutions at
load time (``FoldedPredictor``; ``--no-fold_batch_norm`` to keep them): the
same numbers up to float rounding, and faster (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from typing import Sequence

import numpy as np

from contextpose_jax import fileio
from contextpose_jax import geometry
from contextpose_jax import skeleton
from contextpose_jax.api import Predictor
from contextpose_jax.models.folding import apply_folded, find_conv_bn_pairs, fold_batch_norm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

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
  from contextpose_jax.data import transforms  # pylint: disable=g-import-not-at-top
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


def read_image(path: str) -> np.ndarray:
  """An image file as uint8 RGB (H, W, 3)."""
  import cv2  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such image")
  image = cv2.imread(path, cv2.IMREAD_COLOR)
  if image is None:
    raise InputError(f"{path}: cannot be decoded as an image")
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@dataclasses.dataclass
class FoldedPredictor(Predictor):
  """A ``Predictor`` whose backbone BatchNorms are folded into the convs.

  Same ``predict`` / ``features`` (input checks, flip test) and, up to float
  rounding, the same numbers; faster on CPU (docs/benchmarks.md: the
  unfolded BatchNorm is an extra pass over every activation).
  """
  pairs: tuple = ()

  @classmethod
  def fold(cls, predictor: Predictor) -> "FoldedPredictor":
    from contextpose_jax.models import capf  # pylint: disable=g-import-not-at-top
    pairs = tuple(find_conv_bn_pairs(predictor.model, predictor.variables,
                                     *capf.dummy_inputs(1)))
    return cls(predictor.model, fold_batch_norm(predictor.variables, pairs),
               predictor.model_config, pairs)

  @functools.cached_property
  def _features_fn(self):
    import jax  # pylint: disable=g-import-not-at-top
    from contextpose_jax.models import capf  # pylint: disable=g-import-not-at-top
    return jax.jit(lambda v, x: apply_folded(self.model, v, x, pairs=self.pairs,
                                             method=capf.CAPF.features))

  @functools.cached_property
  def _predict_fn(self):
    import jax  # pylint: disable=g-import-not-at-top
    return jax.jit(lambda v, x, k, c: apply_folded(self.model, v, x, k, c, pairs=self.pairs))


# ----------------------------------------------------------------------------
# Frames: pairing images with keypoints.
# ----------------------------------------------------------------------------


def list_frames(image_arg: str, keypoints, frames, kp_path: str) -> list[str]:
  """Image paths, one per keypoint set."""
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
    if len(names) != len(keypoints):
      raise InputError(f"{kp_path}: {len(keypoints)} keypoint sets for the {len(names)} "
                       f"images in {image_arg} (add 'frames' to pair them by name)")
    return [os.path.join(image_arg, n) for n in names]
  if not os.path.isfile(image_arg):
    raise InputError(f"{image_arg}: no such image or folder")
  if len(keypoints) != 1:
    raise InputError(f"{kp_path}: {len(keypoints)} keypoint sets for one image "
                     f"({image_arg})")
  return [image_arg]


# ----------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------


def predict_frames(predictor, image_paths: Sequence[str], keypoints, boxes, *,
                   flip_test: bool, batch_size: int,
                   keypoint_box_enlarge: float = geometry.KEYPOINT_BOX_ENLARGE) -> dict:
  """Crops every frame and lifts it; returns a dict of per-frame arrays.

  Frames are read, cropped and lifted ``batch_size`` at a time, so a long
  folder never holds more than one batch of normalized crops in memory.
  """
  backbone = predictor.model_config.get("backbone", "hrnet_32")
  keys = ("crop", "keypoints_2d", "keypoints_2d_crop", "bbox", "center", "scale")
  out = {k: [] for k in keys + ("keypoints_3d",)}
  for start in range(0, len(image_paths), batch_size):
    examples = []
    for i in range(start, min(start + batch_size, len(image_paths))):
      path = image_paths[i]
      image = read_image(path)
      h, w = image.shape[:2]
      if boxes is not None:
        check_box(boxes[i], w, h, f"{path}: --bbox")
        box = geometry.square_box(boxes[i])
      else:
        box = geometry.box_from_keypoints(keypoints[i], keypoint_box_enlarge)
        check_box(box, w, h, f"{path}: the keypoints' box")
      example = make_example(image, keypoints[i], box, backbone)
      example["bbox"] = box
      examples.append(example)
    n = len(examples)
    # Pad to a whole batch: one compiled shape for any number of frames.
    if len(image_paths) > batch_size:
      examples += [examples[-1]] * (batch_size - n)
    stack = lambda key: np.stack([e[key] for e in examples])  # pylint: disable=cell-var-from-loop
    pose = predictor.predict(stack("image"), stack("keypoints_2d"),
                             stack("keypoints_2d_crop"), flip_test=flip_test)
    out["keypoints_3d"].append(pose[:n, 0].astype(np.float32))
    for k in keys:
      out[k].append(stack(k)[:n])
  return {k: np.concatenate(v) for k, v in out.items()}


def write_outputs(output_dir: str, image_paths, keypoints_px, result, *, dataset: str,
                  plot: bool, elev: float, azim: float) -> None:
  """Writes poses.npz, poses.json and the PNGs into a new ``output_dir`` atomically."""
  with fileio.new_directory(output_dir) as staging:
    names = [os.path.basename(p) for p in image_paths]
    np.savez(os.path.join(staging, "poses.npz"), frames=np.asarray(names),
             keypoints_3d=result["keypoints_3d"],
             keypoints_2d_px=np.asarray(keypoints_px, np.float32),
             keypoints_2d=result["keypoints_2d"],
             keypoints_2d_crop=result["keypoints_2d_crop"],
             bbox=result["bbox"], center=result["center"], scale=result["scale"])
    record = {
        "joint_names": list(skeleton.H36M_JOINT_NAMES),
        "units": "metres, root-relative (joint 0 = pelvis); camera axes: x right, "
                 "y down, z forward",
        "frames": {name: {"keypoints_3d": result["keypoints_3d"][i].round(6).tolist(),
                          "bbox": result["bbox"][i].round(3).tolist()}
                   for i, name in enumerate(names)},
    }
    with open(os.path.join(staging, "poses.json"), "w") as f:
      json.dump(record, f, indent=1)
    if plot:
      from contextpose_jax import visualize  # pylint: disable=g-import-not-at-top
      stems = _unique_stems(names)
      for i, stem in enumerate(stems):
        visualize.plot_pose(os.path.join(staging, stem + ".png"), result["crop"][i],
                            result["keypoints_2d_crop"][i], result["keypoints_3d"][i],
                            dataset=dataset, elev=elev, azim=azim, title=names[i])


def _unique_stems(names):
  stems = [os.path.splitext(n)[0] for n in names]
  if len(set(stems)) != len(stems):  # a.jpg and a.png in one folder
    stems = [n.replace(".", "_") for n in names]
  return stems


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


def run(args) -> str:
  """Checks every input, predicts, writes ``args.output``; returns its path."""
  from contextpose_jax.models import capf  # pylint: disable=g-import-not-at-top
  if os.path.exists(args.output):
    raise InputError(f"{args.output}: already exists; choose a new --output directory")
  if args.batch_size < 1:
    raise InputError(f"--batch_size must be >= 1, got {args.batch_size}")
  if not args.keypoint_box_enlarge > 0:
    raise InputError(f"--keypoint_box_enlarge must be > 0, got {args.keypoint_box_enlarge}")
  if not os.path.isdir(args.checkpoint):
    raise InputError(f"{args.checkpoint}: no such checkpoint directory")
  try:
    model_config = capf.load_model_config(args.checkpoint)
  except (FileNotFoundError, ValueError) as e:
    raise InputError(str(e)) from e
  dataset = model_config.get("dataset", "h36m")
  keypoint_format = check_keypoint_format(args.keypoint_format, dataset)
  keypoints, frames, boxes = load_keypoints(args.keypoints, keypoint_format)
  image_paths = list_frames(args.image, keypoints, frames, args.keypoints)
  if args.bbox is not None:
    boxes = np.broadcast_to(parse_bbox(args.bbox), (len(keypoints), 4))

  predictor = Predictor.load(args.checkpoint)
  if not predictor.has_lifter:
    raise InputError(f"{args.checkpoint}: holds only a backbone; convert a CA-PF "
                     "checkpoint (--kind=capf) to predict 3D poses")
  if args.fold_batch_norm:
    predictor = FoldedPredictor.fold(predictor)
  result = predict_frames(predictor, image_paths, keypoints, boxes,
                          flip_test=args.flip_test, batch_size=args.batch_size,
                          keypoint_box_enlarge=args.keypoint_box_enlarge)
  write_outputs(args.output, image_paths, keypoints, result, dataset=dataset,
                plot=args.plot, elev=args.elev, azim=args.azim)
  return args.output


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="python -m contextpose_jax.predict",
      description="Lift 2D keypoints on your own images to 3D with a converted CA-PF model.")
  parser.add_argument("--checkpoint", required=True,
                      help="a directory written by weights_conversion.convert --kind=capf")
  parser.add_argument("--image", required=True, help="an image, or a folder of frames")
  parser.add_argument("--keypoints", required=True,
                      help="JSON or npz with 'keypoints' (pixels), optional 'frames', 'bbox'")
  parser.add_argument("--keypoint_format", choices=KEYPOINT_FORMATS, default=None,
                      help="joint order of the keypoints: the checkpoint's own (h36m, or "
                      "3dhp for MPI-INF-3DHP models; the default) or coco (mapped to "
                      "Human3.6M, see coco_to_h36m)")
  parser.add_argument("--bbox", help="x0,y0,x1,y1 person box in pixels, for every frame "
                      "(overrides a 'bbox' in the keypoints file; made square, see "
                      "square_box); default: the keypoints' extent, enlarged")
  parser.add_argument("--keypoint_box_enlarge", type=float, default=geometry.KEYPOINT_BOX_ENLARGE,
                      help="box side / keypoints' extent when no box is given")
  parser.add_argument("--output", required=True, help="new directory to write")
  parser.add_argument("--flip_test", action=argparse.BooleanOptionalAction, default=False,
                      help="average with the prediction on the mirrored input")
  parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                      help="write a PNG per frame")
  parser.add_argument("--elev", type=float, default=15.0, help="3D view elevation (degrees)")
  parser.add_argument("--azim", type=float, default=-70.0, help="3D view azimuth (degrees)")
  parser.add_argument("--batch_size", type=int, default=8, help="frames per model call")
  parser.add_argument("--fold_batch_norm", action=argparse.BooleanOptionalAction,
                      default=True, help="fold the backbone's BatchNorms into its convs "
                      "at load time (same numbers up to rounding; faster)")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    out = run(args)
  except (InputError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
