r"""3D poses from a user's own images and videos: ``capf-predict``.

    capf-predict --checkpoint=MODEL_DIR --image=frame.jpg --keypoints=frame_kp.json \
        [--bbox=x0,y0,x1,y1] --output=out/
    capf-predict --checkpoint=MODEL_DIR --detector=COCO_DIR --video=clip.mp4 \
        [--detections=boxes.json] [--smooth=5] --output=out/

One module per stage (docs/inference.md, docs/architecture.md):

- ``sources``: frames from an image, a folder or a video, decoded once, by a
  reader thread ahead of the model;
- ``detections``: what the user gives about the people: this project's
  keypoints files, COCO detection / keypoint results of any detector, boxes;
- ``detect2d``: 2D keypoints from a COCO backbone, in batches;
- ``tracking``: IoU tracks, per-track smoothing, the propagated box;
- ``lifting``: the official crop of each instance, lifted in batches;
- ``writers``: rows spooled as the run goes, ``poses.npz`` / ``poses.json``,
  the atomic output directory; ``render``: the ``--render=mp4`` overlay video;
- ``pipeline``: the one streaming pass; ``cli``: the flags (light imports:
  ``--help`` and argument errors come back before jax is imported).

The names of the earlier single module (``load_keypoints``, ``make_example``,
``read_image``, ``smooth_keypoints``, ...) stay importable from here; they
are looked up on first use, so importing this package is cheap.
"""
from __future__ import annotations

import importlib

from contextpose_jax.predict.cli import main, parse_flags
from contextpose_jax.predict.errors import InputError

_HOMES = {
    "sources": ("IMAGE_EXTENSIONS", "Frames", "read_image", "open_video", "list_frames",
                "match_frame"),
    "detections": ("KEYPOINT_FORMATS", "load_keypoints", "load_coco_results", "parse_bbox",
                   "check_box", "Instance"),
    "detect2d": ("Detector2D",),
    "lifting": ("make_example", "suspect_reason", "Lifter", "COLLAPSE_BOX_FRACTION",
                "COLLAPSE_FRAME_FRACTION", "MAX_WARNINGS"),
    "tracking": ("smooth_keypoints", "Tracker", "Smoother", "iou"),
    "writers": ("RowWriter", "check_output"),
    "pipeline": ("run", "check_keypoint_format"),
    "progress": ("Progress",),
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}

__all__ = ["main", "parse_flags", "InputError", *_WHERE]


def __getattr__(name):
  if name in _WHERE:
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
