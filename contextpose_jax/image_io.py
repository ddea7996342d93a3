"""Strict image decoding: a truncated or corrupt JPEG/PNG is an error.

OpenCV decodes a truncated JPEG without complaint (the missing rows come out
grey) and returns None for other failures. Here

- a JPEG must contain its end-of-image marker (FFD9) after the last scan;
  data after it (padding, camera trailers) is allowed;
- a PNG must contain its IEND chunk;
- anything else must be decodable by OpenCV;

and every failure is an `ImageError` (a ValueError) whose message names the
file: `PATH: truncated JPEG (no end-of-image marker)`.

  image = image_io.read_image(path)            # uint8 (H, W, 3) RGB
  image = image_io.decode_image(data, where)   # same, from encoded bytes
"""
from __future__ import annotations

import cv2
import numpy as np

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_PNG_IEND = b'\x00\x00\x00\x00IEND\xaeB`\x82'


class ImageError(ValueError):
  """An image file that cannot be read or decoded; the message names it."""


def _jpeg_complete(data: bytes) -> bool:
  """Whether the JPEG's marker structure reaches an EOI marker."""
  if data.endswith(b'\xff\xd9'):  # the common case, without a walk
    return True
  n = len(data)
  i = 2  # after SOI
  while True:
    i = data.find(b'\xff', i)
    if i < 0:
      return False
    while i < n and data[i] == 0xFF:  # fill bytes before a marker
      i += 1
    if i >= n:
      return False
    marker = data[i]
    i += 1
    if marker == 0xD9:
      return True
    if marker == 0x01 or 0xD0 <= marker <= 0xD7 or marker == 0x00:
      continue  # markers without a length
    if i + 2 > n:
      return False
    i += int.from_bytes(data[i:i + 2], 'big')
    if marker != 0xDA:
      continue
    # Entropy-coded data after SOS: FF is followed by 00 (stuffing), a
    # restart marker or FF (fill); anything else is the next marker.
    while True:
      j = data.find(b'\xff', i)
      if j < 0 or j + 1 >= n:
        return False
      following = data[j + 1]
      if following == 0x00 or 0xD0 <= following <= 0xD7:
        i = j + 2
      elif following == 0xFF:
        i = j + 1
      else:
        i = j
        break


def _png_complete(data: bytes) -> bool:
  """Whether the PNG's chunk structure reaches an IEND chunk."""
  if data.endswith(_PNG_IEND):
    return True
  n = len(data)
  i = len(_PNG_SIGNATURE)
  while i + 8 <= n:
    length = int.from_bytes(data[i:i + 4], 'big')
    kind = data[i + 4:i + 8]
    end = i + 12 + length  # length, type, data, CRC
    if end > n:
      return False
    if kind == b'IEND':
      return True
    i = end
  return False


def check_complete(data: bytes, where: str) -> None:
  """Raises ImageError if `data` is an empty, truncated JPEG or PNG."""
  if not data:
    raise ImageError(f'{where}: empty image file')
  if data.startswith(b'\xff\xd8'):
    if not _jpeg_complete(data):
      raise ImageError(f'{where}: truncated JPEG (no end-of-image marker)')
  elif data.startswith(_PNG_SIGNATURE):
    if not _png_complete(data):
      raise ImageError(f'{where}: truncated PNG (no IEND chunk)')


def decode_image(data: bytes, where: str = 'image', *, bgr: bool = False,
                 flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
  """Encoded image -> uint8 (H, W, 3) RGB (OpenCV's BGR if `bgr`).

  `where` names the source in errors (a path, or a record). `flags` are
  OpenCV's imread flags (e.g. add cv2.IMREAD_IGNORE_ORIENTATION, as the
  official loader's cv2.imread does).
  """
  check_complete(data, where)
  image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
  if image is None:
    raise ImageError(f'{where}: corrupt or unsupported image (cannot be '
                     'decoded)')
  if image.ndim == 2:  # flags without IMREAD_COLOR
    image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
  return image if bgr else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path: str, *, bgr: bool = False,
               flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
  """The image file `path` as uint8 (H, W, 3) RGB (BGR if `bgr`).

  Every failure (missing, unreadable, empty, truncated, corrupt) is an
  ImageError naming `path`.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise ImageError(f'{path}: cannot read ({e.strerror or e})') from None
  return decode_image(data, path, bgr=bgr, flags=flags)
