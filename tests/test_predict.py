"""Inference CLI: crops, joints and plots checked against independent references.

A reduced official-layout PyTorch CA-PF (random weights, calibrated BatchNorm)
is converted and saved like the converter does; the CLI's written 3D joints
are compared with ``Predictor.predict`` and with the torch model on inputs
built here by hand: the official affine written out as a formula, the crop
warped with it by OpenCV, the backbone normalisation written out. The CLI
folds the backbone's BatchNorms into its convs (by default); the folding is
checked against torch's ``fuse_conv_bn_eval`` and the unfolded model.
"""
import json
import os
import subprocess
import sys

import cv2
import flax.linen as nn
import ml_collections
import numpy as np
import pytest
import torch

from benchmarks import speed as benchmark
from contextpose_jax import geometry
from contextpose_jax import predict
from contextpose_jax import skeleton
from contextpose_jax import visualize
from contextpose_jax.api import Predictor
from contextpose_jax.models import capf
from contextpose_jax.models import folding
from torch_reference import capf as ref_capf
from torch_reference.common import randomize_, state_dict_numpy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_HRNET = dict(width=8, stage_modules=[1, 1, 1], num_blocks=1, stem_channels=8,
                   layer1_blocks=1)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
IMAGE_H, IMAGE_W = 360, 480
SMALL_BACKBONES = {"hrnet_32": SMALL_HRNET,
                   "cpn": dict(resnet_layers=[1, 1, 1, 1], width=8, lateral_channels=16)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A converted (reduced) CA-PF directory and the torch model it came from."""
  model = ref_capf.random_capf("hrnet_32", "h36m", 1, backbone_kwargs=SMALL_HRNET,
                               embed_dim=32, depth=1)
  config = capf.default_model_config("hrnet_32", "h36m")
  config.backbone_kwargs = ml_collections.ConfigDict(SMALL_HRNET)
  config.embed_dim = 32
  config.depth = 1
  variables = capf.load_torch_state_dict(state_dict_numpy(model), capf.build_model(config),
                                         config)
  directory = tmp_path_factory.mktemp("ckpt") / "capf_small"
  capf.save_variables(str(directory), variables, config)
  return directory, model


def _frame(seed, h=IMAGE_H, w=IMAGE_W):
  """A textured RGB frame (smooth noise + a bright figure), uint8."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
  frame = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
  cv2.rectangle(frame, (w // 2 - 30, h // 4), (w // 2 + 30, 3 * h // 4), (240, 200, 40), -1)
  return frame


def _person(seed, cx=240.0, cy=190.0, height=220.0):
  """17 Human3.6M-order keypoints (pixels) spread like a standing person."""
  rng = np.random.default_rng(seed)
  y = np.array([0.0, 0.0, 0.25, 0.48, 0.0, 0.25, 0.48, -0.12, -0.25, -0.32, -0.4,
                -0.24, -0.1, 0.02, -0.24, -0.1, 0.02])
  x = np.array([0.0, -0.06, -0.06, -0.06, 0.06, 0.06, 0.06, 0.0, 0.0, 0.0, 0.0,
                0.1, 0.14, 0.16, -0.1, -0.14, -0.16])
  kp = np.stack([cx + x * height, cy + y * height], -1)
  return kp + rng.normal(0, 3.0, kp.shape)


def _write_image(path, rgb):
  assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))  # PNG: lossless


def _reference_inputs(frame_rgb, kp_px, box):
  """Model inputs by hand: the official affine written out as a formula.

  The official warp maps the box centre to the crop centre ((192-1)/2,
  (256-1)/2) and scales BOTH axes by (192 - 1) / (box_width - 1).
  """
  x0, y0, x1, y1 = box
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  s = 191.0 / (x1 - x0 - 1)
  matrix = np.array([[s, 0, 95.5 - s * cx], [0, s, 127.5 - s * cy]])
  crop = cv2.warpAffine(frame_rgb, matrix, (192, 256), flags=cv2.INTER_LINEAR)
  image = ((crop / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
  h, w = frame_rgb.shape[:2]
  kp2d = (kp_px / w * 2 - [1, h / w]).astype(np.float32)
  kp_crop = (kp_px * s + [95.5 - s * cx, 127.5 - s * cy]).astype(np.float32)
  return crop, image, kp2d, kp_crop


def _torch_pose(model, image, kp2d, kp_crop):
  with torch.no_grad():
    return model(torch.tensor(image[None]), torch.tensor(kp2d[None]),
                 torch.tensor(kp_crop[None])).numpy()[0, 0]


def _run(*args):
  return predict.main([str(a) for a in args])


def test_single_image_matches_predictor_and_torch(checkpoint, tmp_path):
  directory, model = checkpoint
  frame = _frame(0)
  kp = _person(0)
  box = np.array([130.0, 80.0, 350.0, 300.0])  # square: used as given
  _write_image(tmp_path / "frame.png", frame)
  (tmp_path / "kp.json").write_text(json.dumps({"keypoints": kp.tolist()}))
  out = tmp_path / "out"
  assert _run("--checkpoint", directory, "--image", tmp_path / "frame.png",
              "--keypoints", tmp_path / "kp.json", "--bbox", ",".join(map(str, box)),
              "--output", out) == 0

  written = np.load(out / "poses.npz")
  crop, image, kp2d, kp_crop = _reference_inputs(frame, kp, box)
  np.testing.assert_allclose(written["keypoints_2d"][0], kp2d, rtol=0, atol=1e-6)
  # The official matrix is built from float32 points: ~1e-4 px from the formula.
  np.testing.assert_allclose(written["keypoints_2d_crop"][0], kp_crop, rtol=0, atol=2e-3)
  np.testing.assert_array_equal(written["bbox"][0], box)
  # keypoints_3d_raw is the model's output; keypoints_3d has the pelvis at 0.
  pose = written["keypoints_3d_raw"][0]
  assert pose.shape == (17, 3) and np.abs(pose).max() > 0.05
  assert np.abs(pose[0]).max() > 1e-4  # the official head predicts the root too
  np.testing.assert_allclose(written["keypoints_3d"][0], pose - pose[0], atol=1e-6)
  assert np.all(written["keypoints_3d"][0][0] == 0) and int(written["root_joint"]) == 0
  assert written["suspect_keypoints"].tolist() == [False]

  # Same crop -> the same joints as the Python API and as the torch model.
  want = Predictor.load(str(directory)).predict(image[None], kp2d[None], kp_crop[None])
  np.testing.assert_allclose(pose, want[0, 0], rtol=1e-4, atol=2e-4)
  np.testing.assert_allclose(pose, _torch_pose(model, image, kp2d, kp_crop),
                             rtol=1e-4, atol=2e-4)

  record = json.loads((out / "poses.json").read_text())
  assert record["joint_names"][0] == "pelvis" and len(record["joint_names"]) == 17
  # poses.json is rounded to 0.1 mm.
  np.testing.assert_allclose(record["frames"]["frame.png"]["keypoints_3d_raw"], pose,
                             rtol=0, atol=5.01e-5)
  np.testing.assert_allclose(record["frames"]["frame.png"]["keypoints_3d"],
                             written["keypoints_3d"][0], rtol=0, atol=5.01e-5)
  assert record["root_joint"] == 0

  # The PNG decodes, has both panels, and shows left (blue) and right (red) limbs.
  png = cv2.cvtColor(cv2.imread(str(out / "frame.png")), cv2.COLOR_BGR2RGB)
  assert png.shape == (460, 800, 3)
  for color in (visualize.LEFT_COLOR, visualize.RIGHT_COLOR):
    rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
    close = np.abs(png.astype(int) - rgb).sum(-1) < 40
    assert close[:, :400].sum() > 50, f"{color} missing in the 2D panel"
    assert close[:, 400:].sum() > 50, f"{color} missing in the 3D panel"
  assert sorted(os.listdir(out)) == ["frame.png", "poses.json", "poses.npz"]


def test_folder_coco_keypoints_flip_test(checkpoint, tmp_path):
  """3 frames paired by name (not folder order), per-frame boxes from the
  file, COCO keypoints, flip test, batch 2 (a padded last batch)."""
  directory, model = checkpoint
  frames_dir = tmp_path / "frames"
  frames_dir.mkdir()
  names = ["c.png", "a.png", "b.png"]
  frames, coco, boxes = [], [], []
  for i, name in enumerate(names):
    frames.append(_frame(10 + i))
    _write_image(frames_dir / name, frames[-1])
    coco.append(np.random.default_rng(i).uniform([180, 100], [300, 300], (17, 2)))
    boxes.append([120.0 + 5 * i, 60.0, 360.0 + 5 * i, 300.0])
  np.savez(tmp_path / "kp.npz", keypoints=np.stack(coco), frames=np.array(names),
           bbox=np.array(boxes))
  out = tmp_path / "out"
  assert _run("--checkpoint", directory, "--image", frames_dir, "--keypoints",
              tmp_path / "kp.npz", "--keypoint_format", "coco", "--flip_test",
              "--batch_size", 2, "--no-plot", "--output", out) == 0
  written = np.load(out / "poses.npz")
  assert list(written["frames"]) == names
  predictor = Predictor.load(str(directory))
  for i in range(3):
    kp = skeleton.coco_to_h36m(coco[i])
    _, image, kp2d, kp_crop = _reference_inputs(frames[i], kp, boxes[i])
    want = predictor.predict(image[None], kp2d[None], kp_crop[None], flip_test=True)
    np.testing.assert_allclose(written["keypoints_3d_raw"][i], want[0, 0], rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(written["keypoints_2d_px"][i], kp, atol=1e-4)
  assert sorted(os.listdir(out)) == ["poses.json", "poses.npz"]


def test_coco_to_h36m_mapping():
  coco = np.arange(17 * 2, dtype=np.float64).reshape(17, 2) ** 1.5
  h36m = skeleton.coco_to_h36m(coco)
  mid = lambda a, b: (coco[a] + coco[b]) / 2
  pelvis, thorax, eyes = mid(11, 12), mid(5, 6), mid(1, 2)
  want = np.array([pelvis, coco[12], coco[14], coco[16], coco[11], coco[13], coco[15],
                   (pelvis + thorax) / 2, thorax, coco[0], eyes + 0.5 * (eyes - thorax),
                   coco[5], coco[7], coco[9], coco[6], coco[8], coco[10]])
  np.testing.assert_allclose(h36m, want, rtol=1e-12)
  # Left joints map to left joints: the H36M flip pairs are COCO flip pairs.
  left, right = [4, 5, 6, 11, 12, 13], [1, 2, 3, 14, 15, 16]
  for l, r in zip(left, right):
    assert skeleton.H36M_JOINT_NAMES[l].replace("left", "right") == skeleton.H36M_JOINT_NAMES[r]


def test_box_from_keypoints_frames_the_person(checkpoint, tmp_path):
  """Without a box, the keypoints' extent is centred in the crop and its
  larger side spans 1 / KEYPOINT_BOX_ENLARGE of the crop width."""
  directory, _ = checkpoint
  kp = _person(3)
  _write_image(tmp_path / "f.png", _frame(3))
  np.savez(tmp_path / "kp.npz", keypoints=kp)
  out = tmp_path / "out"
  assert _run("--checkpoint", directory, "--image", tmp_path / "f.png", "--keypoints",
              tmp_path / "kp.npz", "--no-plot", "--output", out) == 0
  crop_kp = np.load(out / "poses.npz")["keypoints_2d_crop"][0]
  lo, hi = crop_kp.min(0), crop_kp.max(0)
  np.testing.assert_allclose((lo + hi) / 2, [95.5, 127.5], atol=0.01)
  extent = (kp.max(0) - kp.min(0)).max()
  side = extent * geometry.KEYPOINT_BOX_ENLARGE
  np.testing.assert_allclose((hi - lo).max(), 191.0 * extent / (side - 1), rtol=1e-4)


def test_square_box_keeps_official_boxes():
  np.testing.assert_array_equal(geometry.square_box([10, 20, 110, 100]), [10, 10, 110, 110])
  np.testing.assert_array_equal(geometry.square_box([10, 20, 50, 100]), [-10, 20, 70, 100])


def test_every_backbone_batch_norm_is_folded():
  """Pair discovery finds every BatchNorm of the (reduced) backbones, and the
  folded variables keep no BatchNorm at all."""
  for backbone in ("hrnet_32", "cpn"):
    torch_model, variables, config = benchmark.build_models(
        backbone, backbone_kwargs=SMALL_BACKBONES[backbone], embed_dim=32, depth=1)
    model = capf.build_model(config)
    pairs = folding.find_conv_bn_pairs(model, variables, *capf.dummy_inputs(1))
    # Official CPN's GlobalNet.predict / RefineNet.final_predict heads are not
    # part of the backbone's forward (their BNs are not in the Flax model).
    used = [n for n, m in torch_model.backbone.named_modules()
            if isinstance(m, torch.nn.BatchNorm2d)
            and not n.startswith(("global_net.predict", "refine_net.final_predict"))]
    assert len(pairs) == len(used) > 10
    folded = folding.fold_batch_norm(variables, pairs)
    assert "batch_stats" not in folded
    assert all(p.bn[0] == "backbone" for p in pairs)


def test_fold_equals_torch_fuse_conv_bn_eval():
  """The folding arithmetic against torch's own conv-BN fusion."""
  conv = torch.nn.Conv2d(5, 7, 3, 2, 1, bias=False)
  bn = torch.nn.BatchNorm2d(7, eps=1e-5)
  randomize_(torch.nn.Sequential(conv, bn), 0)
  fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn.eval())

  class ConvThenBN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(7, (3, 3), (2, 2), padding=((1, 1), (1, 1)), use_bias=False,
                  name="conv")(x)
      return nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(x)
  t = lambda x: x.detach().numpy()
  variables = {"params": {"conv": {"kernel": t(conv.weight).transpose(2, 3, 1, 0)},
                          "bn": {"scale": t(bn.weight), "bias": t(bn.bias)}},
               "batch_stats": {"bn": {"mean": t(bn.running_mean), "var": t(bn.running_var)}}}
  x = np.random.default_rng(0).normal(size=(2, 9, 9, 5)).astype(np.float32)
  pairs = folding.find_conv_bn_pairs(ConvThenBN(), variables, x)
  assert pairs == [folding.ConvBN(("conv",), ("bn",), 1e-5)]
  folded = folding.fold_batch_norm(variables, pairs)
  np.testing.assert_allclose(folded["params"]["conv"]["kernel"],
                             t(fused.weight).transpose(2, 3, 1, 0), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(folded["params"]["conv"]["bias"], t(fused.bias),
                             rtol=1e-6, atol=1e-7)
  got = folding.apply_folded(ConvThenBN(), folded, x, pairs=pairs)
  want = fused(torch.tensor(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
  np.testing.assert_allclose(got, t(want), rtol=1e-5, atol=1e-5)


def test_folded_predictor_equals_predictor(checkpoint):
  directory, _ = checkpoint
  plain = Predictor.load(str(directory), fold_batch_norm=False)
  folded = Predictor.load(str(directory))  # folds by default
  assert plain.run_variables is plain.variables and not plain.fold_pairs
  assert "batch_stats" not in folded.run_variables and len(folded.fold_pairs) > 10
  rng = np.random.default_rng(5)
  images = rng.normal(size=(2, 256, 192, 3)).astype(np.float32)
  kp2d = rng.uniform(-1, 1, (2, 17, 2)).astype(np.float32)
  crop = (rng.uniform(0, 1, (2, 17, 2)) * [191, 255]).astype(np.float32)
  for got, want in zip(folded.features(images), plain.features(images)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  np.testing.assert_allclose(folded.predict(images, kp2d, crop, flip_test=True),
                             plain.predict(images, kp2d, crop, flip_test=True),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["no_image", "joints", "box_outside", "box_empty",
                                  "exists", "bad_json", "count", "coco_on_3dhp_order"])
def test_bad_input_one_clear_error(checkpoint, tmp_path, capsys, case):
  directory, _ = checkpoint
  _write_image(tmp_path / "f.png", _frame(1))
  kp_file = tmp_path / "kp.json"
  kp_file.write_text(json.dumps({"keypoints": _person(1).tolist()}))
  args = {"--checkpoint": directory, "--image": tmp_path / "f.png",
          "--keypoints": kp_file, "--output": tmp_path / "out"}
  if case == "no_image":
    args["--image"] = tmp_path / "missing.jpg"
    expect = "missing.jpg: no such image"
  elif case == "joints":
    kp_file.write_text(json.dumps({"keypoints": _person(1)[:16].tolist()}))
    expect = "kp.json: expected 17 joints per frame (Human3.6M order), got 16"
  elif case == "box_outside":
    args["--bbox"] = "500,10,700,210"
    expect = "lies outside the 480x360 image"
  elif case == "box_empty":
    args["--bbox"] = "300,10,200,210"
    expect = "is empty"
  elif case == "exists":
    (tmp_path / "out").mkdir()
    expect = "already exists"
  elif case == "bad_json":
    kp_file.write_text("{not json")
    expect = "kp.json: cannot be read: JSONDecodeError"
  elif case == "count":
    kp_file.write_text(json.dumps({"keypoints": [_person(1).tolist()] * 2}))
    expect = "kp.json: 2 keypoint sets for one image"
  else:
    args["--keypoint_format"] = "3dhp"
    expect = "takes keypoints in the Human3.6M or COCO order"
  before = set(os.listdir(tmp_path))
  argv = [x for k, v in args.items() for x in (k, v)]
  assert _run(*argv) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and len(err.splitlines()) == 1, err
  assert expect in err, err
  # Nothing half-written: no output and no staging directory.
  assert set(os.listdir(tmp_path)) == before


def test_cli_subprocess_exit_code(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "contextpose_jax.predict",
                         f"--checkpoint={tmp_path / 'nope'}", f"--image={tmp_path}",
                         f"--keypoints={tmp_path / 'kp.json'}", f"--output={tmp_path / 'o'}"],
                        cwd=ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip() == f"error: {tmp_path / 'nope'}: no such checkpoint directory"
