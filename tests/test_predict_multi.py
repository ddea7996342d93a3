"""capf-predict with several people: COCO results of any detector, tracks,
the propagated box, one streaming pass, bad input, and the output directory.

The clip is generated here: two figures of different colours and sizes
composited into one frame, walking towards each other so that their paths
cross. Models are tiny (inference_fixtures); 2D detection uses small
detectors written here with ``detect_2d`` as the COCO Predictor has it. The
3D of every person is checked against ``Predictor.predict`` on a crop built
by hand (the official affine written out as a formula).
"""
import json
import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from contextpose_jax import predict
from contextpose_jax import skeleton
from contextpose_jax.api import Predictor
from contextpose_jax.models import capf
import inference_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 160, 320
N_FRAMES = 16
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
# A standing person in COCO-17 order, (x, y) in units of its height about
# the mid-hip point: nose, eyes, ears, shoulders, elbows, wrists, hips,
# knees, ankles (left, right).
COCO_TEMPLATE = np.array([
    [0.0, -0.42], [0.03, -0.45], [-0.03, -0.45], [0.06, -0.43], [-0.06, -0.43],
    [0.12, -0.3], [-0.12, -0.3], [0.2, -0.15], [-0.2, -0.15], [0.24, 0.0], [-0.24, 0.0],
    [0.07, 0.0], [-0.07, 0.0], [0.08, 0.25], [-0.08, 0.25], [0.08, 0.5], [-0.08, 0.5]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  best, _, config = inference_fixtures.make_workdir(str(root / "workdir"))
  converted = root / "converted"
  capf.save_variables(str(converted), best, config.model)
  return converted


def _people(t, n=N_FRAMES):
  """(COCO keypoints (17, 2), colour, box) of the two people in frame t."""
  a = t / (n - 1)
  out = []
  for cx, cy, height, colour in ((50 + 220 * a, 78.0, 96.0, (230, 40, 40)),
                                 (270 - 220 * a, 84.0, 110.0, (40, 60, 230))):
    kp = COCO_TEMPLATE * height + [cx, cy]
    lo, hi = kp.min(0) - 6, kp.max(0) + 6
    out.append((kp, colour, np.concatenate([lo, hi])))
  return out


def _frame(t, seed=0):
  rng = np.random.default_rng(seed + t)
  small = rng.integers(60, 140, (H // 8, W // 8, 3), dtype=np.uint8)
  frame = cv2.resize(small, (W, H), interpolation=cv2.INTER_LINEAR)
  for _, colour, box in _people(t):
    x0, y0, x1, y1 = box.astype(int)
    cv2.rectangle(frame, (x0 + 8, y0 + 4), (x1 - 8, y1 - 4), colour, -1)
  return frame


_write_video = inference_fixtures.write_video
_decoded = inference_fixtures.decoded


def _xywh(box):
  return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]


def _run(*args, detector=None):
  return predict.main([str(a) for a in args], detector=detector)


def _strict_json(path):
  """poses.json parsed with NaN / Infinity refused (valid JSON only)."""
  def refuse(token):
    raise ValueError(f"{path}: {token} is not JSON")
  return json.loads(path.read_text(), parse_constant=refuse)


def _reference_pose(predictor, frame, kp_px):
  """Single-person ``Predictor.predict`` on a crop made by hand: a square
  of 1.25 x the keypoints' extent about their centre, the official affine."""
  lo, hi = kp_px.min(0), kp_px.max(0)
  cx, cy = (lo + hi) / 2
  side = (hi - lo).max() * 1.25
  s = 191.0 / (side - 1)
  matrix = np.array([[s, 0, 95.5 - s * cx], [0, s, 127.5 - s * cy]])
  crop = cv2.warpAffine(frame, matrix, (192, 256), flags=cv2.INTER_LINEAR)
  image = ((crop / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
  h, w = frame.shape[:2]
  kp2d = (kp_px / w * 2 - [1, h / w]).astype(np.float32)
  kp_crop = (kp_px * s + [95.5 - s * cx, 127.5 - s * cy]).astype(np.float32)
  return predictor.predict(image[None], kp2d[None], kp_crop[None])[0, 0]


def _person_of(row_kp, t):
  """Which of the two people (0 or 1) a row's H36M keypoints are."""
  d = [np.abs(skeleton.coco_to_h36m(kp) - row_kp).max() for kp, _, _ in _people(t)]
  assert min(d) < 0.01, d
  return int(np.argmin(d))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  root = tmp_path_factory.mktemp("clip")
  video = root / "two_people.mp4"
  _write_video(video, [_frame(t) for t in range(N_FRAMES)])
  return video


def test_two_crossing_people_coco_keypoints_tracks_and_3d(model_dir, clip, tmp_path):
  """COCO keypoint results, two instances per frame (in a shuffled order),
  paths crossing: two tracks with stable ids, and each person's 3D is the
  single-person prediction on that person's crop."""
  rng = np.random.default_rng(0)
  results = []
  for t in range(N_FRAMES):
    entries = []
    for kp, _, box in _people(t):
      flat = np.concatenate([kp, np.full((17, 1), 0.9)], 1).ravel().tolist()
      entries.append({"image_id": t, "category_id": 1, "keypoints": flat, "score": 0.95,
                      "bbox": _xywh(box)})
    results += [entries[k] for k in rng.permutation(2)]
  (tmp_path / "kp.json").write_text(json.dumps(results))
  out = tmp_path / "out"
  assert _run(f"--checkpoint={model_dir}", f"--video={clip}",
              f"--keypoints={tmp_path / 'kp.json'}", "--keypoint_format=coco",
              "--batch_size=5", "--noplot", f"--output={out}") == 0

  got = np.load(out / "poses.npz")
  assert len(got["frame_index"]) == 2 * N_FRAMES
  np.testing.assert_array_equal(got["frame_index"], np.repeat(np.arange(N_FRAMES), 2))
  # Stable ids through the crossing: one id per person, never swapped.
  ids = {}
  for t, track, kp in zip(got["frame_index"], got["track_id"], got["keypoints_2d_px"]):
    ids.setdefault(_person_of(kp, t), set()).add(int(track))
  assert ids == {0: {ids[0].copy().pop()}, 1: {ids[1].copy().pop()}}
  assert ids[0] != ids[1] and ids[0] | ids[1] == {0, 1}

  frames = _decoded(clip)
  predictor = Predictor.load(str(model_dir))
  for t, kp, raw, pose, box in zip(got["frame_index"], got["keypoints_2d_px"],
                                   got["keypoints_3d_raw"], got["keypoints_3d"],
                                   got["person_bbox"]):
    want = _reference_pose(predictor, frames[t], kp.astype(np.float64))
    np.testing.assert_allclose(raw, want, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(pose, raw - raw[0], atol=1e-6)
    np.testing.assert_allclose(box, _people(t)[_person_of(kp, t)][2], atol=1e-6)
  np.testing.assert_allclose(got["scores_2d"], 0.9, atol=1e-6)

  record = _strict_json(out / "poses.json")
  assert "frames" not in record  # several people per frame: the rows only
  rows = record["instances"]
  assert len(rows) == 2 * N_FRAMES and rows[0]["frame"] == 0
  assert {r["track_id"] for r in rows} == {0, 1}
  np.testing.assert_allclose([r["keypoints_3d"] for r in rows], got["keypoints_3d"], atol=1e-4)


class TemplateDetector:
  """``detect_2d`` as the COCO Predictor: COCO_TEMPLATE filling the crop
  (crop pixels), scores 0.8; records each call's batch size."""

  def __init__(self):
    self.model_config = {"backbone": "hrnet_32"}
    self.calls = []

  def detect_2d(self, images):
    self.calls.append(len(images))
    kp = COCO_TEMPLATE * 200.0 + [95.5, 127.5]
    return np.repeat(kp[None], len(images), 0), np.full((len(images), 17), 0.8)


def test_coco_detections_two_per_frame_detected_in_batches(model_dir, clip, tmp_path,
                                                           capsys):
  """COCO detection results: person boxes (plus a low-score box and a
  non-person box, dropped), a frame with no detection (reported), 2D
  detected in batches in each box's crop and mapped back to the frame."""
  results = []
  for t in range(N_FRAMES):
    if t == 3:
      continue  # nobody detected in frame 3
    for _, _, box in _people(t):
      results.append({"image_id": t, "category_id": 1, "bbox": _xywh(box), "score": 0.9})
    results.append({"image_id": t, "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.1})
    results.append({"image_id": str(t), "category_id": 3, "bbox": [5, 5, 30, 30],
                    "score": 0.99})
  (tmp_path / "det.json").write_text(json.dumps(results))
  detector = TemplateDetector()
  out = tmp_path / "out"
  assert _run(f"--checkpoint={model_dir}", f"--video={clip}",
              f"--detections={tmp_path / 'det.json'}", "--detector=unused",
              "--batch_size=3", "--noplot", f"--output={out}", detector=detector) == 0
  err = capsys.readouterr().err
  assert "warning: 1 of 16 frames have no person (000003)" in err, err

  got = np.load(out / "poses.npz")
  n = 2 * (N_FRAMES - 1)
  assert len(got["frame_index"]) == n and 3 not in got["frame_index"]
  # Whole batches across frames (2 people, batch 3): only the last is padded.
  assert detector.calls == [3] * -(-n // 3), detector.calls
  for t, box, det_box, kp_coco, track in zip(got["frame_index"], got["person_bbox"],
                                             got["detection_bbox"],
                                             got["keypoints_2d_coco_px"], got["track_id"]):
    # The detector's crop: the box enlarged 1.25x about its centre, made square.
    centre = (box[:2] + box[2:]) / 2
    side = (box[2:] - box[:2]).max() * 1.25
    np.testing.assert_allclose(det_box, np.concatenate([centre - side / 2,
                                                        centre + side / 2]), atol=1e-6)
    # Crop pixels back to the frame: the inverse of the official affine.
    s = 191.0 / (side - 1)
    want = (COCO_TEMPLATE * 200.0 + [95.5, 127.5] - [95.5, 127.5]) / s + centre
    np.testing.assert_allclose(kp_coco, want, atol=1e-3)
    person = int(np.argmin([np.abs(b - box).max() for _, _, b in _people(t)]))
    assert track == {0: got["track_id"][0], 1: 1 - got["track_id"][0]}[person]
  np.testing.assert_allclose(got["scores_2d"], 0.8, atol=1e-6)
  rows = _strict_json(out / "poses.json")["instances"]
  assert {r["frame"] for r in rows} == set(range(N_FRAMES)) - {3}


class RedFigureDetector:
  """Finds the red figure in a crop (normalized as HRNet's input) and puts
  COCO_TEMPLATE on its extent; nothing red: scores 0.05."""

  def __init__(self):
    self.model_config = {"backbone": "hrnet_32"}

  def detect_2d(self, images):
    rgb = np.asarray(images) * IMAGENET_STD + IMAGENET_MEAN
    kps, scores = [], []
    for img in rgb:
      mask = (img[..., 0] > 0.7) & (img[..., 1] < 0.3) & (img[..., 2] < 0.3)
      if mask.sum() < 4:
        kps.append(np.zeros((17, 2)))
        scores.append(np.full(17, 0.05))
        continue
      ys, xs = np.nonzero(mask)
      height = ys.max() - ys.min() + 1
      kps.append(COCO_TEMPLATE / 0.95 * height + [(xs.min() + xs.max()) / 2,
                                                  (ys.min() + ys.max()) / 2 + 0.04 * height])
      scores.append(np.full(17, 0.9))
    return np.stack(kps), np.stack(scores)


def test_propagated_box_follows_one_person_across_a_wide_frame(model_dir, tmp_path, capsys):
  """--propagate_box: after the first (whole-frame) detection each frame is
  detected in the box of the previous frame's keypoints; the person walks
  across a 640-pixel frame, vanishes for a frame (the scores collapse: the
  next frame starts again from the whole frame) and is found again."""
  n, gone = 24, 14
  xs = np.linspace(40, 600, n)
  frames = []
  for t in range(n):
    f = np.full((120, 640, 3), 90, np.uint8)
    if t != gone:
      x = int(xs[t])
      cv2.rectangle(f, (x - 9, 30), (x + 9, 90), (255, 0, 0), -1)
    frames.append(f)
  folder = tmp_path / "frames"
  folder.mkdir()
  for t, f in enumerate(frames):
    assert cv2.imwrite(str(folder / f"{t:03d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
  out = tmp_path / "out"
  assert _run(f"--checkpoint={model_dir}", f"--images={folder}", "--propagate_box",
              "--detector=unused", "--noplot", f"--output={out}",
              detector=RedFigureDetector()) == 0
  got = np.load(out / "poses.npz")
  err = capsys.readouterr().err
  assert f"warning: 1 of {n} frames have no person (014.png)" in err, err
  assert got["frame_index"].tolist() == [t for t in range(n) if t != gone]
  whole = np.array([0.0, -260.0, 639.0, 379.0])  # 640 x 120, made square
  for t, box, kp in zip(got["frame_index"], got["detection_bbox"], got["keypoints_2d_px"]):
    if t in (0, gone + 1):  # the start; the restart after the collapse
      np.testing.assert_allclose(box, whole, atol=1e-6)
    else:
      assert box[2] - box[0] < 150, (t, box)  # a box about the person, not the frame
      assert abs((box[0] + box[2]) / 2 - xs[t]) < 30, (t, box, xs[t])
    assert abs(kp[0, 0] - xs[t]) < 4, (t, kp[0], xs[t])  # the pelvis
  assert set(got["track_id"].tolist()) == {0}


def _long_video(path, n):
  """n small frames (64 x 48) of a figure walking, and COCO detection
  results for it in every 5th frame (the others: no person)."""
  frames, results = [], []
  for t in range(n):
    f = np.full((48, 64, 3), 80, np.uint8)
    x = 20 + 24 * (t % 100) / 99
    cv2.rectangle(f, (int(x) - 4, 10), (int(x) + 4, 40), (220, 60, 60), -1)
    frames.append(f)
    if t % 5 == 0:
      results.append({"image_id": t, "bbox": [x - 8, 8, 16, 34], "score": 0.9,
                      "category_id": 1})
  _write_video(path, frames, fps=30.0)
  return results


class MemoryProbe(TemplateDetector):
  """A TemplateDetector that samples the Python heap (tracemalloc: numpy
  buffers included) at each call from its ``start``-th on (after the
  model's compilation)."""

  def __init__(self, start):
    super().__init__()
    self.start, self.samples = start, []

  def detect_2d(self, images):
    import tracemalloc
    if len(self.calls) == self.start:
      tracemalloc.start()
    if len(self.calls) >= self.start:
      self.samples.append(tracemalloc.get_traced_memory()[0])
    return super().detect_2d(images)


def test_memory_stays_flat_on_a_3000_frame_video(model_dir, tmp_path, capsys):
  """From frame ~500 to frame 3,000 the heap does not grow: frames, crops
  and rows are not kept (rows go to disk). One box per 5 frames; the 2D
  detector is called once per 32 boxes (160 frames)."""
  import tracemalloc
  n = 3000
  (tmp_path / "det.json").write_text(json.dumps(_long_video(tmp_path / "v.mp4", n)))
  probe = MemoryProbe(start=3)
  try:
    assert _run(f"--checkpoint={model_dir}", f"--video={tmp_path / 'v.mp4'}",
                f"--detections={tmp_path / 'det.json'}", "--detector=unused",
                "--batch_size=32", "--smooth=5", "--noplot",
                f"--output={tmp_path / 'out'}", detector=probe) == 0
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  got = np.load(tmp_path / "out" / "poses.npz")
  assert got["frame_index"].tolist() == list(range(0, n, 5))
  assert f"{n - n // 5} of {n} frames have no person" in capsys.readouterr().err
  # Samples every 160 frames from frame ~500 (the first is tracemalloc's 0).
  assert len(probe.samples) == 16, probe.samples
  # A sample sees one batch of crops waiting (+19 MB) or not: compare the
  # lowest of the first and of the last five. Keeping the frames decoded
  # between the samples would add ~1.5 MB per sample, 15 MB over the run.
  assert min(probe.samples[-5:]) <= min(probe.samples[1:6]) + 1e6, probe.samples
  # A few batches of crops (float32 crops: 0.6 MB each); all 3,000 would be 2 GB.
  assert peak < 100e6, peak


def _coco_keypoint_results(frames):
  """COCO keypoint results of both people in each of ``frames``."""
  return [{"image_id": t, "category_id": 1, "score": 0.9,
           "keypoints": np.concatenate([kp, np.full((17, 1), 0.9)], 1).ravel().tolist()}
          for t in frames for kp, _, _ in _people(t)]


class InterruptingDetector(TemplateDetector):
  def detect_2d(self, images):
    if self.calls:
      raise KeyboardInterrupt  # Ctrl-C midway
    return super().detect_2d(images)


def test_interrupted_run_leaves_no_complete_looking_output(model_dir, clip, tmp_path, capsys):
  (tmp_path / "kp.json").write_text(json.dumps(_coco_keypoint_results(range(N_FRAMES))))
  (tmp_path / "det.json").write_text(json.dumps(
      [{"image_id": t, "bbox": _xywh(b), "score": 0.9} for t in range(N_FRAMES)
       for _, _, b in _people(t)]))
  base = [f"--checkpoint={model_dir}", f"--video={clip}", "--noplot", "--batch_size=4"]
  assert _run(*base, f"--detections={tmp_path / 'det.json'}", "--detector=unused",
              f"--output={tmp_path / 'out'}", detector=InterruptingDetector()) == 130
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error")]
  assert err == ["error: interrupted (Ctrl-C); nothing was written"], err
  assert sorted(os.listdir(tmp_path)) == ["det.json", "kp.json"]  # no output, no staging

  # An interrupted --overwrite keeps the earlier output as it was.
  assert _run(*base, f"--keypoints={tmp_path / 'kp.json'}", "--keypoint_format=coco",
              f"--output={tmp_path / 'out'}") == 0
  before = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}
  assert _run(*base, f"--detections={tmp_path / 'det.json'}", "--detector=unused",
              "--overwrite", f"--output={tmp_path / 'out'}",
              detector=InterruptingDetector()) == 130
  assert sorted(os.listdir(tmp_path)) == ["det.json", "kp.json", "out"]
  assert {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")} == before


def test_overwrite_replaces_only_an_earlier_output(model_dir, clip, tmp_path, capsys):
  (tmp_path / "kp.json").write_text(json.dumps(_coco_keypoint_results(range(N_FRAMES))))
  (tmp_path / "kp3.json").write_text(json.dumps(_coco_keypoint_results(range(3))))
  base = [f"--checkpoint={model_dir}", f"--video={clip}", "--noplot",
          "--keypoint_format=coco", f"--output={tmp_path / 'out'}"]
  assert _run(*base, f"--keypoints={tmp_path / 'kp.json'}") == 0
  capsys.readouterr()
  assert _run(*base, f"--keypoints={tmp_path / 'kp3.json'}") == 1
  err = capsys.readouterr().err.strip()
  assert err.endswith("out: already exists; choose a new --output directory "
                      "(or --overwrite to replace an earlier capf-predict output)"), err
  assert _run(*base, f"--keypoints={tmp_path / 'kp3.json'}", "--overwrite") == 0
  assert len(np.load(tmp_path / "out" / "poses.npz")["frame_index"]) == 6
  assert sorted(os.listdir(tmp_path)) == ["kp.json", "kp3.json", "out"]
  # Anything else is never replaced.
  other = tmp_path / "mine"
  other.mkdir()
  (other / "notes.txt").write_text("keep")
  capsys.readouterr()
  assert _run(*base[:-1], f"--keypoints={tmp_path / 'kp3.json'}", "--overwrite",
              f"--output={other}") == 1
  err = capsys.readouterr().err.strip()
  assert "mine: exists and is not a capf-predict output" in err and len(err.splitlines()) == 1
  assert os.listdir(other) == ["notes.txt"]


def _still(tmp_path):
  """One frame of the clip as a PNG, and H36M keypoints of person 0 in it."""
  assert cv2.imwrite(str(tmp_path / "f.png"), cv2.cvtColor(_frame(0), cv2.COLOR_RGB2BGR))
  return skeleton.coco_to_h36m(_people(0)[0][0])


BAD = {
    "detections_for_missing_frames": ("det", "det.json: image_id 99 is not a frame of"),
    "detection_box_outside_frame": ("det", "lies outside the 320x160 image"),
    "coco_keypoints_16_joints": ("coco", "'keypoints' has 48 numbers; expected 51"),
    "coco_keypoints_nan": ("coco", "joint 3 (left_ear) is not finite"),
    "keypoints_far_outside": ("file", "joint 4 ({}) at [1e+30, 1e+30] is far outside the "
                                      "320x160 image"),
    "bbox_infinite": ("file", "kp.json: 'bbox' of set 0 holds NaN or infinite values"),
    "detections_without_detector": ("det", "give --detector=DIR"),
    "bbox_with_detections": ("det", "--bbox is one person's box"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_nothing_written(model_dir, clip, tmp_path, capsys, case):
  kind, expect = BAD[case]
  work = tmp_path / "in"
  work.mkdir()
  kp = _still(work)
  args = [f"--checkpoint={model_dir}", f"--output={tmp_path / 'out'}", "--noplot"]
  detector = TemplateDetector()
  if kind == "det":
    boxes = [{"image_id": t, "bbox": _xywh(b), "score": 0.9} for t in range(N_FRAMES)
             for _, _, b in _people(t)]
    if case == "detections_for_missing_frames":
      boxes.append({"image_id": 99, "bbox": [10, 10, 50, 50], "score": 0.9})
    elif case == "detection_box_outside_frame":
      boxes.append({"image_id": 5, "bbox": [1000, 10, 50, 50], "score": 0.9})
    (work / "det.json").write_text(json.dumps(boxes))
    args += [f"--video={clip}", f"--detections={work / 'det.json'}"]
    if case == "detections_without_detector":
      detector = None
    else:
      args.append("--detector=unused")
    if case == "bbox_with_detections":
      args.append("--bbox=10,10,100,100")
  elif kind == "coco":
    results = _coco_keypoint_results(range(N_FRAMES))
    if case == "coco_keypoints_16_joints":
      results[7]["keypoints"] = results[7]["keypoints"][:48]
    else:
      results[7]["keypoints"][3 * 3] = float("nan")  # written as NaN, read back as NaN
    (work / "kp.json").write_text(json.dumps(results))
    args += [f"--video={clip}", f"--keypoints={work / 'kp.json'}", "--keypoint_format=coco"]
  else:
    record = {"keypoints": kp.tolist()}
    if case == "keypoints_far_outside":
      record["keypoints"][4] = [1e30, 1e30]
      expect = expect.format(skeleton.H36M_JOINT_NAMES[4])
    else:
      record["bbox"] = [-float("inf"), -float("inf"), float("inf"), float("inf")]
    (work / "kp.json").write_text(json.dumps(record))
    args += [f"--image={work / 'f.png'}", f"--keypoints={work / 'kp.json'}"]
  before = sorted(os.listdir(tmp_path))
  assert _run(*args, detector=detector) == 1
  err = capsys.readouterr().err.strip().splitlines()
  err = [e for e in err if not e.startswith("lift 3D")]  # the progress line
  assert len(err) == 1 and err[0].startswith("error: "), err
  assert expect in err[0], err
  assert sorted(os.listdir(tmp_path)) == before  # nothing half-written


def test_image_picks_its_set_and_paths_expand(model_dir, tmp_path, monkeypatch):
  """--image with a keypoints file for several frames takes the set that
  names it; ~ and $VARS in path flags are expanded."""
  folder = tmp_path / "frames"
  folder.mkdir()
  kps = []
  for t, name in enumerate(["a.png", "b.png", "c.png"]):
    assert cv2.imwrite(str(folder / name), cv2.cvtColor(_frame(t), cv2.COLOR_RGB2BGR))
    kps.append(skeleton.coco_to_h36m(_people(t)[1][0]))
  (tmp_path / "kp.json").write_text(json.dumps({"frames": ["a.png", "b.png", "c.png"],
                                                "keypoints": np.stack(kps).tolist()}))
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv("CAPF_TEST_FRAMES", str(folder))
  assert _run(f"--checkpoint={model_dir}", "--image=$CAPF_TEST_FRAMES/b.png",
              "--keypoints=~/kp.json", "--noplot", "--output=~/out") == 0
  got = np.load(tmp_path / "out" / "poses.npz")
  assert list(got["frames"]) == ["b.png"]
  np.testing.assert_allclose(got["keypoints_2d_px"][0], kps[1], atol=1e-4)
  record = _strict_json(tmp_path / "out" / "poses.json")
  assert list(record["frames"]) == ["b.png"] and record["instances"][0]["frame"] == "b.png"
  # poses.json: 0.1 mm.
  raw = np.asarray(record["instances"][0]["keypoints_3d_raw"])
  np.testing.assert_array_equal(raw, np.round(got["keypoints_3d_raw"][0].astype(np.float64), 4))


def test_frames_keyed_by_the_path_as_given(model_dir, tmp_path, capsys):
  """Two cameras' x.png (one keypoints file naming camA/x.png and camB/x.png)
  stay two frames: poses.npz, poses.json and the PNGs keep them apart; a
  file naming one frame twice is one line."""
  root = tmp_path / "cams"
  names = ["camA/x.png", "camB/x.png"]
  kps = []
  for t, name in enumerate(names):
    (root / os.path.dirname(name)).mkdir(parents=True)
    assert cv2.imwrite(str(root / name), cv2.cvtColor(_frame(3 * t), cv2.COLOR_RGB2BGR))
    kps.append(skeleton.coco_to_h36m(_people(3 * t)[0][0]))
  (tmp_path / "kp.json").write_text(json.dumps({"frames": names,
                                                "keypoints": np.stack(kps).tolist()}))
  out = tmp_path / "out"
  assert _run(f"--checkpoint={model_dir}", f"--images={root}", f"--keypoints={tmp_path / 'kp.json'}",
              f"--output={out}") == 0
  got = np.load(out / "poses.npz")
  assert list(got["frames"]) == names
  np.testing.assert_allclose(got["keypoints_2d_px"], np.stack(kps), atol=1e-4)
  record = _strict_json(out / "poses.json")
  assert [r["frame"] for r in record["instances"]] == names
  assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["camA__x.png",
                                                                       "camB__x.png"]

  # camA/./x.png is camA/x.png.
  (tmp_path / "twice.json").write_text(json.dumps({"frames": [names[0], "camA/./x.png"],
                                                   "keypoints": np.stack(kps).tolist()}))
  capsys.readouterr()
  assert _run(f"--checkpoint={model_dir}", f"--images={root}",
              f"--keypoints={tmp_path / 'twice.json'}", f"--output={tmp_path / 'o2'}") == 1
  assert capsys.readouterr().err.strip().splitlines() == [
      f"error: {tmp_path / 'twice.json'}: frame 'camA/x.png' is named more than once"]
  assert not (tmp_path / "o2").exists()


def test_help_and_argument_errors_import_no_heavy_module():
  script = textwrap.dedent("""
      import sys
      from contextpose_jax.predict import main
      assert main(["--help"]) == 0
      assert main(["--checkpoint=x", "--output=/tmp/never", "--smooth=4", "--image=a"]) == 1
      assert main(["--checkpoint=x"]) == 1
      heavy = ("jax", "flax", "cv2", "matplotlib", "tensorflow_datasets", "orbax")
      print("HEAVY", sorted(m for m in heavy if m in sys.modules))
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "HEAVY []" in proc.stdout, proc.stdout
  assert proc.stderr.splitlines() == ["error: --smooth must be 0 (off) or an odd number of "
                                      "frames, got 4", "error: --output is required (see --help)"]


def test_full_disk_is_one_line_and_leaves_nothing(model_dir, tmp_path):
  """A file-size limit (RLIMIT_FSIZE, as a full disk fails a write) while the
  outputs are written: one line, exit 1, no output, no staging folder."""
  _still(tmp_path)
  (tmp_path / "kp.json").write_text(json.dumps(
      {"keypoints": skeleton.coco_to_h36m(_people(0)[0][0]).tolist()}))
  script = textwrap.dedent(f"""
      import resource, sys
      resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
      from contextpose_jax.predict import main
      sys.exit(main(["--checkpoint={model_dir}", "--image={tmp_path / 'f.png'}",
                     "--keypoints={tmp_path / 'kp.json'}", "--compilation_cache=off",
                     "--output={tmp_path / 'out'}"]))
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=False,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 1, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and "File too large while writing" in lines[0], proc.stderr[-2000:]
  assert "nothing was written" in lines[0]
  assert sorted(os.listdir(tmp_path)) == ["f.png", "kp.json"]


def test_ids_kept_through_short_misses_and_smoothing_per_track(model_dir, clip, tmp_path):
  """Person 1 is missed in frames 5 and 6 (occluded): it keeps its id.
  --smooth=3 averages each track's own rows (smooth_keypoints on the track)."""
  results = [r for r in _coco_keypoint_results(range(N_FRAMES))
             if not (r["image_id"] in (5, 6) and _person_of(skeleton.coco_to_h36m(
                 np.reshape(r["keypoints"], (17, 3))[:, :2]), r["image_id"]) == 1)]
  rng = np.random.default_rng(3)
  for r in results:  # detector jitter, so that smoothing changes something
    kp = np.reshape(r["keypoints"], (17, 3))
    kp[:, :2] += rng.normal(0, 1.5, (17, 2))
    r["keypoints"] = kp.ravel().tolist()
  (tmp_path / "kp.json").write_text(json.dumps(results))
  out = tmp_path / "out"
  assert _run(f"--checkpoint={model_dir}", f"--video={clip}", "--smooth=3",
              f"--keypoints={tmp_path / 'kp.json'}", "--keypoint_format=coco",
              "--batch_size=8", "--noplot", f"--output={out}") == 0
  got = np.load(out / "poses.npz")
  assert len(got["frame_index"]) == 2 * N_FRAMES - 2
  assert sorted(set(got["track_id"].tolist())) == [0, 1]
  for track in (0, 1):
    rows = got["track_id"] == track
    frames = got["frame_index"][rows]
    raw = got["keypoints_2d_px_unsmoothed"][rows]
    # One person per track (the nearer of the two, through the jitter).
    people = {int(np.argmin([np.abs(skeleton.coco_to_h36m(p[0]) - k).mean()
                             for p in _people(t)])) for t, k in zip(frames, raw)}
    assert len(people) == 1, (track, people)
    assert len(frames) in (N_FRAMES, N_FRAMES - 2)
    np.testing.assert_allclose(got["keypoints_2d_px"][rows],
                               predict.smooth_keypoints(raw, 3), atol=1e-4)
  # The occluded person's track skips frames 5 and 6 and goes on with its id.
  short = [t for t in (0, 1) if (got["track_id"] == t).sum() == N_FRAMES - 2]
  assert len(short) == 1
  assert sorted(set(range(N_FRAMES)) - set(got["frame_index"][got["track_id"] == short[0]])) \
      == [5, 6]


def test_render_mp4_draws_each_track_in_its_colour(model_dir, clip, tmp_path):
  from contextpose_jax.predict import render
  (tmp_path / "kp.json").write_text(json.dumps(_coco_keypoint_results(range(N_FRAMES))))
  out = tmp_path / "out"
  assert _run(f"--checkpoint={model_dir}", f"--video={clip}", "--render=mp4",
              f"--keypoints={tmp_path / 'kp.json'}", "--keypoint_format=coco", "--noplot",
              f"--output={out}") == 0
  assert sorted(os.listdir(out)) == ["overlay.mp4", "poses.json", "poses.npz"]
  video = _decoded(out / "overlay.mp4")
  assert len(video) == N_FRAMES and video[0].shape == (H, W + H, 3)
  got = np.load(out / "poses.npz")
  for t in (0, N_FRAMES - 1):
    frame = video[t].astype(int)
    for track in (0, 1):
      rgb = np.array(render.colour(track))
      near = np.abs(frame - rgb).sum(-1) < 60
      assert near[:, :W].sum() > 30, (t, track)   # the 2D skeleton on the frame
      assert near[:, W:].sum() > 30, (t, track)   # its 3D panel
      # ... drawn where that track's keypoints are.
      kp = got["keypoints_2d_px"][(got["frame_index"] == t) & (got["track_id"] == track)][0]
      ys, xs = np.nonzero(near[:, :W])
      assert abs(np.median(xs) - kp[:, 0].mean()) < 15, (t, track)



def test_sigterm_is_one_line_and_leaves_nothing(model_dir, clip, tmp_path):
  """SIGTERM midway (the 2D detector's second call): exit 143, one line, no
  output and no staging folder."""
  (tmp_path / "det.json").write_text(json.dumps(
      [{"image_id": t, "bbox": _xywh(b), "score": 0.9} for t in range(N_FRAMES)
       for _, _, b in _people(t)]))
  script = textwrap.dedent(f"""
      import os, signal, sys
      sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
      from test_predict_multi import TemplateDetector
      from contextpose_jax.predict import main
      class Killed(TemplateDetector):
        def detect_2d(self, images):
          if self.calls:
            os.kill(os.getpid(), signal.SIGTERM)
          return super().detect_2d(images)
      sys.exit(main(["--checkpoint={model_dir}", "--video={clip}", "--detector=unused",
                     "--detections={tmp_path / 'det.json'}", "--batch_size=4", "--noplot",
                     "--compilation_cache=off", "--output={tmp_path / 'out'}"],
                    detector=Killed()))
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=False,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 143, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error")]
  assert lines == ["error: terminated (SIGTERM); nothing was written"], proc.stderr[-2000:]
  assert sorted(os.listdir(tmp_path)) == ["det.json"]


def test_shipped_two_person_example(model_dir, tmp_path):
  """examples/two_people: its COCO keypoint results pair two people with
  every frame of its clip, capf-predict tracks them through the crossing
  (each track walks one way), and make_two_people.py regenerates it."""
  import runpy
  folder = os.path.join(ROOT, "examples", "two_people")
  clip, keypoints = os.path.join(folder, "clip.mp4"), os.path.join(folder, "keypoints.json")
  assert os.path.getsize(clip) < 150_000
  out = tmp_path / "out"
  assert _run(f"--checkpoint={model_dir}", f"--video={clip}", f"--keypoints={keypoints}",
              "--keypoint_format=coco", "--noplot", f"--output={out}") == 0
  got = np.load(out / "poses.npz")
  assert len(got["frame_index"]) == 2 * 24 and sorted(set(got["track_id"])) == [0, 1]
  directions = set()
  for track in (0, 1):
    pelvis_x = got["keypoints_2d_px"][got["track_id"] == track][:, 0, 0]
    steps = np.diff(pelvis_x)
    assert len(pelvis_x) == 24 and (np.all(steps > 0) or np.all(steps < 0)), pelvis_x
    directions.add(bool(steps[0] > 0))
  assert directions == {True, False}  # one walks right, the other left: they cross
  runpy.run_path(os.path.join(ROOT, "examples", "make_two_people.py"),
                 run_name="not_main")["main"](["--output", str(tmp_path / "again")])
  with open(keypoints) as f:
    assert json.load(f) == json.loads((tmp_path / "again" / "keypoints.json").read_text())
  assert len(_decoded(tmp_path / "again" / "clip.mp4")) == 24


def test_failed_detection_is_flagged_not_a_crash(model_dir, tmp_path, capsys):
  """The detector finds nobody (all joints at the crop's corner, which lies
  outside a wide frame): the pose is lifted in the detection box and
  flagged suspect, with a warning; the run does not stop."""
  assert cv2.imwrite(str(tmp_path / "empty.png"), np.full((120, 640, 3), 90, np.uint8))
  out = tmp_path / "out"
  assert _run(f"--checkpoint={model_dir}", f"--image={tmp_path / 'empty.png'}",
              "--detector=unused", "--noplot", f"--output={out}",
              detector=RedFigureDetector()) == 0
  got = np.load(out / "poses.npz")
  assert got["suspect_keypoints"].tolist() == [True]
  np.testing.assert_allclose(got["bbox"][0], [0.0, -260.0, 639.0, 379.0])
  assert "warning: empty.png: the detected keypoints' box misses the frame" in \
      capsys.readouterr().err
  assert _strict_json(out / "poses.json")["instances"][0]["person_bbox"] is None


def test_propagated_box_does_not_grow_without_bound():
  """A failed detection spread over its whole crop (a detector that sees
  nobody) must not grow the propagated box 1.5x a frame until the lifter's
  crop is refused as 'over 10 times the size of the image' (seen with a
  random-weight detector): past 2 frame sides it restarts from the start box."""
  from contextpose_jax.predict import tracking  # pylint: disable=g-import-not-at-top
  w, h = 250, 250
  box = np.array([0.0, 0.0, 250.0, 250.0])   # the whole frame, the start box
  sides = []
  for _ in range(10):
    # Keypoints at the corners of the current box, scores high: "found".
    corners = np.array([[box[0], box[1]], [box[2], box[3]]] * 8 + [[box[0], box[3]]])
    nxt = tracking.propagated_box(corners, np.full(17, 0.9), w, h, min_score=0.3)
    if nxt is None:
      break
    np.testing.assert_allclose(nxt[2] - nxt[0], 1.5 * (box[2] - box[0]))
    box = nxt
    sides.append(box[2] - box[0])
  # 250 -> 375 -> 562.5, over 2 x 250: back to the start box.
  assert sides == [375.0]
  assert nxt is None
  # A box of twice the frame side is still followed.
  kp = np.array([[0.0, 0.0], [500.0 / 1.5, 500.0 / 1.5]] * 8 + [[0.0, 0.0]])
  assert tracking.propagated_box(kp, np.full(17, 0.9), w, h, 0.3) is not None


def test_progress_rate_leaves_out_the_first_call():
  """The rate counts the frames after the first model call (which compiles):
  8 frames in ~0.3 s after a 1.5 s first call is ~27 frames/s, not 16 / 1.8."""
  import io
  import re
  import time
  from tqdm import tqdm
  stream = io.StringIO()
  progress = predict.Progress("lift 3D", 32, stream=stream)
  time.sleep(1.5)          # the first call: compilation
  progress.update(8)
  time.sleep(0.3)
  progress.update(16)
  meter = tqdm.format_meter(**progress.bar.format_dict)
  rate = float(re.search(r"([\d.]+) ?frames/s", meter).group(1))
  assert 15 < rate <= 8 / 0.3 * 1.05, meter  # counting the first call: 16 / 1.8 = 8.9
  progress.update(32)
  assert progress.bar is None and "32/32" in stream.getvalue()


def test_cli_defaults_are_the_library_constants():
  """The CLI repeats three defaults so that --help imports no heavy module."""
  from contextpose_jax import geometry
  from contextpose_jax.predict import cli
  from contextpose_jax.predict import tracking
  assert cli.KEYPOINT_BOX_ENLARGE == geometry.KEYPOINT_BOX_ENLARGE
  assert (cli.IOU_THRESHOLD, cli.MAX_MISSES) == (tracking.IOU_THRESHOLD, tracking.MAX_MISSES)
  assert cli.KEYPOINT_FORMATS == predict.KEYPOINT_FORMATS
