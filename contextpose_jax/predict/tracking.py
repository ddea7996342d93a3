"""Tracks across video frames, per-track smoothing, and the propagated box.

- ``Tracker``: greedy IoU matching of each frame's person boxes to the
  tracks' boxes, moved on by their last velocity (so two people whose paths
  cross keep their ids). A pair is matched when its IoU is at least
  ``IOU_THRESHOLD``, best pairs first; an unmatched box starts a new track
  (ids 0, 1, 2, ... in order of appearance); a track missed for more than
  ``max_misses`` frames ends, and its id is never reused.
- ``smooth_keypoints``: the centred moving average of one track's 2D.
- ``Smoother``: the same average per track, in a stream: a row is released
  once its track has ``window // 2`` later rows, or has ended.
- ``propagated_box``: the detection box of frame t+1 from the keypoints of
  frame t (single-person videos without detections).
"""
from __future__ import annotations

import collections

import numpy as np

from contextpose_jax import geometry

IOU_THRESHOLD = 0.3
MAX_MISSES = 10
# The propagated box: the keypoints' extent, enlarged (more than the
# lifter's 1.25: the person moves between frames).
PROPAGATE_ENLARGE = 1.5
# A propagated box wider than this many frame sides holds no person (a failed
# detection spread over its crop would otherwise grow it 1.5x every frame).
PROPAGATE_MAX_SIDE = 2.0


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


def iou(a, b) -> np.ndarray:
  """IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4): (N, M)."""
  a = np.asarray(a, np.float64).reshape(-1, 4)
  b = np.asarray(b, np.float64).reshape(-1, 4)
  lo = np.maximum(a[:, None, :2], b[None, :, :2])
  hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(hi - lo, 0, None), -1)
  area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), -1)
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


class Tracker:
  """Greedy IoU tracking (see the module docstring)."""

  def __init__(self, threshold: float = IOU_THRESHOLD, max_misses: int = MAX_MISSES):
    self.threshold, self.max_misses = threshold, max_misses
    self.tracks = {}  # id -> dict(box, velocity, misses)
    self.next_id = 0
    self.ended = []   # ids that ended at the last update

  def update(self, boxes) -> list[int]:
    """The track id of each of this frame's boxes (x0, y0, x1, y1)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    ids = list(self.tracks)
    predicted = np.array([t["box"] + t["velocity"] for t in self.tracks.values()]
                         ).reshape(-1, 4)
    scores = iou(predicted, boxes)
    out = [None] * len(boxes)
    used_tracks = set()
    for flat in np.argsort(-scores, axis=None, kind="stable"):
      t, b = np.unravel_index(flat, scores.shape)
      if scores[t, b] < self.threshold:
        break
      if t in used_tracks or out[b] is not None:
        continue
      used_tracks.add(t)
      out[b] = ids[t]
      track = self.tracks[ids[t]]
      gap = track["misses"] + 1
      track["velocity"] = (boxes[b] - track["box"]) / gap
      track["box"], track["misses"] = boxes[b], 0
    self.ended = []
    for t, track_id in enumerate(ids):
      if t not in used_tracks:
        track = self.tracks[track_id]
        track["misses"] += 1
        track["box"] = track["box"] + track["velocity"]
        if track["misses"] > self.max_misses:
          del self.tracks[track_id]
          self.ended.append(track_id)
    for b in range(len(boxes)):
      if out[b] is None:
        out[b] = self.next_id
        self.tracks[self.next_id] = dict(box=boxes[b], velocity=np.zeros(4), misses=0)
        self.next_id += 1
    return out


class Smoother:
  """Per-track centred moving average of 2D keypoints, in a stream.

  ``push(frame_item, rows)`` takes a frame's rows (dicts with ``track_id``
  and ``keypoints``) in frame order; ``ready()`` yields the frames whose
  rows can all be smoothed (each row's track has ``window // 2`` later rows,
  or has ended), in order. ``finish()`` ends every track. With ``window <= 1``
  every frame is ready at once. A row's window is its track's own rows
  (``smooth_keypoints`` on the track's sequence).
  """

  def __init__(self, window: int):
    self.half = window // 2 if window > 1 else 0
    self.frames = collections.deque()   # [item, rows]
    self.history = {}                   # track id -> deque of rows (unsmoothed, recent)
    self.ended = set()

  def push(self, item, rows, ended=()):
    for row in rows:
      row["_raw"] = np.asarray(row["keypoints"], np.float64)
      track = self.history.setdefault(row["track_id"], collections.deque())
      row["_pos"] = (track[-1]["_pos"] + 1) if track else 0
      track.append(row)
    self.ended.update(ended)
    self.frames.append((item, rows))

  def finish(self):
    self.ended.update(self.history)

  def _ready(self, row) -> bool:
    track = self.history.get(row["track_id"])
    if track is None:
      return True
    after = track[-1]["_pos"] - row["_pos"]
    return after >= self.half or row["track_id"] in self.ended

  def ready(self):
    while self.frames and all(self._ready(r) for r in self.frames[0][1]):
      item, rows = self.frames.popleft()
      for row in rows:
        self._smooth(row)
        track = self.history[row["track_id"]]
        if row["track_id"] in self.ended and track[-1] is row:  # the track is done
          del self.history[row["track_id"]]
      yield item, rows

  def _smooth(self, row):
    if not self.half:
      return
    track = self.history[row["track_id"]]
    first = track[0]["_pos"]
    i = row["_pos"] - first
    last = track[-1]["_pos"] - first
    # Symmetric shrink at the track's ends (frame i uses i - h .. i + h).
    h = min(self.half, row["_pos"], last - i if row["track_id"] in self.ended
            else self.half)
    window = [track[k]["_raw"] for k in range(i - h, i + h + 1)]
    row["keypoints_unsmoothed"] = row["_raw"]
    row["keypoints"] = np.mean(window, axis=0)
    # Keep only what later rows of the track can still need.
    while track and track[0]["_pos"] < row["_pos"] - self.half:
      track.popleft()


def propagated_box(coco_keypoints, scores, width: int, height: int,
                   min_score: float) -> np.ndarray | None:
  """The next frame's detection box from this frame's COCO keypoints (frame
  pixels): their extent enlarged by ``PROPAGATE_ENLARGE``, made square; None
  when the scores collapse (mean under ``min_score``), the box leaves the
  frame or grows past ``PROPAGATE_MAX_SIDE`` frame sides, so the caller starts
  again from its first box."""
  scores = np.asarray(scores, np.float64)
  if not np.isfinite(scores).all() or scores.mean() < min_score:
    return None
  box = geometry.box_from_keypoints(np.asarray(coco_keypoints, np.float64), PROPAGATE_ENLARGE)
  x0, y0, x1, y1 = box
  if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height or x1 - x0 < 8:
    return None
  if x1 - x0 > PROPAGATE_MAX_SIDE * max(width, height):
    return None
  return box
