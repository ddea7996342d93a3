"""Regenerates the example frames and keypoints shipped in examples/ (no download).

    python examples/make_examples.py            # writes examples/frames/*.jpg, keypoints.json

Four frames of one synthetic person (the renderer of the synthetic training
set, `data_prep/synthetic.py`), seen by a Human3.6M camera, at a quarter of
the camera's resolution; `keypoints.json` holds their exact 2D joints in
Human3.6M order, in pixels of these frames. Deterministic: the same files
every run. Try them after the README's quick start:

    python -m contextpose_jax.predict --checkpoint=/tmp/capf_synthetic \
        --images=examples/frames --keypoints=examples/keypoints.json --output=/tmp/capf_out
"""
import argparse
import json
import os
import sys
import zlib

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from contextpose_jax import geometry  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
SEED, SPLIT, VIDEO, CAMERA = 0, "examples", 3, 1
FRAMES = (0, 10, 20, 30)
DOWNSCALE = 4  # frames at 1/4 of the camera's resolution: a few KB each
JPEG_QUALITY = 75


def render_frame(pose_mm, background, rng):
  """A whole (downscaled) frame: the training renderer's crop pasted back."""
  fx, fy, cx, cy = synthetic.CAMERAS[CAMERA][0]
  w, h = synthetic.CAMERAS[CAMERA][1]
  center, scale = geometry.box_to_center_scale(geometry.infer_box(pose_mm[0], fx, fy, cx, cy))
  crop = synthetic.render_crop(background, pose_mm, CAMERA,
                               geometry.affine_matrix(center, scale), rng)
  # crop -> full-resolution frame -> 1/DOWNSCALE; the background is the
  # renderer's own (already at 1/4 resolution), so the crop blends in.
  to_frame = np.vstack([geometry.affine_matrix(center, scale, inverse=True), [0, 0, 1]])
  down = np.diag([1.0 / DOWNSCALE, 1.0 / DOWNSCALE, 1.0])
  size = (w // DOWNSCALE, h // DOWNSCALE)
  frame = cv2.resize(background, size, interpolation=cv2.INTER_AREA)
  frame = cv2.warpAffine(crop, (down @ to_frame)[:2], size, dst=frame,
                         flags=cv2.INTER_AREA, borderMode=cv2.BORDER_TRANSPARENT)
  keypoints = geometry.weak_project(pose_mm, fx, fy, cx, cy) / DOWNSCALE
  return frame, keypoints


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default=HERE, help="folder for frames/ and keypoints.json")
  args = parser.parse_args(argv)
  w, h = synthetic.CAMERAS[CAMERA][1]
  poses = synthetic.video_poses(SEED, SPLIT, VIDEO, synthetic.VALIDATION_SUBJECTS[0], CAMERA,
                                max(FRAMES) + 1)
  background = synthetic._background(  # pylint: disable=protected-access
      np.random.default_rng([SEED, zlib.crc32(SPLIT.encode()), VIDEO]), w, h)
  frames_dir = os.path.join(args.output, "frames")
  os.makedirs(frames_dir, exist_ok=True)
  names, keypoints = [], []
  for t in FRAMES:
    rng = np.random.default_rng([SEED, VIDEO, t])
    frame, kp = render_frame(poses[t], background, rng)
    name = f"{t:06d}.jpg"
    cv2.imwrite(os.path.join(frames_dir, name), frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    names.append(name)
    keypoints.append(np.round(kp, 2).tolist())
  with open(os.path.join(args.output, "keypoints.json"), "w") as f:
    # Human3.6M joint order, pixels of these frames (x right, y down).
    json.dump({"frames": names, "keypoints": keypoints}, f)
    f.write("\n")
  print(f"wrote {len(names)} frames to {frames_dir} and {args.output}/keypoints.json")


if __name__ == "__main__":
  main()
