"""``--render=mp4``: the overlay video, written frame by frame as rows come.

Each output frame is the input frame with every track's 2D skeleton in the
track's own colour (and its id), beside a square of 3D panels, one per track
in the frame (up to ``MAX_PANELS``, lowest ids first), each the track's
root-relative 3D skeleton seen from ``--elev`` / ``--azim`` (the root at the
panel's centre, scaled to fill it), in the same colour. Drawn with OpenCV (no matplotlib per frame) and written with
OpenCV's ``mp4v`` writer.
"""
from __future__ import annotations

import numpy as np

from contextpose_jax.predict.errors import InputError

# Tableau-like colours (RGB), one per track id (modulo).
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
MAX_PANELS = 4


def colour(track_id: int) -> tuple:
  return PALETTE[int(track_id) % len(PALETTE)]


def _bones(dataset: str):
  from contextpose_jax import visualize  # pylint: disable=import-outside-toplevel
  return [(p, c) for p, c, _ in visualize.bones(dataset)]


def project_3d(pose, elev: float, azim: float) -> np.ndarray:
  """(17, 3) camera-axes joints (x right, y down, z forward) -> (17, 2) view
  coordinates (x right, y down), turned by ``azim`` about the vertical axis
  and tilted by ``elev``, as the 3D plots' view."""
  a, e = np.deg2rad(azim + 90.0), np.deg2rad(elev)
  p = np.asarray(pose, np.float64)
  x = np.cos(a) * p[:, 0] - np.sin(a) * p[:, 2]
  depth = np.sin(a) * p[:, 0] + np.cos(a) * p[:, 2]
  y = np.cos(e) * p[:, 1] + np.sin(e) * depth
  return np.stack([x, y], -1)


class OverlayVideo:
  """Collects each frame's image and lifted rows; writes frames in order."""

  def __init__(self, path: str, fps: float, *, dataset: str, elev: float, azim: float):
    self.path, self.fps, self.elev, self.azim = path, fps, elev, azim
    self.bones = _bones(dataset)
    self.writer = None
    self.size = None
    self.waiting = {}   # frame index -> [image, rows expected, rows]
    self.order = []     # frame indices in release order
    self.frames = 0

  def add_frame(self, index: int, image, n_rows: int) -> None:
    self.waiting[index] = [image, n_rows, []]
    self.order.append(index)
    self._flush()

  def add_rows(self, rows) -> None:
    for row in rows:
      self.waiting[row["frame_index"]][2].append(
          (int(row["track_id"]), np.asarray(row["keypoints"]), np.asarray(row["keypoints_3d"])))
    self._flush()

  def _flush(self):
    while self.order and len(self.waiting[self.order[0]][2]) >= self.waiting[self.order[0]][1]:
      image, _, rows = self.waiting.pop(self.order.pop(0))
      self._write(image, sorted(rows, key=lambda r: r[0]))

  def _write(self, image, rows):
    import cv2  # pylint: disable=import-outside-toplevel
    if self.size is None:
      h, w = image.shape[:2]
      self.size = (w, h)
      self.writer = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*"mp4v"),
                                    float(self.fps), (w + h, h))
      if not self.writer.isOpened():
        raise InputError(f"{self.path}: OpenCV cannot write an mp4 video here (mp4v codec)")
    w, h = self.size
    left = image if image.shape[:2] == (h, w) else cv2.resize(image, (w, h))
    left = np.ascontiguousarray(left)
    thick = max(2, round(h / 240))
    for track_id, kp, _ in rows:
      c = colour(track_id)
      for p, q in self.bones:
        cv2.line(left, tuple(int(v) for v in kp[p]), tuple(int(v) for v in kp[q]), c, thick,
                 cv2.LINE_AA)
      top = kp.min(0)
      cv2.putText(left, str(track_id), (int(top[0]), max(int(top[1]) - 4, 10)),
                  cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, c, thick, cv2.LINE_AA)
    panel = np.full((h, h, 3), 255, np.uint8)
    shown = rows[:MAX_PANELS]
    grid = 1 if len(shown) <= 1 else 2
    cell = h // grid
    for k, (track_id, _, pose) in enumerate(shown):
      ox, oy = (k % grid) * cell, (k // grid) * cell
      cv2.rectangle(panel, (ox, oy), (ox + cell - 1, oy + cell - 1), (200, 200, 200), 1)
      view = project_3d(pose, self.elev, self.azim)
      radius = max(float(np.abs(view).max()), 1e-3) if np.isfinite(view).all() else 1.0
      px = np.nan_to_num(view / radius * (cell * 0.4)) + [ox + cell / 2, oy + cell / 2 + 6]
      c = colour(track_id)
      for p, q in self.bones:
        cv2.line(panel, tuple(int(v) for v in px[p]), tuple(int(v) for v in px[q]), c,
                 thick, cv2.LINE_AA)
      cv2.putText(panel, f"track {track_id}", (ox + 4, oy + 14), cv2.FONT_HERSHEY_SIMPLEX,
                  0.4, c, 1, cv2.LINE_AA)
    out = np.concatenate([left, panel], axis=1)
    self.writer.write(cv2.cvtColor(out, cv2.COLOR_RGB2BGR))
    self.frames += 1

  def close(self):
    self._flush()
    if self.writer is not None:
      self.writer.release()
