"""The run: frames -> instances -> 2D -> tracks -> smoothing -> lifting -> rows.

One streaming pass: each frame is decoded once (a reader thread keeps
frames ahead), its instances are detected and lifted in batches of
``--batch_size`` on that decoded frame, and rows are written as they come.
Only the frames still waiting for a batch (or for ``--smooth``'s later
frames) are held in memory.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from contextpose_jax import checkpoints
from contextpose_jax import geometry
from contextpose_jax import skeleton
from contextpose_jax import visualize
from contextpose_jax.api import Predictor
from contextpose_jax.predict import detections as dets
from contextpose_jax.predict import detect2d
from contextpose_jax.predict import lifting
from contextpose_jax.predict import render
from contextpose_jax.predict import sources
from contextpose_jax.predict import tracking
from contextpose_jax.predict import writers
from contextpose_jax.predict.errors import InputError, as_input_error
from contextpose_jax.predict.progress import Progress


def check_keypoint_format(keypoint_format: str | None, dataset: str) -> str:
  """The keypoint order to read, given the checkpoint's dataset."""
  if keypoint_format is None:
    return dataset
  allowed = ("h36m", "coco") if dataset == "h36m" else ("3dhp",)
  if keypoint_format not in allowed:
    raise InputError(f"--keypoint_format={keypoint_format}: this checkpoint "
                     f"({dets.ORDER_NAMES[dataset]}) takes keypoints in the "
                     f"{' or '.join(dets.ORDER_NAMES[a] for a in allowed)} order")
  return keypoint_format


def _read_model_config(path: str):
  if not os.path.exists(path):
    raise InputError(f"{path}: no such checkpoint directory")
  with as_input_error(checkpoints.ModelDirectoryError):
    return checkpoints.read_model_config(path)


def _load_predictor(path: str, fold_batch_norm: bool = True) -> Predictor:
  with as_input_error(checkpoints.ModelDirectoryError):
    return Predictor.load(path, fold_batch_norm=fold_batch_norm)


class Inputs:
  """What the user gave about the people, per frame: ``instances(i, name)``."""

  def __init__(self, mode: str, *, keypoints=None, scores=None, boxes=None,
               by_frame=None, bbox=None, box_what="--bbox"):
    self.mode = mode  # keypoints | coco_keypoints | detections | detect
    self.keypoints, self.scores, self.boxes = keypoints, scores, boxes
    self.by_frame, self.bbox, self.box_what = by_frame, bbox, box_what

  @property
  def multi(self) -> bool:
    return self.mode in ("coco_keypoints", "detections")

  @property
  def detecting(self) -> bool:
    return self.mode in ("detections", "detect")

  def instances(self, i: int) -> list:
    if self.mode == "keypoints":
      box = self.bbox if self.bbox is not None else (
          None if self.boxes is None else self.boxes[i])
      scores = (np.ones(skeleton.NUM_JOINTS) if self.scores is None else self.scores[i])
      return [dets.Instance(keypoints=self.keypoints[i], scores=scores, lift_box=box)]
    if self.mode == "detect":
      return [dets.Instance(box=self.bbox, lift_box=self.bbox)]
    return [dets.Instance(**vars(x)) for x in self.by_frame.get(i, ())]


