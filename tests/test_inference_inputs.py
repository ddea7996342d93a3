"""The predict CLI's inputs: every model directory layout, 2D detection,
videos and folders, smoothing, bad input and suspect keypoints.

Models are tiny (inference_fixtures): a training workdir written the way the
trainer writes it, and a converter output of the same variables. 2D detection
uses a fake detector (``detect_2d`` as the real COCO Predictor has it) injected
through ``predict.main(..., detector=...)``.
"""
import json
import os

from absl import flags
import cv2
import jax
import numpy as np
import pytest

from contextpose_jax import checkpoints
from contextpose_jax import compiler_options
from contextpose_jax import geometry
from contextpose_jax import predict
from contextpose_jax import skeleton
from contextpose_jax.api import Predictor
from contextpose_jax.models import capf
import inference_fixtures

H, W = 240, 320


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  workdir = root / "workdir"
  best, latest, config = inference_fixtures.make_workdir(str(workdir), best_step=3,
                                                         latest_step=5)
  converted = root / "converted"
  capf.save_variables(str(converted), best, config.model)
  return dict(workdir=workdir, converted=converted, best=best, latest=latest,
              config=config, root=root)


def _frame(seed):
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 255, (H // 8, W // 8, 3), dtype=np.uint8)
  frame = cv2.resize(small, (W, H), interpolation=cv2.INTER_LINEAR)
  cv2.rectangle(frame, (W // 2 - 20, H // 4), (W // 2 + 20, 3 * H // 4), (240, 200, 40), -1)
  return frame


def _person(seed, cx=160.0, cy=125.0, height=160.0):
  """17 Human3.6M-order keypoints (pixels) of a standing person."""
  y = np.array([0.0, 0.0, 0.25, 0.48, 0.0, 0.25, 0.48, -0.12, -0.25, -0.32, -0.4,
                -0.24, -0.1, 0.02, -0.24, -0.1, 0.02])
  x = np.array([0.0, -0.06, -0.06, -0.06, 0.06, 0.06, 0.06, 0.0, 0.0, 0.0, 0.0,
                0.1, 0.14, 0.16, -0.1, -0.14, -0.16])
  kp = np.stack([cx + x * height, cy + y * height], -1)
  return kp + np.random.default_rng(seed).normal(0, 2.0, kp.shape)


def _write_png(path, rgb):
  assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _run(*args, detector=None):
  return predict.main([str(a) for a in args], detector=detector)


def _same_tree(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


# ----------------------------------------------------------------------------
# One loader for every model directory.
# ----------------------------------------------------------------------------


def test_workdir_and_converted_output_are_the_same_model(models, tmp_path):
  from_workdir = Predictor.load(str(models["workdir"]))
  from_converted = Predictor.load(str(models["converted"]))
  _same_tree(from_workdir.variables, models["best"])  # the BEST checkpoint, not the latest
  _same_tree(from_converted.variables, models["best"])
  assert from_workdir.model_config.to_dict() == from_converted.model_config.to_dict()
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 256, 192, 3)).astype(np.float32)
  kp2d = rng.uniform(-0.5, 0.5, (2, 17, 2)).astype(np.float32)
  crop = rng.uniform([20, 20], [170, 230], (2, 17, 2)).astype(np.float32)
  np.testing.assert_array_equal(from_workdir.predict(images, kp2d, crop),
                                from_converted.predict(images, kp2d, crop))

  # The CLI: the same call on both directories, the same poses.
  _write_png(tmp_path / "f.png", _frame(0))
  (tmp_path / "kp.json").write_text(json.dumps({"keypoints": _person(0).tolist()}))
  outs = []
  for name in ("workdir", "converted"):
    out = tmp_path / f"out_{name}"
    assert _run(f"--checkpoint={models[name]}", f"--image={tmp_path / 'f.png'}",
                f"--keypoints={tmp_path / 'kp.json'}", "--noplot", f"--output={out}") == 0
    outs.append(np.load(out / "poses.npz"))
  np.testing.assert_array_equal(outs[0]["keypoints_3d_raw"], outs[1]["keypoints_3d_raw"])

  # Eval-only keeps its entry point (a dict config).
  variables, model_config = checkpoints.load_eval_variables(str(models["workdir"]))
  _same_tree(variables, models["best"])
  assert model_config["embed_dim"] == 16


def test_step_checkpoints_load_by_path(models, tmp_path):
  _same_tree(Predictor.load(str(models["workdir"] / "checkpoints" / "5")).variables,
             models["latest"])
  _same_tree(Predictor.load(str(models["workdir"] / "best" / "3")).variables, models["best"])
  # A workdir with no evaluated (best) checkpoint yet: its latest train state.
  early = tmp_path / "early"
  _, latest, _ = inference_fixtures.make_workdir(str(early), with_best=False)
  _same_tree(Predictor.load(str(early)).variables, latest)


@pytest.mark.parametrize("case", ["empty_dir", "checkpoints_parent", "file", "no_config"])
def test_wrong_model_directory_is_one_error(models, tmp_path, case):
  if case == "empty_dir":
    path = tmp_path / "empty"
    path.mkdir()
    expect = "not a model directory; expected a converter output"
  elif case == "checkpoints_parent":
    path = models["workdir"] / "checkpoints"
    expect = "not a model directory; expected a converter output"
  elif case == "file":
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    expect = "a file, not a directory"
  else:
    path = tmp_path / "copy"
    import shutil
    shutil.copytree(models["workdir"], path)
    os.remove(path / "config.json")
    expect = "config.json beside the checkpoints"
  with pytest.raises(checkpoints.ModelDirectoryError) as info:
    Predictor.load(str(path))
  message = str(info.value)
  assert str(path) in message and expect in message and "\n" not in message


# ----------------------------------------------------------------------------
# Detection + lifting.
# ----------------------------------------------------------------------------


class FakeDetector:
  """``detect_2d`` as the COCO Predictor: crop-pixel COCO keypoints + scores.

  Returns the same crop keypoints for every image and records the images.
  """

  def __init__(self, crop_keypoints, scores):
    self.crop_keypoints, self.scores = crop_keypoints, scores
    self.model_config = {"backbone": "hrnet_32"}
    self.seen = []

  def detect_2d(self, images):
    self.seen.append(np.asarray(images))
    b = len(images)
    return np.repeat(self.crop_keypoints[None], b, 0), np.repeat(self.scores[None], b, 0)


def _coco_of(h36m):
  """A COCO-17 set whose hips/shoulders/limbs are the H36M joints'."""
  coco = np.zeros((17, 2))
  coco[[0, 1, 2, 3, 4]] = h36m[9] + [[0, 0], [-4, -6], [4, -6], [-8, -4], [8, -4]]
  coco[[5, 7, 9, 11, 13, 15]] = h36m[[11, 12, 13, 4, 5, 6]]
  coco[[6, 8, 10, 12, 14, 16]] = h36m[[14, 15, 16, 1, 2, 3]]
  return coco


def test_detection_then_lifting_matches_given_keypoints(models, tmp_path):
  frame = _frame(3)
  _write_png(tmp_path / "f.png", frame)
  coco_frame = _coco_of(_person(3))
  # The whole 320x240 frame, made square (320 x 320 about its centre) and
  # warped with the official affine, written out: scale 191 / (319 - 1).
  s = 191.0 / (319.0 - 1.0)
  cx, cy = 159.5, 119.5
  coco_crop = (coco_frame - [cx, cy]) * s + [95.5, 127.5]
  scores = np.linspace(0.5, 0.9, 17)
  detector = FakeDetector(coco_crop, scores)
  out = tmp_path / "detected"
  assert _run(f"--checkpoint={models['converted']}", f"--image={tmp_path / 'f.png'}",
              "--noplot", f"--output={out}", detector=detector) == 0
  # The detector saw the normalized whole-frame crop.
  matrix = np.array([[s, 0, 95.5 - s * cx], [0, s, 127.5 - s * cy]])
  crop = cv2.warpAffine(frame, matrix, (192, 256), flags=cv2.INTER_LINEAR)
  want = (crop / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  np.testing.assert_allclose(detector.seen[0][0], want, atol=1e-4)

  got = np.load(out / "poses.npz")
  np.testing.assert_allclose(got["keypoints_2d_coco_px"][0], coco_frame, atol=0.02)
  h36m = skeleton.coco_to_h36m(coco_frame)
  np.testing.assert_allclose(got["keypoints_2d_px"][0], h36m, atol=0.02)
  np.testing.assert_allclose(got["scores"][0], skeleton.coco_to_h36m(
      np.concatenate([coco_frame, scores[:, None]], -1))[:, 2], atol=1e-6)
  np.testing.assert_allclose(got["detection_bbox"][0], [0, -40, 319, 279])

  # --keypoints overrides the detector, and the same 2D gives the same 3D.
  np.save(tmp_path / "unused.npy", 0)
  (tmp_path / "kp.json").write_text(json.dumps({"keypoints": got["keypoints_2d_px"][0].tolist()}))
  given = tmp_path / "given"
  assert _run(f"--checkpoint={models['converted']}", f"--image={tmp_path / 'f.png'}",
              f"--keypoints={tmp_path / 'kp.json'}", "--noplot", f"--output={given}",
              detector=FakeDetector(np.zeros((17, 2)), np.zeros(17))) == 0
  np.testing.assert_allclose(np.load(given / "poses.npz")["keypoints_3d"],
                             got["keypoints_3d"], atol=1e-5)


def test_real_detector_directory_end_to_end(models, tmp_path):
  """`--detector=DIR` with a COCO backbone directory (heatmap head kept, as
  the converter writes it): the CLI's 2D keypoints are the detector's own
  `detect_2d` on the official whole-frame crop, mapped back to the frame."""
  config = capf.default_model_config("hrnet_32")
  config.backbone_kwargs = dict(inference_fixtures.SMALL_HRNET, heatmap_head=True)
  model = capf.build_model(config)
  variables = jax.tree_util.tree_map(np.asarray, compiler_options.jit(
      model.init, run_once=True)(jax.random.PRNGKey(3), *capf.dummy_inputs(1)))
  backbone_only = {k: {"backbone": v["backbone"]} for k, v in variables.items()}
  coco_dir = tmp_path / "coco"
  capf.save_variables(str(coco_dir), backbone_only, config)
  frame = _frame(4)
  _write_png(tmp_path / "f.png", frame)
  out = tmp_path / "out"
  assert _run(f"--checkpoint={models['converted']}", f"--detector={coco_dir}",
              f"--image={tmp_path / 'f.png'}", "--noplot", f"--output={out}") == 0
  got = np.load(out / "poses.npz")

  detector = Predictor.load(str(coco_dir))
  assert detector.has_heatmap_head and not detector.has_lifter
  # The official warp of the whole 320x240 frame made square (320 x 320).
  s = 191.0 / (319.0 - 1.0)
  matrix = np.array([[s, 0, 95.5 - s * 159.5], [0, s, 127.5 - s * 119.5]])
  crop = cv2.warpAffine(frame, matrix, (192, 256), flags=cv2.INTER_LINEAR)
  image = ((crop / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225])[None]
  center, scale = geometry.box_to_center_scale([0.0, -40.0, 319.0, 279.0])
  want, scores = detector.detect_2d(image.astype(np.float32), center=center, scale=scale)
  np.testing.assert_allclose(got["keypoints_2d_coco_px"][0], want[0], atol=0.05)
  np.testing.assert_allclose(got["keypoints_2d_px"][0], skeleton.coco_to_h36m(want[0]),
                             atol=0.05)
  assert np.all(np.isfinite(got["keypoints_3d"]))


# ----------------------------------------------------------------------------
# Videos and folders.
# ----------------------------------------------------------------------------


_write_video = inference_fixtures.write_video
_decoded = inference_fixtures.decoded


def test_video_and_folder_give_the_same_poses(models, tmp_path):
  n = 5
  video = tmp_path / "clip.mp4"
  _write_video(video, [_frame(10 + i) for i in range(n)])
  kp = np.stack([_person(i, cx=150.0 + 4 * i) for i in range(n)])
  np.savez(tmp_path / "kp.npz", keypoints=kp)
  out_video = tmp_path / "out_video"
  assert _run(f"--checkpoint={models['workdir']}", f"--video={video}",
              f"--keypoints={tmp_path / 'kp.npz'}", "--batch_size=2",
              f"--output={out_video}") == 0
  names = [f"{i:06d}" for i in range(n)]
  assert sorted(os.listdir(out_video)) == sorted(
      [f"{m}.png" for m in names] + ["poses.json", "poses.npz", "skeleton.gif"])
  from PIL import Image
  with Image.open(out_video / "skeleton.gif") as gif:
    assert gif.n_frames == n
  video_poses = np.load(out_video / "poses.npz")
  assert list(video_poses["frames"]) == names and float(video_poses["fps"]) == 10.0
  assert video_poses["keypoints_3d"].shape == (n, 17, 3)

  # The same frames as a folder (the decoded video, lossless PNG): same poses.
  folder = tmp_path / "frames"
  folder.mkdir()
  for i, f in enumerate(_decoded(video)):
    _write_png(folder / f"{i:06d}.png", f)
  out_folder = tmp_path / "out_folder"
  assert _run(f"--checkpoint={models['workdir']}", f"--images={folder}",
              f"--keypoints={tmp_path / 'kp.npz'}", "--batch_size=3", "--noanimation",
              f"--output={out_folder}") == 0
  folder_poses = np.load(out_folder / "poses.npz")
  np.testing.assert_allclose(folder_poses["keypoints_3d"], video_poses["keypoints_3d"],
                             atol=1e-5)
  assert "skeleton.gif" not in os.listdir(out_folder)


def test_video_detection_with_smoothing(models, tmp_path, capsys):
  n = 4
  video = tmp_path / "clip.mp4"
  _write_video(video, [_frame(20 + i) for i in range(n)])
  crop = _coco_of(_person(0, cx=96.0, cy=128.0, height=150.0))
  detector = FakeDetector(crop, np.full(17, 0.8))
  out = tmp_path / "out"
  assert _run(f"--checkpoint={models['converted']}", f"--video={video}", "--smooth=3",
              "--noplot", "--batch_size=3", f"--output={out}", detector=detector) == 0
  got = np.load(out / "poses.npz")
  np.testing.assert_allclose(got["keypoints_2d_px"],
                             predict.smooth_keypoints(got["keypoints_2d_px_unsmoothed"], 3),
                             atol=1e-4)
  assert got["scores"].shape == (n, 17) and not got["suspect_keypoints"].any()
  assert "lift 3D" in capsys.readouterr().err  # the progress line


def test_smooth_keypoints():
  t = np.arange(7, dtype=np.float64)
  linear = np.stack([np.stack([t, 2 * t], -1)] * 17, 1)  # (7, 17, 2)
  np.testing.assert_allclose(predict.smooth_keypoints(linear, 5), linear)  # no lag
  x = np.zeros((5, 17, 2))
  x[2] = 3.0
  got = predict.smooth_keypoints(x, 3)[:, 0, 0]
  np.testing.assert_allclose(got, [0, 1, 1, 1, 0])  # ends keep a window of 1
  np.testing.assert_array_equal(predict.smooth_keypoints(x, 1), x)


# ----------------------------------------------------------------------------
# Bad input: one line each, nothing written.
# ----------------------------------------------------------------------------

BAD_CASES = ["no_such_image", "no_such_video", "corrupt_video", "truncated_image",
             "box_outside", "joints_16", "nan_keypoints", "output_exists",
             "output_parent_is_file", "wrong_checkpoint_dir", "unknown_flag",
             "no_keypoints_no_detector", "two_sources", "even_smooth"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_clear_line(models, tmp_path, capsys, monkeypatch, case):
  work = tmp_path / "in"
  work.mkdir()
  _write_png(work / "f.png", _frame(1))
  kp_file = work / "kp.json"
  kp_file.write_text(json.dumps({"keypoints": _person(1).tolist()}))
  args = {"checkpoint": models["converted"], "image": work / "f.png",
          "keypoints": kp_file, "output": tmp_path / "out"}
  extra = []
  if case == "no_such_image":
    args["image"] = work / "missing.jpg"
    expect = "missing.jpg: no such image"
  elif case == "no_such_video":
    del args["image"]
    args["video"] = work / "missing.mp4"
    expect = "missing.mp4: no such video"
  elif case == "corrupt_video":
    del args["image"]
    (work / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    args["video"] = work / "bad.mp4"
    expect = "bad.mp4: cannot be read as a video"
  elif case == "truncated_image":
    ok, data = cv2.imencode(".jpg", _frame(1))
    (work / "cut.jpg").write_bytes(data.tobytes()[:len(data) // 2])
    args["image"] = work / "cut.jpg"
    expect = "cut.jpg: truncated JPEG"
  elif case == "box_outside":
    extra = ["--bbox=400,10,600,210"]
    expect = "lies outside the 320x240 image"
  elif case == "joints_16":
    kp_file.write_text(json.dumps({"keypoints": _person(1)[:16].tolist()}))
    expect = "kp.json: expected 17 joints per frame (Human3.6M order), got 16"
  elif case == "nan_keypoints":
    kp = _person(1)
    kp[4, 1] = np.nan
    np.savez(work / "kp.npz", keypoints=kp)
    args["keypoints"] = work / "kp.npz"
    expect = "kp.npz: 'keypoints' holds NaN or infinite values"
  elif case == "output_exists":
    (tmp_path / "out").mkdir()
    expect = "out: already exists"
  elif case == "output_parent_is_file":
    (tmp_path / "afile").write_text("x")
    args["output"] = tmp_path / "afile" / "out"
    expect = "afile is not a directory"
  elif case == "wrong_checkpoint_dir":
    args["checkpoint"] = models["workdir"] / "checkpoints"
    expect = "not a model directory; expected a converter output"
  elif case == "unknown_flag":
    extra = ["--smoothing=3"]
    expect = "Unknown command line flag 'smoothing'"
  elif case == "no_keypoints_no_detector":
    del args["keypoints"]
    expect = "give the 2D keypoints (--keypoints=FILE) or a COCO backbone"
  elif case == "two_sources":
    args["video"] = work / "x.mp4"
    expect = "give exactly one of --image, --images, --video"
  else:
    extra = ["--smooth=4"]
    expect = "--smooth must be 0 (off) or an odd number"
  if case.startswith("output"):
    # Checked before any model work: loading a model here fails the test.
    def no_model(*a, **k):
      raise AssertionError("a model was loaded before --output was checked")
    monkeypatch.setattr(checkpoints, "read_model_config", no_model)
    monkeypatch.setattr(Predictor, "load", no_model)
  before = sorted(os.listdir(tmp_path))
  argv = [f"--{k}={v}" for k, v in args.items()] + extra
  assert _run(*argv) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and len(err.splitlines()) == 1, err
  assert expect in err, err
  assert sorted(os.listdir(tmp_path)) == before  # nothing half-written


@pytest.mark.parametrize("case", ["collapsed", "box_misses_person"])
def test_suspect_keypoints_warn_and_flag(models, tmp_path, capsys, case):
  _write_png(tmp_path / "f.png", _frame(2))
  kp = _person(2)
  extra = []
  if case == "collapsed":
    kp = np.full((17, 2), 150.0) + np.random.default_rng(0).normal(0, 0.3, (17, 2))
    expect = "collapse to nearly one point"
  else:
    extra = ["--bbox=0,0,60,60"]  # in the frame, but far from the person
    expect = "keypoints fall outside the crop"
  (tmp_path / "kp.json").write_text(json.dumps({"keypoints": kp.tolist()}))
  out = tmp_path / "out"
  assert _run(f"--checkpoint={models['converted']}", f"--image={tmp_path / 'f.png'}",
              f"--keypoints={tmp_path / 'kp.json'}", "--noplot", f"--output={out}",
              *extra) == 0
  err = capsys.readouterr().err
  assert "warning: f.png: " in err and expect in err, err
  assert np.load(out / "poses.npz")["suspect_keypoints"].tolist() == [True]
  assert json.loads((out / "poses.json").read_text())["frames"]["f.png"]["suspect_keypoints"]


def test_help_and_private_flags(capsys):
  assert predict.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert "--checkpoint" in out and "--video" in out and "--smooth" in out
  # Importing predict defines nothing on absl's global FLAGS.
  assert "checkpoint" not in flags.FLAGS and "keypoints" not in flags.FLAGS


def test_shipped_examples_load_and_regenerate(tmp_path):
  """examples/ pairs its frames with keypoints the CLI reads, and
  make_examples.py regenerates them."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  examples = os.path.join(root, "examples")
  kp, frames, _ = predict.load_keypoints(os.path.join(examples, "keypoints.json"))
  paths = predict.list_frames(os.path.join(examples, "frames"), kp, frames, "keypoints.json")
  assert len(paths) == len(kp) >= 3
  for path, k in zip(paths, kp):
    assert os.path.getsize(path) < 20_000
    h, w = cv2.imread(path).shape[:2]
    assert (k >= 0).all() and (k[:, 0] < w).all() and (k[:, 1] < h).all()
  import runpy
  runpy.run_path(os.path.join(examples, "make_examples.py"), run_name="not_main")["main"](
      ["--output", str(tmp_path)])
  with open(os.path.join(examples, "keypoints.json")) as f:
    assert json.load(f) == json.loads((tmp_path / "keypoints.json").read_text())
  for path in paths:
    shipped = cv2.imread(path).astype(int)
    again = cv2.imread(str(tmp_path / "frames" / os.path.basename(path))).astype(int)
    assert np.abs(shipped - again).mean() < 1.0
