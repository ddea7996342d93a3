"""Frame sources: one image, a folder of frames, a video; each frame decoded once.

``Frames.stream`` yields decoded frames in order from a reader thread that
keeps a few frames ahead of the model, so decoding overlaps detection and
lifting; it never holds more than ``ahead`` frames.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import sys
import threading
from typing import Iterator

import cv2
import numpy as np

from contextpose_jax import image_io
from contextpose_jax.predict.errors import InputError, as_input_error

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_image(path: str) -> np.ndarray:
  """An image file as uint8 RGB (H, W, 3); truncated or corrupt files are errors."""
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such image")
  with as_input_error(image_io.ImageError):
    return image_io.read_image(path)


@dataclasses.dataclass
class Frames:
  """Where the frames come from: image files, or a video read in order."""
  names: list            # per-frame names: file names, or 000000, 000001, ... for a video
  paths: list | None = None
  video: str | None = None
  fps: float | None = None
  # A container's frame count can be off by a few: without a keypoints file
  # to match, a video may end early (the missing names are then dropped).
  strict: bool = True
  decoded: int | None = None
  size: tuple | None = None  # a video's (width, height), as announced

  def __len__(self):
    return len(self.names)

  def __iter__(self) -> Iterator[tuple]:
    """(index, name, uint8 RGB frame), in order, decoded here."""
    return self._video_frames() if self.video else self._image_frames()

  def stream(self, ahead: int = 16) -> Iterator[tuple]:
    """As ``iter``, decoded by a reader thread up to ``ahead`` frames ahead."""
    items: queue.Queue = queue.Queue(maxsize=max(1, ahead))
    stop = threading.Event()
    done = object()

    def read():
      try:
        for item in self:
          while not stop.is_set():
            try:
              items.put(item, timeout=0.1)
              break
            except queue.Full:
              continue
          if stop.is_set():
            return
        items.put((done, None))
      except BaseException as e:  # pylint: disable=broad-except
        items.put((done, e))

    reader = threading.Thread(target=read, name="capf-predict-reader", daemon=True)
    reader.start()
    try:
      while True:
        item = items.get()
        if item[0] is done:
          if item[1] is not None:
            raise item[1]
          return
        yield item
    finally:
      stop.set()
      reader.join(timeout=5.0)

  def batches(self, batch_size: int) -> Iterator[list]:
    """Yields lists of (index, name, uint8 RGB frame), ``batch_size`` at a time."""
    batch = []
    for item in self:
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
    with quiet_native_stderr():
      capture = cv2.VideoCapture(self.video)
    try:
      i = 0
      while True:
        with quiet_native_stderr():
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
def quiet_native_stderr():
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
  """A video's frame names, rate and size; an unreadable video is one error."""
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such video")
  with quiet_native_stderr():
    capture = cv2.VideoCapture(path)
    try:
      ok = capture.isOpened()
      count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if ok else 0
      fps = float(capture.get(cv2.CAP_PROP_FPS)) if ok else 0.0
      size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
              int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))) if ok else None
      ok = ok and capture.read()[0]
    finally:
      capture.release()
  if not ok or count < 1:
    raise InputError(f"{path}: cannot be read as a video (corrupt, empty or unsupported)")
  return Frames(names=[f"{i:06d}" for i in range(count)], video=path,
                fps=fps if 0 < fps < 1000 else None,
                size=size if size and min(size) > 0 else None)


def match_frame(image_arg: str, frames) -> int | None:
  """The index of the entry of ``frames`` that names the image ``image_arg``:
  the same path, a path it ends with, the same file name, or the same stem
  (the first rule that picks exactly one entry); None if none does."""
  target = os.path.normpath(image_arg)
  stem = lambda f: os.path.splitext(os.path.basename(f))[0]
  rules = (lambda f: os.path.normpath(f) == target,
           lambda f: target.endswith(os.sep + os.path.normpath(f)),
           lambda f: os.path.basename(f) == os.path.basename(target),
           lambda f: stem(f) == stem(target))
  for rule in rules:
    hits = [i for i, f in enumerate(frames) if rule(str(f))]
    if len(hits) == 1:
      return hits[0]
  return None


def list_frames(image_arg: str, keypoints, frames, kp_path: str | None) -> list[str]:
  """Image paths: one per keypoint set, or (``keypoints=None``) all of a folder."""
  if os.path.isdir(image_arg):
    if frames is not None:
      paths = [os.path.join(image_arg, f) for f in frames]
      for f, p in zip(frames, paths):
        if not os.path.isfile(p):
          raise InputError(f"{kp_path}: frame {f!r} is not in {image_arg}")
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
                     f"({image_arg})" + ("" if frames is None else
                                         "; none of its 'frames' names this image"))
  return [image_arg]