def _frames_and_inputs(args, dataset: str, detector) -> tuple:
  """Every input checked before a model is loaded: (Frames, Inputs)."""
  bbox = dets.parse_bbox(args.bbox) if args.bbox is not None else None
  if args.detections is not None and args.keypoints is not None:
    raise InputError("give --detections (person boxes; 2D detected) or --keypoints "
                     "(2D given), not both")
  coco_results = args.keypoints is not None and dets.is_coco_results(args.keypoints)
  if args.keypoints is None:
    if detector is None and args.detector is None:
      if args.detections is not None:
        raise InputError("--detections gives person boxes; give --detector=DIR to find "
                         "their 2D keypoints")
      raise InputError("give the 2D keypoints (--keypoints=FILE) or a COCO backbone to "
                       "detect them (--detector=DIR)")
    if dataset != "h36m":
      raise InputError(f"--detector: COCO keypoints map to Human3.6M joints only; this "
                       f"checkpoint ({dets.ORDER_NAMES[dataset]}) needs --keypoints")
    if args.keypoint_format is not None:
      raise InputError("--keypoint_format describes a --keypoints file; none is given")
  if (args.detections is not None or coco_results) and bbox is not None:
    raise InputError("--bbox is one person's box; with "
                     + ("--detections" if args.detections else "COCO keypoint results")
                     + " every instance has its own")
  if args.propagate_box and (args.keypoints is not None or args.detections is not None):
    raise InputError("--propagate_box finds one person without --detections or "
                     "--keypoints; it cannot be combined with them")

  keypoints = names = boxes = scores = None
  if coco_results:
    if args.keypoint_format not in (None, "coco") or dataset != "h36m":
      raise InputError(f"{args.keypoints}: COCO keypoint results hold COCO-17 joints; "
                       "give --keypoint_format=coco (Human3.6M models only)")
  elif args.keypoints is not None:
    keypoint_format = check_keypoint_format(args.keypoint_format, dataset)
    keypoints, names, boxes, scores = dets.load_keypoints_and_scores(
        args.keypoints, keypoint_format)
  if (keypoints is not None and names is not None and len(keypoints) > 1
      and args.image and os.path.isfile(args.image)):
    k = sources.match_frame(args.image, names)
    if k is not None:  # --image and a file for several frames: the set that names it
      keypoints, names = keypoints[k:k + 1], [names[k]]
      boxes = None if boxes is None else boxes[k:k + 1]
      scores = None if scores is None else scores[k:k + 1]
  frames = _frames_of(args, keypoints, names, args.keypoints)

  if args.keypoints is not None and not coco_results:
    return frames, Inputs("keypoints", keypoints=keypoints, scores=scores, boxes=boxes,
                          bbox=bbox, box_what="--bbox" if bbox is not None else "bbox")
  if coco_results or args.detections is not None:
    path = args.keypoints if coco_results else args.detections
    results = dets.load_coco_results(path, "keypoints" if coco_results else "detections",
                                     min_score=args.min_score)
    if args.image and not os.path.isdir(args.image):  # one image: its own entries only
      keep = sources.match_frame(args.image, [str(k) for k in results])
      results = {} if keep is None else {frames.names[0]: list(results.values())[keep]}
    source = frames.video or args.images or args.image
    by_frame = dets.key_frames(results, path, frames.names, video=bool(frames.video),
                               source=source)
    return frames, Inputs("coco_keypoints" if coco_results else "detections",
                          by_frame=by_frame)
  return frames, Inputs("detect", bbox=bbox)


def _frames_of(args, keypoints, frame_names, kp_path) -> sources.Frames:
  if args.video:
    if frame_names is not None:
      raise InputError(f"{kp_path}: 'frames' pairs keypoints with a folder's images; a "
                       "video's keypoints are given in frame order")
    frames = sources.open_video(args.video)
    frames.strict = keypoints is not None
    if keypoints is not None and len(keypoints) != len(frames):
      raise InputError(f"{kp_path}: {len(keypoints)} keypoint sets for the {len(frames)} "
                       f"frames of {args.video}")
    return frames
  folder = args.images
  if folder is not None and not os.path.isdir(folder):
    raise InputError(f"{folder}: --images wants a folder "
                     f"({'a file' if os.path.exists(folder) else 'no such folder'}); "
                     "use --image for one image")
  paths = sources.list_frames(folder or args.image, keypoints, frame_names, kp_path)
  # Outputs are keyed by the frame as the keypoints file names it (camA/x.jpg
  # and camB/x.jpg stay apart), else by the image's file name.
  names = ([os.path.normpath(str(f)) for f in frame_names]
           if frame_names is not None and len(frame_names) == len(paths)
           else [os.path.basename(p) for p in paths])
  if len(set(names)) != len(names):
    twice = sorted({n for n in names if names.count(n) > 1})
    raise InputError(f"{kp_path}: frame {twice[0]!r} is named more than once")
  return sources.Frames(names=names, paths=paths)


def _check_detector(args, detector):
  if detector is None:
    detector = _load_predictor(args.detector)
    if not hasattr(detector, "detect_2d"):
      raise InputError(f"{args.detector}: this version's Predictor cannot detect 2D "
                       "keypoints (no detect_2d)")
    if not getattr(detector, "has_heatmap_head", True):
      raise InputError(f"{args.detector}: no COCO heatmap head; convert a COCO backbone "
                       "file with its head (docs/inference.md)")
  return detector


