"""The progress line on stderr: tqdm, with a rate that leaves out compilation."""
from __future__ import annotations

import sys


class Progress:
  """``label  done/total  rate`` on one stderr line (tqdm).

  The bar appears after the first ``update`` (the first model call, which
  compiles): its rate counts only the frames after it, so a slow first call
  never shows as ``0.1 frames/s``.
  """

  def __init__(self, label: str, total: int | None, stream=None, unit: str = "frames"):
    self.label, self.total, self.unit = label, total, unit
    self.stream = stream or sys.stderr
    self.enabled = total is None or total > 1
    self.bar = None

  def update(self, done: int):
    if not self.enabled:
      return
    if self.bar is None:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self.bar = tqdm(total=self.total, initial=done, desc=self.label, unit=" " + self.unit,
                      file=self.stream, dynamic_ncols=True, leave=True, mininterval=0.5)
      self.bar.refresh()
    else:
      self.bar.update(done - self.bar.n)
    if self.total is not None and done >= self.total:
      self.close()

  def close(self):
    if self.bar is not None:
      self.bar.close()
      self.bar = None
