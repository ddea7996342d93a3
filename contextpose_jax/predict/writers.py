"""The outputs: one row per (frame, instance), written as the run goes.

Rows are appended to spool files inside the staging directory (a raw file
per ``poses.npz`` field, a JSON line per row), so memory does not grow with
the video; ``finish`` assembles ``poses.npz`` and ``poses.json`` from them.
The staging directory becomes ``--output`` only when everything is written
(``output_directory``): an interrupted run leaves no output that looks
complete.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile

import numpy as np

from contextpose_jax import fileio
from contextpose_jax import skeleton
from contextpose_jax.predict.errors import InputError

OUTPUT_FILES = ("poses.npz", "poses.json")
OUTPUT_EXTENSIONS = (".png", ".gif", ".npz", ".json", ".mp4")
DISK_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
SPOOL = ".rows"
DECIMALS_3D = 4  # poses.json: metres to 0.1 mm (float32 noise is not data)


# ----------------------------------------------------------------------------
# The output directory.
# ----------------------------------------------------------------------------


def is_predict_output(path: str) -> bool:
  """An earlier capf-predict output: its poses.json and poses.npz, and only
  files it writes."""
  if not os.path.isdir(path) or os.path.islink(path):
    return False
  names = os.listdir(path)
  if not set(OUTPUT_FILES) <= set(names):
    return False
  if any(not n.endswith(OUTPUT_EXTENSIONS) or not os.path.isfile(os.path.join(path, n))
         for n in names):
    return False
  try:
    with open(os.path.join(path, "poses.json")) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(record, dict) and "joint_names" in record and "root_joint" in record


def check_output(output: str, overwrite: bool = False) -> None:
  """A new directory that can be created (or, with ``overwrite``, an earlier
  capf-predict output): checked before any model work."""
  if os.path.lexists(output):
    if not overwrite:
      raise InputError(f"{output}: already exists; choose a new --output directory "
                       "(or --overwrite to replace an earlier capf-predict output)")
    if not is_predict_output(output):
      raise InputError(f"{output}: exists and is not a capf-predict output "
                       "(poses.json, poses.npz and plots only); --overwrite replaces only those")
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


@contextlib.contextmanager
def output_directory(path: str, overwrite: bool = False):
  """Yields a staging directory that becomes ``path`` when the block succeeds.

  Without ``overwrite``, ``fileio.new_directory``. With it, an earlier
  output at ``path`` is moved aside, the new one moved in (two renames in
  one directory), then the old one removed. On any error (a full disk, an
  interrupt) the staging directory is removed and an earlier output is kept.
  A full disk is one InputError line.
  """
  try:
    if not (overwrite and os.path.lexists(path)):
      with fileio.new_directory(path) as staging:
        yield staging
        _drop_spool(staging)
      return
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    staging = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
      yield staging
      _drop_spool(staging)
      fileio.apply_umask(staging)
      old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(path) + "-", dir=parent)
      os.rename(path, os.path.join(old, "out"))
      try:
        os.rename(staging, path)
      except BaseException:
        os.rename(os.path.join(old, "out"), path)
        raise
      shutil.rmtree(old, ignore_errors=True)
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
  except OSError as e:
    if e.errno in DISK_ERRNOS:
      raise InputError(f"{path}: {e.strerror} while writing "
                       f"{os.path.basename(e.filename) if e.filename else 'the outputs'}; "
                       "nothing was written") from None
    raise


def _drop_spool(staging: str) -> None:
  shutil.rmtree(os.path.join(staging, SPOOL), ignore_errors=True)


# ----------------------------------------------------------------------------
# Rows.
# ----------------------------------------------------------------------------


def _json_list(a, decimals: int):
  """A nested list, rounded; non-finite values become null (valid JSON)."""
  a = np.asarray(a, np.float64)
  rounded = np.round(a, decimals)
  out = np.where(np.isfinite(rounded), rounded, np.nan).tolist()
  def clean(x):
    if isinstance(x, list):
      return [clean(v) for v in x]
    return None if x != x else x  # NaN -> null
  return clean(out)


class RowWriter:
  """Spools rows into ``directory``; ``finish`` writes poses.npz / poses.json.

  Field layout: see docs/inference.md ("Output"). ``detection``: rows
  carry the 2D detector's outputs; ``smoothed``: rows carry
  ``keypoints_unsmoothed``; ``video``: (file name, fps) for a video.
  """

  def __init__(self, directory: str, names, *, dataset: str, video: bool,
               detection: bool, smoothed: bool, extra: dict | None = None):
    self.directory, self.names, self.dataset = directory, names, dataset
    self.video, self.extra, self.detection = video, extra or {}, detection
    self.spool = os.path.join(directory, SPOOL)
    os.makedirs(self.spool)
    n = skeleton.NUM_JOINTS
    fields = [
        ("frame_index", (), np.int64, lambda r: r["frame_index"]),
        ("track_id", (), np.int32, lambda r: r["track_id"]),
        ("keypoints_3d", (n, 3), np.float32, lambda r: r["keypoints_3d"]),
        ("keypoints_3d_raw", (n, 3), np.float32, lambda r: r["keypoints_3d_raw"]),
        ("keypoints_2d_px", (n, 2), np.float32, lambda r: r["keypoints"]),
        ("scores_2d", (n,), np.float32, lambda r: r["scores"]),
        ("keypoints_2d", (n, 2), np.float32, lambda r: r["keypoints_2d"]),
        ("keypoints_2d_crop", (n, 2), np.float32, lambda r: r["keypoints_2d_crop"]),
        ("bbox", (4,), np.float64, lambda r: r["bbox"]),
        ("person_bbox", (4,), np.float64, lambda r: r["person_bbox"]),
        ("person_score", (), np.float32, lambda r: r["score"]),
        ("center", (2,), np.float64, lambda r: r["center"]),
        ("scale", (2,), np.float64, lambda r: r["scale"]),
        ("image_size", (2,), np.int64, lambda r: r["image_size"]),
        ("suspect_keypoints", (), np.bool_, lambda r: r["suspect"]),
    ]
    if detection:
      fields += [
          ("scores", (n,), np.float32, lambda r: r["scores"]),
          ("keypoints_2d_coco_px", (n, 2), np.float32, lambda r: r["coco"]),
          ("scores_coco", (n,), np.float32, lambda r: r["coco_scores"]),
          ("detection_bbox", (4,), np.float64, lambda r: r["detection_box"]),
      ]
    if smoothed:
      fields.append(("keypoints_2d_px_unsmoothed", (n, 2), np.float32,
                     lambda r: r.get("keypoints_unsmoothed", r["keypoints"])))
    self.fields = fields
    self.files = {name: open(os.path.join(self.spool, name + ".bin"), "wb")
                  for name, *_ in fields}
    self.json_lines = open(os.path.join(self.spool, "rows.jsonl"), "w")
    self.count = 0
    self.frames_seen = set()
    self.one_per_frame = True

  def append(self, rows) -> None:
    for row in rows:
      for name, shape, dtype, get in self.fields:
        value = get(row)
        if value is None:
          value = np.full(shape, np.nan)
        np.ascontiguousarray(np.broadcast_to(np.asarray(value, np.float64 if dtype != np.bool_ else bool), shape),
                             dtype).tofile(self.files[name])
      i = int(row["frame_index"])
      if i in self.frames_seen:
        self.one_per_frame = False
      self.frames_seen.add(i)
      name = self.names[i]
      record = {
          "frame": i if self.video else name,
          "frame_name": name,
          "track_id": int(row["track_id"]),
          "bbox": _json_list(row["bbox"], 2),
          "person_bbox": None if row["person_bbox"] is None else _json_list(row["person_bbox"], 2),
          "keypoints_2d": _json_list(row["keypoints"], 2),
          "scores_2d": _json_list(row["scores"], 4),
          "keypoints_3d": _json_list(row["keypoints_3d"], DECIMALS_3D),
          "keypoints_3d_raw": _json_list(row["keypoints_3d_raw"], DECIMALS_3D),
          "suspect": bool(row["suspect"]),
      }
      self.json_lines.write(json.dumps(record, allow_nan=False) + "\n")
      self.count += 1

  def _arrays(self):
    """The spooled fields, memory-mapped (zero rows: empty arrays)."""
    for f in self.files.values():
      f.close()
    for name, shape, dtype, _ in self.fields:
      path = os.path.join(self.spool, name + ".bin")
      if self.count == 0:
        yield name, np.zeros((0,) + shape, dtype)
      else:
        yield name, np.memmap(path, dtype=dtype, mode="r", shape=(self.count,) + shape)

  def finish(self) -> dict:
    """Writes poses.npz and poses.json; returns the memory-mapped arrays."""
    arrays = dict(self._arrays())
    frame_index = np.asarray(arrays["frame_index"])
    names = np.asarray(self.names)
    frames = names[frame_index] if len(frame_index) else np.zeros(0, names.dtype)
    root = skeleton.ROOT_JOINT[self.dataset]
    np.savez(os.path.join(self.directory, "poses.npz"), frames=frames,
             root_joint=np.int32(root), **arrays, **self.extra)
    self.json_lines.close()
    self._write_json(root)
    return arrays

  def _write_json(self, root: int) -> None:
    joint_names = (skeleton.H36M_JOINT_NAMES if self.dataset == "h36m"
                   else tuple(f"3dhp_{i}" for i in range(skeleton.NUM_JOINTS)))
    order = "Human3.6M" if self.dataset == "h36m" else "MPI-INF-3DHP"
    header = {
        "joint_names": list(joint_names),
        "root_joint": root,
        "units": (f"metres, rounded to 0.1 mm; keypoints_3d is root-relative (joint {root} = "
                  f"{'pelvis' if self.dataset == 'h36m' else 'pelvis (MPI-INF-3DHP joint 14)'}"
                  " at 0), keypoints_3d_raw is the model's output; camera axes: x right, "
                  f"y down, z forward; keypoints_2d / keypoints_2d_px in image pixels, "
                  f"{order} joint order; bbox x0, y0, x1, y1 pixels; null: not known"),
    }
    rows_path = os.path.join(self.spool, "rows.jsonl")
    with open(os.path.join(self.directory, "poses.json"), "w") as out:
      out.write(json.dumps(header, indent=1)[:-2] + ',\n "instances": [')
      with open(rows_path) as f:
        for k, line in enumerate(f):
          out.write(("," if k else "") + "\n  " + line.rstrip("\n"))
      out.write("\n ]")
      if self.one_per_frame:
        # The per-frame view of single-person runs (as earlier versions wrote it).
        out.write(',\n "frames": {')
        with open(rows_path) as f:
          for k, line in enumerate(f):
            r = json.loads(line)
            legacy = {"keypoints_3d": r["keypoints_3d"],
                      "keypoints_3d_raw": r["keypoints_3d_raw"],
                      "keypoints_2d_px": r["keypoints_2d"], "bbox": r["bbox"],
                      "suspect_keypoints": r["suspect"], "track_id": r["track_id"]}
            if self.detection:
              legacy["scores"] = r["scores_2d"]
            out.write(("," if k else "") + "\n  " + json.dumps(r["frame_name"]) + ": "
                      + json.dumps(legacy, allow_nan=False))
        out.write("\n }")
      out.write("\n}\n")


def unique_stems(names):
  """A file stem per frame name, unique, inside the output folder: the
  folders of a name given as a path are joined with '__' (`camA/x.jpg` ->
  `camA__x`, `../f/x.jpg` -> `up__f__x`)."""
  def flat(name):
    parts = os.path.normpath(name).split(os.sep)
    return "__".join("up" if p == ".." else p for p in parts if p not in ("", "."))
  stems = [os.path.splitext(flat(n))[0] for n in names]
  if len(set(stems)) != len(stems):  # a.jpg and a.png in one folder
    stems = [flat(n).replace(".", "_") for n in names]
  if len(set(stems)) != len(stems):
    stems = [f"{i:06d}_{stem}" for i, stem in enumerate(stems)]
  return stems