def run(args, detector=None) -> str:
  """Checks every input, predicts, writes ``args.output``; returns its path.

  ``detector``: an object with ``detect_2d(images)`` (keypoints (B, 17, 2) in
  crop pixels, COCO order; scores (B, 17)) used instead of loading
  ``--detector`` (tests inject one).
  """
  writers.check_output(args.output, args.overwrite)
  model_config = _read_model_config(args.checkpoint)
  dataset = model_config.get("dataset", "h36m")
  frames, inputs = _frames_and_inputs(args, dataset, detector)
  if args.propagate_box and not inputs.mode == "detect":
    raise InputError("--propagate_box needs --detector and no --keypoints / --detections")
  if inputs.detecting:
    detector = _check_detector(args, detector)
  predictor = _load_predictor(args.checkpoint, args.fold_batch_norm)
  if not predictor.has_lifter:
    raise InputError(f"{args.checkpoint}: holds only a backbone; give a CA-PF model "
                     "(a converted --kind=capf checkpoint or a training workdir)")
  progress = Progress("lift 3D", len(frames))
  try:
    with writers.output_directory(args.output, args.overwrite) as staging:
      _predict(args, frames, inputs, dataset, predictor, detector, staging, progress)
  finally:
    progress.close()  # ends the progress line before an error line
  return args.output


