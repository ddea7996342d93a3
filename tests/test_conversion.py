"""End-to-end parity: official-layout PyTorch files -> converter CLI -> Predictor.

Full-size models (parity of the real key layout and widths needs them), random
weights with non-trivial BatchNorm statistics, saved in each released file
format and converted with ``python -m weights_conversion.convert``.

Exactness is checked in float64 (max |diff| <= 1e-4; in practice ~1e-9): a
full-size backbone in float32 accumulates rounding of ~1e-3 on maps of
magnitude ~10, in torch as much as in JAX, so the float32 user path is checked
against the float64 answer with torch's own float32 error as the bound.

CPU cost: the models are full size, the images of the float64 checks are
not. Both backbones are fully convolutional and the lifter samples its maps
at crop keypoints normalized to [-1, 1], so a 128x96 image (a quarter of the
work) exercises every weight and every sampling path. One conversion
(HRNet-W32, Human3.6M) is checked at the official 256x192 instead, and the
Predictor (which accepts 256x192 only) at that size. Each reference runs
the backbone once (its maps are taken on the way to the lifter).
"""
import copy
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
import torch

from contextpose_jax import skeleton
from contextpose_jax.api import Predictor
from contextpose_jax.models import capf
from torch_reference import capf as ref_capf
from weights_conversion import convert

ATOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FULL = (256, 192)  # the official crop; what Predictor accepts
SMALL = (128, 96)  # a quarter of the backbone work, still divisible by 32


def _inputs(seed, batch=2, size=FULL):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, *size, 3)).astype(np.float32)
  kp2d = rng.uniform(-1, 1, (batch, 17, 2)).astype(np.float32)
  # Crop keypoints (pixels of the 192x256 crop frame, whatever the image
  # size) mostly inside the crop, some just outside (zeros padding).
  crop = (rng.uniform(-0.05, 1.05, (batch, 17, 2)) * [191, 255]).astype(np.float32)
  return images, kp2d, crop


def _torch_outputs(model, images, kp2d, crop, dtype=torch.float32):
  """The backbone maps and the 3D pose of one torch forward."""
  model = copy.deepcopy(model).to(dtype)
  images, kp2d, crop = (torch.tensor(a, dtype=dtype) for a in (images, kp2d, crop))
  feats = []
  hook = model.backbone.register_forward_hook(lambda module, args, out: feats.extend(out))
  with torch.no_grad():
    pose = model(images, kp2d, crop)
  hook.remove()
  return [f.permute(0, 2, 3, 1).numpy() for f in feats], pose.numpy()


def _assert_at_float32_noise_floor(got32, torch32, exact):
  """float32 results may differ from the exact (float64) answer by rounding
  alone; ours must be no further from it than torch's own float32 result."""
  for g, t, e in zip(got32, torch32, exact):
    err, torch_err = np.abs(g - e).max(), np.abs(t - e).max()
    assert err <= 3 * torch_err + 1e-5, (err, torch_err)


def _run_cli(*args):
  return convert.main([*args])


