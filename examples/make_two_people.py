"""Regenerates the two-person example clip shipped in examples/two_people/ (no download).

    python examples/make_two_people.py    # writes examples/two_people/clip.mp4, keypoints.json

Two synthetic people (the renderer of the synthetic training set,
`data_prep/synthetic.py`) walk across one Human3.6M camera's view towards
each other, so that their paths cross; the frames are at a quarter of the
camera's resolution. `keypoints.json` is a COCO keypoint results file, as a
2D detector (mmpose, RTMPose, ViTPose, YOLO-pose) writes it: for each frame
(`image_id` = the frame index) and person, 17 COCO joints (x, y, score) and a
box. COCO has no head top, spine or pelvis; its eyes and ears are placed so
that the project's COCO -> Human3.6M mapping gives back the head top.
Deterministic: the same files every run. Try it after the README's quick start:

    capf-predict --checkpoint=/tmp/capf_synthetic --video=examples/two_people/clip.mp4 \
        --keypoints=examples/two_people/keypoints.json --keypoint_format=coco \
        --render=mp4 --output=/tmp/capf_two_people
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
from contextpose_jax import skeleton  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "two_people")
SEED, SPLIT, CAMERA = 0, "examples", 1
VIDEOS = (3, 7, 11)      # the people's synthetic motions (the example: the first two)
NUM_FRAMES = 24
FPS = 10.0
DOWNSCALE = 4
# Root x (mm) at the first and last frame, and depth (mm), of each person.
PATHS = (((-1400.0, 1400.0), 5200.0), ((1500.0, -1500.0), 6000.0), ((-600.0, 900.0), 7000.0))


def coco_from_h36m(h36m):
  """COCO-17 keypoints whose Human3.6M mapping (skeleton.coco_to_h36m) gives
  back the limbs, the nose and the head top of ``h36m`` (17, 2)."""
  thorax = (h36m[11] + h36m[14]) / 2
  eyes = (h36m[10] + skeleton.HEAD_TOP_EXTRAPOLATION * thorax) / (
      1 + skeleton.HEAD_TOP_EXTRAPOLATION)
  side = (h36m[11] - h36m[14]) * 0.12  # towards the person's left
  coco = np.zeros((17, 2))
  coco[0] = h36m[9]
  coco[1], coco[2] = eyes + side, eyes - side
  coco[3], coco[4] = eyes + 2.5 * side, eyes - 2.5 * side
  coco[[5, 7, 9, 11, 13, 15]] = h36m[[11, 12, 13, 4, 5, 6]]
  coco[[6, 8, 10, 12, 14, 16]] = h36m[[14, 15, 16, 1, 2, 3]]
  return coco


def paste_person(frame, background, pose_mm, rng):
  """Draws one person into the (downscaled) frame: the training renderer's
  crop, only where it differs from the background."""
  fx, fy, cx, cy = synthetic.CAMERAS[CAMERA][0]
  center, scale = geometry.box_to_center_scale(geometry.infer_box(pose_mm[0], fx, fy, cx, cy))
  matrix = geometry.affine_matrix(center, scale)
  crop = synthetic.render_crop(background, pose_mm, CAMERA, matrix, rng)
  low = matrix.copy()
  low[:, :2] *= 4.0
  empty = cv2.warpAffine(background, low, geometry.CROP_SIZE, flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REFLECT)
  mask = (np.abs(crop.astype(int) - empty.astype(int)).sum(-1) > 12).astype(np.uint8) * 255
  to_frame = np.vstack([geometry.affine_matrix(center, scale, inverse=True), [0, 0, 1]])
  down = np.diag([1.0 / DOWNSCALE, 1.0 / DOWNSCALE, 1.0])
  size = frame.shape[1::-1]
  warp = (down @ to_frame)[:2]
  person = cv2.warpAffine(crop, warp, size, flags=cv2.INTER_AREA)
  alpha = cv2.warpAffine(mask, warp, size, flags=cv2.INTER_AREA)[..., None] / 255.0
  frame[:] = np.round(frame * (1 - alpha) + person * alpha).astype(np.uint8)
  return geometry.weak_project(pose_mm, fx, fy, cx, cy) / DOWNSCALE


def make_clip(output: str, people: int = 2, num_frames: int = NUM_FRAMES) -> None:
  """Writes ``output/clip.mp4`` and ``output/keypoints.json`` (1 to 3 people;
  the defaults make the shipped example)."""
  if not 1 <= people <= len(VIDEOS):
    raise ValueError(f"people={people}: 1 to {len(VIDEOS)}")
  w, h = synthetic.CAMERAS[CAMERA][1]
  background = synthetic._background(  # pylint: disable=protected-access
      np.random.default_rng([SEED, zlib.crc32(SPLIT.encode()), 0]), w, h)
  motions = []
  for video, ((x0, x1), depth) in zip(VIDEOS[:people], PATHS[:people]):
    poses = synthetic.video_poses(SEED, SPLIT, video, synthetic.VALIDATION_SUBJECTS[0],
                                  CAMERA, num_frames)
    poses = poses - poses[:, :1] + [0.0, 0.0, depth]   # root-relative, then placed
    poses[..., 1] += 250.0  # feet near the floor of the view
    for t in range(num_frames):
      poses[t, :, 0] += x0 + (x1 - x0) * t / (num_frames - 1)
    motions.append(poses)
  os.makedirs(output, exist_ok=True)
  size = (w // DOWNSCALE, h // DOWNSCALE)
  writer = cv2.VideoWriter(os.path.join(output, "clip.mp4"),
                           cv2.VideoWriter_fourcc(*"mp4v"), FPS, size)
  results = []
  for t in range(num_frames):
    frame = cv2.resize(background, size, interpolation=cv2.INTER_AREA)
    # The farther person first: the nearer one is drawn over it.
    order = sorted(range(len(motions)), key=lambda k: -motions[k][t, 0, 2])
    for k in order:
      kp = paste_person(frame, background, motions[k][t], np.random.default_rng([SEED, k, t]))
      coco = coco_from_h36m(kp)
      lo, hi = coco.min(0) - 4, coco.max(0) + 4
      results.append({
          "image_id": t, "category_id": 1, "score": 0.95,
          "keypoints": np.round(np.concatenate([coco, np.full((17, 1), 0.9)], 1), 2)
                         .ravel().tolist(),
          "bbox": np.round([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]], 2).tolist()})
    writer.write(frame)
  writer.release()
  with open(os.path.join(output, "keypoints.json"), "w") as f:
    json.dump(results, f)
    f.write("\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default=HERE, help="folder for clip.mp4 and keypoints.json")
  parser.add_argument("--people", type=int, default=2, help="1 to 3 (the example: 2)")
  parser.add_argument("--frames", type=int, default=NUM_FRAMES, help="clip length")
  args = parser.parse_args(argv)
  make_clip(args.output, args.people, args.frames)
  print(f"wrote {args.frames} frames to {args.output}/clip.mp4 and {args.output}/keypoints.json")


if __name__ == "__main__":
  main()