def _predict(args, frames, inputs, dataset, predictor, detector, staging, progress):
  pad = len(frames) > args.batch_size
  lifter = lifting.Lifter(predictor, batch_size=args.batch_size, flip_test=args.flip_test,
                          pad=pad, keypoint_box_enlarge=args.keypoint_box_enlarge)
  detect = (detect2d.Detector2D(detector, batch_size=1 if args.propagate_box else args.batch_size,
                                pad=pad and not args.propagate_box,
                                path=args.detector or "--detector")
            if inputs.detecting else None)
  tracker = (tracking.Tracker(args.track_iou, args.track_max_misses)
             if inputs.multi else None)
  smoother = tracking.Smoother(args.smooth)
  extra = {}
  if frames.video:
    extra = dict(video=np.asarray(os.path.basename(frames.video)),
                 fps=np.float32(frames.fps or 0.0))
  writer = writers.RowWriter(staging, frames.names, dataset=dataset, video=bool(frames.video),
                             detection=inputs.detecting, smoothed=args.smooth > 1, extra=extra)
  joint_names = (skeleton.H36M_JOINT_NAMES if dataset == "h36m"
                 else tuple(f"3dhp joint {j}" for j in range(skeleton.NUM_JOINTS)))
  stems = writers.unique_stems(frames.names)
  overlay = (render.OverlayVideo(os.path.join(staging, "overlay.mp4"),
                                 args.fps or frames.fps or 10.0, dataset=dataset,
                                 elev=args.elev, azim=args.azim)
             if args.render == "mp4" else None)
  warnings = lifting.Warnings()
  state = dict(released=0, empty=[], n_empty=0, propagated=None)

  def label(row):
    name = frames.names[row["frame_index"]]
    return f"{name} track {row['track_id']}" if inputs.multi else name

  def write(rows):
    for row in rows:
      warnings.suspect(label(row), row["reason"])
      if args.plot:
        stem = stems[row["frame_index"]]
        png = f"{stem}_{row['track_id']}.png" if inputs.multi else f"{stem}.png"
        visualize.plot_pose(os.path.join(staging, png), row["crop"], row["keypoints_2d_crop"],
                            row["keypoints_3d"], dataset=dataset, elev=args.elev,
                            azim=args.azim, title=label(row))
      del row["crop"]
    writer.append(rows)
    if overlay is not None:
      overlay.add_rows(rows)
    if rows:
      progress.update(min(state["released"], len(frames)))

  def release(ready):
    for (i, name, image), rows in ready:
      for row in rows:
        lifter.add(row, image, name)
      if overlay is not None:
        overlay.add_frame(i, image, len(rows))
      state["released"] += 1

  def lift_ready():
    release(smoother.ready())
    write(lifter.flush())

  def forward(item, instances):
    """A frame whose instances all have 2D: tracked, smoothed, lifted."""
    i, name, image = item
    h, w = image.shape[:2]
    if not instances:  # reported at the end: a count and the first few names
      state["n_empty"] += 1
      if len(state["empty"]) < 5:
        state["empty"].append(name)
    rows = []
    for inst in instances:
      dets.check_keypoints(inst.keypoints, w, h, f"{name}: keypoints", joint_names)
      extent = geometry.box_from_keypoints(inst.keypoints, 1.0)
      person_bbox = inst.box if inst.box is not None else inst.lift_box
      failed = None
      if inst.lift_box is None and inst.detection_box is not None and not _overlaps(
          geometry.box_from_keypoints(inst.keypoints, args.keypoint_box_enlarge), w, h):
        # Detected keypoints that miss the frame (a failed detection): lift in
        # the detector's own box; the row is flagged suspect.
        inst.lift_box = inst.detection_box
        failed = "the detected keypoints' box misses the frame (a failed detection?)"
      rows.append(dict(frame_index=i, keypoints=np.asarray(inst.keypoints, np.float64),
                       scores=inst.scores, coco=inst.coco, coco_scores=inst.coco_scores,
                       person_bbox=person_bbox, failed=failed,
                       score=inst.score, lift_box=inst.lift_box,
                       lift_box_what=inputs.box_what, detection_box=inst.detection_box,
                       track_box=inst.box if inst.box is not None else extent))
    ids = (tracker.update([r["track_box"] for r in rows]) if tracker is not None
           else [0] * len(rows))
    for row, track_id in zip(rows, ids):
      row["track_id"] = track_id
    smoother.push(item, rows, ended=tracker.ended if tracker is not None else ())
    lift_ready()

  def prepare(item):
    """The frame's instances, checked against it, with their detection boxes."""
    i, name, image = item
    h, w = image.shape[:2]
    instances = inputs.instances(i)
    for inst in instances:
      if inst.box is not None:
        where = f"{args.detections or args.keypoints or '--bbox'}: frame {name}"
        dets.check_box(inst.box, w, h, where)
      if inputs.detecting:
        if inputs.mode == "detect":
          start = (geometry.square_box(inst.box) if inst.box is not None
                   else dets.whole_frame_box(w, h))
          if inst.box is None:
            dets.check_box(start, w, h, f"{name}: the whole frame")
          inst.detection_box = (state["propagated"] if args.propagate_box
                                and state["propagated"] is not None else start)
          inst.start_box = start
        else:
          inst.detection_box = dets.detection_crop_box(inst.box)
    return instances

  # Frames waiting for their 2D, in order, each with the queue number of its
  # last instance: a frame goes on once the detector has done that many.
  pending = []

  def forward_detected(final=False):
    detect.flush(final)
    while pending and pending[0][2] <= detect.done:
      item, instances, _ = pending.pop(0)
      forward(item, instances)

  for item in frames.stream(ahead=2 * args.batch_size):
    instances = prepare(item)
    if detect is None:
      forward(item, instances)
    elif args.propagate_box:
      found = _detect_propagated(detect, item, instances[0], state, args.restart_score)
      forward(item, instances if found else [])
    else:
      last = detect.queued
      for inst in instances:
        last = detect.add(inst, item[2])
      pending.append((item, instances, last))
      forward_detected()
  if pending:
    forward_detected(final=True)
  smoother.finish()
  release(smoother.ready())
  write(lifter.flush(final=True))
  if overlay is not None:
    overlay.close()
  progress.update(len(frames))
  progress.close()
  warnings.close()
  if state["n_empty"]:
    shown = ", ".join(state["empty"]) + (", ..." if state["n_empty"] > 5 else "")
    print(f"warning: {state['n_empty']} of {len(frames)} frames have no person "
          f"({shown}); they have no rows in poses.npz", file=sys.stderr)
  arrays = writer.finish()
  if (args.plot and args.animation and not inputs.multi and writer.count > 1):
    visualize.animate_poses(os.path.join(staging, "skeleton.gif"),
                            np.asarray(arrays["keypoints_3d"]), dataset=dataset,
                            fps=args.fps or frames.fps or 10.0, elev=args.elev,
                            azim=args.azim,
                            titles=[frames.names[i] for i in arrays["frame_index"]])


def _overlaps(box, width: int, height: int) -> bool:
  x0, y0, x1, y1 = box
  return x1 > 0 and y1 > 0 and x0 < width and y0 < height


def _detect_propagated(detect, item, instance, state, restart_score):
  """Single-person tracking by detection: detect in the box propagated from
  the previous frame; if the scores collapse there, detect again in the
  start box (``--bbox`` or the whole frame). The next frame's box comes from
  this frame's keypoints. False: not found (the scores collapsed in both
  boxes), the frame gets no row."""
  _, _, image = item
  h, w = image.shape[:2]
  detect.detect([(instance, image)])
  if (state["propagated"] is not None
      and float(np.mean(instance.coco_scores)) < restart_score):
    instance.detection_box = instance.start_box
    detect.detect([(instance, image)])
  state["propagated"] = tracking.propagated_box(instance.coco, instance.coco_scores, w, h,
                                                restart_score)
  return float(np.mean(instance.coco_scores)) >= restart_score