@pytest.fixture(scope="module", params=[("hrnet_32", "h36m"), ("hrnet_48", "h36m"),
                                        ("cpn", "h36m"), ("hrnet_32", "3dhp")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def converted(request, tmp_path_factory):
  backbone, dataset = request.param
  tmp = tmp_path_factory.mktemp(f"{backbone}_{dataset}")
  model = ref_capf.random_capf(backbone, dataset, seed=len(backbone) + len(dataset))
  if dataset == "h36m":
    capf_file = tmp / f"best_epoch_{backbone}.bin"
    ref_capf.save_capf_h36m(model, capf_file)
  else:
    capf_file = tmp / "HRNet_32_64_no_refine_24_3214.pth"
    ref_capf.save_capf_3dhp(model, capf_file)
  out = tmp / "capf"
  assert _run_cli("--kind=capf", f"--backbone={backbone}", f"--dataset={dataset}",
                  f"--input={capf_file}", f"--output={out}") == 0
  return dict(backbone=backbone, dataset=dataset, model=model, dir=out, tmp=tmp,
              capf_file=capf_file)


def _flip_like_official(images, kp2d, crop, dataset):
  """The official loader's flip-test inputs, written out with plain numpy."""
  left, right = skeleton.FLIP_PAIRS[dataset]
  flip_kp = kp2d.copy()
  flip_kp[..., 0] *= -1
  flip_kp[:, left + right] = flip_kp[:, right + left]
  flip_crop = crop.copy()
  flip_crop[..., 0] = 192 - flip_crop[..., 0] - 1
  flip_crop[:, left + right] = flip_crop[:, right + left]
  return images[:, :, ::-1].copy(), flip_kp, flip_crop


def _unflip_like_official(pose, dataset):
  left, right = skeleton.FLIP_PAIRS[dataset]
  pose = pose.copy()
  pose[..., 0] *= -1
  pose[:, :, left + right] = pose[:, :, right + left]
  return pose


def test_converted_model_equals_torch_float64(converted):
  """Features and 3D output of the converted variables equal torch's."""
  # The official image size once (HRNet-W32, Human3.6M), a quarter of it elsewhere.
  official = converted["backbone"] == "hrnet_32" and converted["dataset"] == "h36m"
  images, kp2d, crop = _inputs(7, size=FULL if official else SMALL)
  exact_feats, exact_pose = _torch_outputs(converted["model"], images, kp2d, crop, torch.float64)
  assert np.abs(exact_pose).max() > 0.1  # a non-degenerate output
  predictor = Predictor.load(str(converted["dir"]))
  with jax.enable_x64(True):
    config = predictor.model_config.copy_and_resolve_references()
    config.backbone_dtype = "float64"
    model = capf.build_model(config)
    variables = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), predictor.variables)
    inputs = [a.astype(np.float64) for a in (images, kp2d, crop)]
    # Op by op: for a single call this costs less than half of compiling.
    # The backbone's maps are captured on their way to the lifter.
    pose, state = model.apply(variables, *inputs, mutable=["intermediates"],
                              capture_intermediates=lambda m, method: m.name == "backbone")
    feats = state["intermediates"]["backbone"]["__call__"][0]
    assert [f.shape for f in feats] == [f.shape for f in exact_feats]
    assert all(f.dtype == np.float64 for f in feats)
    for got, want in zip(feats, exact_feats):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=ATOL)
    np.testing.assert_allclose(pose, exact_pose, rtol=1e-4, atol=ATOL)


def test_predictor_float32_and_flip_test(converted):
  """The user path (float32 Predictor, flip test) against torch."""
  if converted["backbone"] != "cpn":
    pytest.skip("the float32 path is the same code for every backbone (CPN compiles fastest)")
  images, kp2d, crop = _inputs(7)
  _, exact_pose = _torch_outputs(converted["model"], images, kp2d, crop, torch.float64)
  _, torch_pose = _torch_outputs(converted["model"], images, kp2d, crop)
  predictor = Predictor.load(str(converted["dir"]))
  pose32 = predictor.predict(images, kp2d, crop)
  assert pose32.shape == (2, 1, 17, 3)
  _assert_at_float32_noise_floor([pose32], [torch_pose], [exact_pose])

  # Flip test as the official evaluation: mean of the prediction and the
  # un-flipped prediction on the mirrored input.
  dataset = converted["dataset"]
  flipped = _flip_like_official(images, kp2d, crop, dataset)
  _, exact_flip = _torch_outputs(converted["model"], *flipped, torch.float64)
  _, torch_flip = _torch_outputs(converted["model"], *flipped)
  want = (exact_pose + _unflip_like_official(exact_flip, dataset)) / 2
  assert np.abs(want - exact_pose).max() > 1e-3  # flipping changes the answer
  got = predictor.predict(images, kp2d, crop, flip_test=True)
  _assert_at_float32_noise_floor(
      [got], [(torch_pose + _unflip_like_official(torch_flip, dataset)) / 2], [want])


def test_coco_backbone_conversion(converted):
  """A COCO file converts to exactly the backbone of the CA-PF conversion."""
  if converted["dataset"] != "h36m":
    pytest.skip("one COCO conversion per backbone")
  backbone = converted["backbone"]
  tmp = converted["tmp"]
  if backbone == "cpn":
    coco_file = tmp / "CPN50_256x192.pth.tar"
    ref_capf.save_coco_cpn(converted["model"].backbone, coco_file)
  else:
    coco_file = tmp / f"pose_hrnet_w{backbone[-2:]}_256x192.pth"
    ref_capf.save_coco_hrnet(converted["model"].backbone, coco_file)
    assert any(k.startswith("final_layer.") for k in torch.load(coco_file))
  out = tmp / "coco"
  assert _run_cli(f"--kind={backbone}", f"--input={coco_file}", f"--output={out}") == 0
  coco = Predictor.load(str(out))
  full = Predictor.load(str(converted["dir"]))
  assert coco.model_config.backbone_kwargs.heatmap_head and coco.has_heatmap_head
  assert not full.has_heatmap_head
  assert set(coco.variables) == {"params", "batch_stats"}
  # The COCO conversion = the CA-PF backbone + the heatmap head, key for key.
  def is_head(path):  # HRNet final_layer; CPN refine_net/final_predict_{0,1,2}
    return path[0] == "final_layer" or path[1].startswith("final_predict")
  for collection in ("params", "batch_stats"):
    assert set(coco.variables[collection]) == {"backbone"}
    flat = flax.traverse_util.flatten_dict(coco.variables[collection]["backbone"])
    body = {k: v for k, v in flat.items() if not is_head(k)}
    if collection == "params" or backbone == "cpn":  # HRNet's head has no BatchNorm
      assert len(body) < len(flat)
    want = flax.traverse_util.flatten_dict(full.variables[collection]["backbone"])
    assert set(body) == set(want)
    for k in want:
      np.testing.assert_array_equal(body[k], want[k], err_msg="/".join(k))
  # Heatmaps of the converted head == torch's, exact in float64.
  images = _inputs(8, batch=1, size=SMALL)[0]
  ref = copy.deepcopy(converted["model"].backbone).double().eval()
  with torch.no_grad():
    _, want_hm = ref(torch.tensor(images, dtype=torch.float64).permute(0, 3, 1, 2),
                     with_heatmaps=True)
  with jax.enable_x64(True):
    config = coco.model_config.copy_and_resolve_references()
    config.backbone_dtype = "float64"
    variables = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), coco.variables)
    got_hm = capf.build_model(config).apply(variables, images.astype(np.float64),
                                            method=capf.CAPF.heatmaps)
    np.testing.assert_allclose(np.asarray(got_hm), want_hm.permute(0, 2, 3, 1).numpy(),
                               rtol=1e-4, atol=ATOL)
  images, kp2d, crop = _inputs(8, batch=1)
  with pytest.raises(ValueError, match="only a backbone"):
    coco.predict(images, kp2d, crop)
  if backbone == "cpn":  # the features API, float32, once
    exact_feats, _ = _torch_outputs(converted["model"], images, kp2d, crop, torch.float64)
    torch_feats, _ = _torch_outputs(converted["model"], images, kp2d, crop)
    _assert_at_float32_noise_floor(coco.features(images), torch_feats, exact_feats)

  # The COCO file is not a CA-PF checkpoint: a clear error and no output.
  bad_out = tmp / "coco_as_capf"
  with pytest.raises(convert.InputError, match="COCO backbone file"):
    convert.convert("capf", str(coco_file), str(bad_out), backbone=backbone)
  assert not bad_out.exists()


def test_bad_inputs_exit_nonzero_without_output(converted, capsys):
  if converted["backbone"] != "hrnet_48" or converted["dataset"] != "h36m":
    pytest.skip("run once, on the W48 files")
  tmp = converted["tmp"]
  leftovers = set(os.listdir(tmp))

  # W48 weights converted as W32: mis-shaped keys named.
  out = tmp / "w48_as_w32"
  assert _run_cli("--kind=capf", "--backbone=hrnet_32", f"--input={converted['capf_file']}",
                  f"--output={out}") == 1
  err = capsys.readouterr().err
  assert "mis-shaped" in err and "backbone.transition1.0.0.weight" in err
  assert len(err.strip().splitlines()) == 1
  assert not out.exists()

  # A truncated file.
  data = converted["capf_file"].read_bytes()
  truncated = tmp / "truncated.bin"
  truncated.write_bytes(data[: len(data) // 2])
  out = tmp / "truncated_out"
  assert _run_cli("--kind=capf", "--backbone=hrnet_48", f"--input={truncated}",
                  f"--output={out}") == 1
  err = capsys.readouterr().err
  assert "truncated.bin" in err and "truncated or corrupt" in err
  assert not out.exists()

  # A checkpoint with a missing lifter key and one unexpected key.
  obj = torch.load(converted["capf_file"], weights_only=True)
  del obj["model"]["module.volume_net.head.1.bias"]
  obj["model"]["module.volume_net.extra_layer.weight"] = torch.zeros(3)
  edited = tmp / "edited.bin"
  torch.save(obj, edited)
  out = tmp / "edited_out"
  assert _run_cli("--kind=capf", "--backbone=hrnet_48", f"--input={edited}",
                  f"--output={out}") == 1
  err = capsys.readouterr().err
  assert "missing 1" in err and "lifter/head_1/bias" in err
  assert "unexpected 1: volume_net.extra_layer.weight" in err
  assert not out.exists()

  # Only the files this test wrote on purpose are new: no staging directories.
  assert set(os.listdir(tmp)) - leftovers == {"truncated.bin", "edited.bin"}


def test_cli_subprocess_exit_code(tmp_path):
  missing = tmp_path / "nope.bin"
  proc = subprocess.run([sys.executable, "-m", "weights_conversion.convert", "--kind=capf",
                         f"--input={missing}", f"--output={tmp_path / 'out'}"],
                        cwd=ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 1
  assert f"{missing}: no such file" in proc.stderr
  assert not (tmp_path / "out").exists()
