"""2D keypoints from the COCO heatmap head of the backbone.

- decoding (``contextpose_jax.models.heatmaps``) == the torch reference of the
  official HRNet decoding (``torch_reference.heatmaps``, loops as the official
  code) on random and hand-made heatmaps: ties, edges, negative maxima;
- Flax heatmaps == torch heatmaps: full-size HRNet-W32 converted from a COCO
  file with the converter CLI (float64, op by op), and a reduced CPN saved and
  loaded as a model directory (float64 and the float32 user path);
- ``Predictor.detect_2d`` on a heatmap with a known peak gives the
  hand-computed crop pixel, and on the network equals the torch decoding of
  the torch heatmaps;
- a COCO conversion used as training's ``backbone_init`` loads into CA-PF's
  head-less backbone (the head left out, everything else strict).
"""
import copy

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from contextpose_jax import checkpoints
from contextpose_jax import geometry
from contextpose_jax import steps
from contextpose_jax.api import Predictor
from contextpose_jax.models import capf
from contextpose_jax.models import cpn
from contextpose_jax.models import heatmaps
import inference_fixtures
from torch_reference import capf as ref_capf
from torch_reference import common
from torch_reference import cpn as ref_cpn
from torch_reference import heatmaps as ref_heatmaps
from weights_conversion import convert

H, W, J = 64, 48, 17
SMALL_CPN = dict(resnet_layers=(1, 1, 1, 1), width=8, lateral_channels=32)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _ref_decode(hm_nhwc):
  """Torch reference: heatmap-pixel coords (B, J, 2) and scores (B, J)."""
  coords, maxvals = ref_heatmaps.get_final_preds_heatmap(_nchw(hm_nhwc))
  return coords.numpy(), maxvals[..., 0].numpy()


# ---------------------------------------------------------------- decoding

def _hand_made():
  """One joint per case; returns heatmaps (1, H, W, J) and the expected coords."""
  rng = np.random.default_rng(0)
  hm = np.full((J, H, W), 0.01, np.float32)
  want = {}
  def peak(j, y, x, v=1.0, left=0.3, right=0.5, up=0.6, down=0.2):
    hm[j, y, x] = v
    if x > 0: hm[j, y, x - 1] = left
    if x < W - 1: hm[j, y, x + 1] = right
    if y > 0: hm[j, y - 1, x] = up
    if y < H - 1: hm[j, y + 1, x] = down
  peak(0, 30, 20); want[0] = (20.25, 29.75)          # right higher, up higher
  hm[1, 10, 40] = hm[1, 50, 5] = 0.9; want[1] = (40, 10)   # tie: first row-major
  hm[2, 20, 9] = hm[2, 20, 7] = 0.9; want[2] = (7, 20)     # tie in one row
  peak(3, 30, 1); want[3] = (1, 30)                 # x == 1: official strict 1 < x
  peak(4, 30, 0); want[4] = (0, 30)                 # left edge
  peak(5, 30, W - 1); want[5] = (W - 1, 30)         # right edge
  peak(6, 30, W - 2); want[6] = (W - 2 + 0.25, 29.75)   # last interior column
  peak(7, 1, 20); want[7] = (20, 1)                 # y == 1: not shifted
  peak(8, H - 2, 20); want[8] = (20.25, H - 2 - 0.25)
  hm[9] = -1.0; hm[9, 40, 30] = -0.3; hm[9, 40, 31] = -0.5; want[9] = (0, 0)  # max < 0
  hm[10] = 0.0; hm[10, 5, 5] = 0.0; want[10] = (0, 0)     # max == 0 is not > 0
  peak(11, 30, 20, left=0.4, right=0.4, up=0.4, down=0.4); want[11] = (20, 30)  # sign(0)
  hm[12] = -1e-3; hm[12, 12, 13] = 1e-6; want[12] = (13, 12)   # tiny positive max
  hm[13] = np.round(rng.uniform(0, 3, (H, W))) / 3                # many ties
  peak(14, H - 1, W - 1); want[14] = (W - 1, H - 1)               # corner
  hm[15] = rng.normal(size=(H, W)).astype(np.float32)
  hm[16] = rng.normal(size=(H, W)).astype(np.float32) - 10        # all negative
  want[16] = (0, 0)
  return hm.transpose(1, 2, 0)[None], want


def _random_heatmaps(seed, batch=4):
  rng = np.random.default_rng(seed)
  hm = rng.normal(size=(batch, H, W, J)).astype(np.float32)
  hm[:, :, :, ::5] -= 6.0  # some joints with all-negative maps
  return hm


def test_decoding_hand_made_cases_match_official_and_hand_values():
  hm, want = _hand_made()
  coords, scores = heatmaps.decode_heatmaps(hm)
  ref_coords, ref_scores = _ref_decode(hm)
  np.testing.assert_array_equal(np.asarray(coords), ref_coords)
  np.testing.assert_allclose(np.asarray(scores), ref_scores, rtol=0, atol=0)
  for j, xy in want.items():
    np.testing.assert_array_equal(np.asarray(coords)[0, j], xy, err_msg=f"joint {j}")
  np.testing.assert_allclose(np.asarray(scores)[0, 9], -0.3, rtol=1e-7)  # score kept
  assert np.asarray(scores)[0, 10] == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_decoding_random_matches_torch_reference(seed):
  hm = _random_heatmaps(seed)
  ref_coords, ref_scores = _ref_decode(hm)
  coords, scores = jax.jit(heatmaps.decode_heatmaps)(hm)
  assert coords.shape == (4, J, 2) and scores.shape == (4, J)
  np.testing.assert_array_equal(np.asarray(coords), ref_coords)
  np.testing.assert_allclose(np.asarray(scores), ref_scores, rtol=0, atol=0)
  assert (ref_coords[:, ::5] == 0).all() and (ref_scores[:, ::5] < 0).all()
  shifted = ref_coords[:, 1::5] % 1
  assert (shifted != 0).any()  # the quarter shift is exercised


def test_crop_and_frame_coordinates():
  hm = _random_heatmaps(2, batch=2)
  ref_coords, ref_scores = _ref_decode(hm)

  # Heatmap -> crop is x4: the official transform_preds with the crop's own
  # (center, scale) in HRNet's convention maps a heatmap point to 4 * p.
  crop_center, crop_scale = (96.0, 128.0), (192 / 200, 256 / 200)
  for coords in ref_coords:
    np.testing.assert_allclose(
        ref_heatmaps.transform_preds_hrnet(torch.from_numpy(coords), crop_center,
                                           crop_scale, (W, H)).numpy(),
        4 * coords, rtol=0, atol=1e-12)
  kp, scores = heatmaps.keypoints_from_heatmaps(hm)
  np.testing.assert_array_equal(kp, 4 * ref_coords)
  np.testing.assert_array_equal(scores, ref_scores)

  # Crop -> frame through the inverse of the project's crop warp.
  center, scale = np.array([512.3, 401.7]), np.array([4.1, 4.1])
  kp_frame, _ = heatmaps.keypoints_from_heatmaps(hm, center, scale)
  want = ref_heatmaps.crop_to_frame_h36m(torch.from_numpy(4 * ref_coords), center, scale)
  # The official warp builds its point pairs in float32 (geometry.py keeps
  # that): ~1e-7 relative, i.e. ~1e-5 px on a frame of ~1000 px.
  np.testing.assert_allclose(kp_frame, want.numpy(), rtol=0, atol=1e-4)
  # ... and back through the forward warp lands on the crop pixels again.
  forward = geometry.affine_matrix(center, scale)
  np.testing.assert_allclose(geometry.apply_affine(kp_frame.reshape(-1, 2), forward),
                             (4 * ref_coords).reshape(-1, 2), atol=1e-6)
  # Per-row (center, scale).
  centers, scales = np.array([[512.3, 401.7], [90.0, 80.0]]), np.array([[4.1, 4.1], [1.2, 1.2]])
  kp_rows = heatmaps.crop_to_frame(4 * ref_coords, centers, scales)
  for b in range(2):
    np.testing.assert_allclose(
        kp_rows[b], ref_heatmaps.crop_to_frame_h36m(
            torch.from_numpy(4 * ref_coords[b]), centers[b], scales[b]).numpy(), atol=1e-4)


# ---------------------------------------------------------------- networks

def _images(seed, batch, low=-1.0, high=1.0):
  rng = np.random.default_rng(seed)
  return rng.uniform(low, high, (batch, 256, 192, 3)).astype(np.float32)


def _torch_heatmaps(model, images, dtype=torch.float64):
  model = copy.deepcopy(model).to(dtype).eval()
  with torch.no_grad():
    _, hm = model(_nchw(images).to(dtype), with_heatmaps=True)
  return hm.permute(0, 2, 3, 1).numpy()


def _float64(predictor):
  """The same model and variables in float64 (call under enable_x64)."""
  config = predictor.model_config.copy_and_resolve_references()
  config.backbone_dtype = "float64"
  variables = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), predictor.variables)
  return Predictor(capf.build_model(config), variables, config)


@pytest.fixture(scope="module")
def hrnet_w32(tmp_path_factory):
  """A random-weight official-layout W32 saved as pose_hrnet_w32_256x192.pth
  and converted with the CLI."""
  tmp = tmp_path_factory.mktemp("w32")
  model = ref_capf.build_backbone("hrnet_32")
  calib = _images(10, 1).transpose(0, 3, 1, 2).copy()
  common.randomize_(model, 3, example_inputs=(torch.from_numpy(calib),)).eval()
  path = tmp / "pose_hrnet_w32_256x192.pth"
  ref_capf.save_coco_hrnet(model, path)
  out = tmp / "coco_w32"
  assert convert.main(["--kind=hrnet_32", f"--input={path}", f"--output={out}"]) == 0
  return model, out


def test_hrnet_w32_heatmaps_equal_torch_float64(hrnet_w32):
  model, out = hrnet_w32
  predictor = Predictor.load(str(out))
  assert predictor.model_config.backbone_kwargs.heatmap_head
  assert predictor.has_heatmap_head and not predictor.has_lifter
  kernel = predictor.variables["params"]["backbone"]["final_layer"]["kernel"]
  np.testing.assert_array_equal(
      kernel, model.final_layer.weight.detach().numpy().transpose(2, 3, 1, 0))
  images = _images(11, 1)
  want = _torch_heatmaps(model, images)
  assert want.shape == (1, H, W, J) and np.abs(want).max() > 1.0
  with jax.enable_x64(True):
    p64 = _float64(predictor)
    backbone = {k: {"backbone": v["backbone"]} for k, v in p64.variables.items()
                if "backbone" in v}  # the official (unfolded) variables
    # Op by op: cheaper than compiling the full net for one call.
    got = p64.model.apply(backbone, images.astype(np.float64),
                          method=capf.CAPF.heatmaps)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-9, atol=1e-9)
    maps, hm = p64.model.apply(backbone, images.astype(np.float64),
                               method=capf.CAPF.features_and_heatmaps)
    np.testing.assert_array_equal(np.asarray(hm), np.asarray(got))
    assert [m.shape for m in maps] == [(1, 64, 48, 32), (1, 32, 24, 64),
                                       (1, 16, 12, 128), (1, 8, 6, 256)]


@pytest.fixture(scope="module")
def small_cpn(tmp_path_factory):
  """A reduced CPN with its head, its variables saved as a model directory
  (the converter writes the same layout; the CLI has no reduced widths)."""
  tmp = tmp_path_factory.mktemp("cpn")
  model = ref_cpn.CPN(**SMALL_CPN)
  calib = _images(20, 1, -0.5, 0.5).transpose(0, 3, 1, 2).copy()
  common.randomize_(model, 5, example_inputs=(torch.from_numpy(calib),)).eval()
  config = capf.default_model_config("cpn")
  config.backbone_kwargs = dict(SMALL_CPN, heatmap_head=True)
  module = capf.build_model(config).backbone
  variables = cpn.load_torch_state_dict(common.state_dict_numpy(model), module)
  out = tmp / "coco_small_cpn"
  capf.save_variables(str(out), {c: {"backbone": t} for c, t in variables.items()}, config)
  return model, out


def test_small_cpn_heatmaps_and_detect_2d_equal_torch(small_cpn):
  model, out = small_cpn
  images = _images(21, 2, -0.5, 0.5)
  want = _torch_heatmaps(model, images)
  assert np.abs(want).max() > 1.0
  ref_coords, ref_scores = _ref_decode(want)
  with jax.enable_x64(True):
    p64 = _float64(Predictor.load(str(out)))
    got = p64.heatmaps(images)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    kp, scores = p64.detect_2d(images)
  np.testing.assert_array_equal(kp, 4 * ref_coords)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-9, atol=1e-9)

  # The float32 user path: no further from the exact answer than torch float32.
  predictor = Predictor.load(str(out))
  got32 = predictor.heatmaps(images)
  assert got32.shape == (2, H, W, J) and got32.dtype == np.float32
  torch32 = _torch_heatmaps(model, images, torch.float32)
  assert np.abs(got32 - want).max() <= 3 * np.abs(torch32 - want).max() + 1e-5
  kp32, scores32 = predictor.detect_2d(images)
  assert kp32.shape == (2, J, 2) and scores32.shape == (2, J)
  # Decoding a float32 map can flip a near-tie; most joints agree exactly.
  assert (kp32 == 4 * ref_coords).all(axis=-1).mean() > 0.9


def test_detect_2d_known_peak_gives_hand_computed_crop_pixel(small_cpn, monkeypatch):
  _, out = small_cpn
  hm = np.full((1, H, W, J), -0.1, np.float32)
  # Joint 0 (nose): peak at heatmap (x=10, y=20), right neighbour higher than
  # left, lower neighbour higher than upper -> (10.25, 20.25) -> crop (41, 81).
  hm[0, 20, 10, 0], hm[0, 20, 11, 0], hm[0, 20, 9, 0] = 0.9, 0.5, 0.2
  hm[0, 21, 10, 0], hm[0, 19, 10, 0] = 0.4, 0.1
  # Joint 16 (right ankle): peak at (x=47, y=63), the corner: not shifted.
  hm[0, 63, 47, 16] = 0.7
  # Other joints: all negative -> crop (0, 0), score -0.1 (official mask).
  monkeypatch.setattr(capf.CAPF, "heatmaps",
                      lambda self, images: jnp.asarray(hm) + 0 * images[:1, :H, :W, :1].sum())
  predictor = Predictor.load(str(out))
  kp, scores = predictor.detect_2d(_images(0, 1))
  np.testing.assert_array_equal(kp[0, 0], [41.0, 81.0])
  np.testing.assert_array_equal(kp[0, 16], [188.0, 252.0])
  np.testing.assert_array_equal(kp[0, 1:16], 0.0)
  np.testing.assert_allclose(scores[0, [0, 16, 5]], [0.9, 0.7, -0.1], rtol=1e-7)
  # With the crop's (center, scale): frame pixels through the inverse warp.
  center, scale = (300.0, 200.0), (2.0, 2.0)   # a 400 px box
  kp_frame, _ = predictor.detect_2d(_images(0, 1), center=center, scale=scale)
  # crop 41 -> 300 + (41 - 95.5) * 399 / 191; crop 81 -> 200 + (81 - 127.5) * 399 / 191
  np.testing.assert_allclose(kp_frame[0, 0], [300 + (41 - 95.5) * 399 / 191,
                                              200 + (81 - 127.5) * 399 / 191], atol=1e-4)


def test_model_without_head_is_one_clear_error(small_cpn, tmp_path):
  model, _ = small_cpn
  config = capf.default_model_config("cpn")
  config.backbone_kwargs = dict(SMALL_CPN)
  module = capf.build_model(config).backbone
  variables = cpn.load_torch_state_dict(common.state_dict_numpy(model), module)
  out = tmp_path / "no_head"
  capf.save_variables(str(out), {c: {"backbone": t} for c, t in variables.items()}, config)
  predictor = Predictor.load(str(out))
  assert not predictor.has_heatmap_head
  for call in (predictor.heatmaps, predictor.detect_2d):
    with pytest.raises(ValueError, match=r"no COCO heatmap head .* convert a COCO backbone "
                                         r"file \(capf-convert"):
      call(_images(0, 1))
  with pytest.raises(ValueError, match=r"images: expected \(B, 256, 192, 3\)"):
    Predictor.load(str(small_cpn[1])).heatmaps(np.zeros((1, 64, 48, 3), np.float32))


# ---------------------------------------------------------------- backbone_init

def _headless_model_variables(backbone, backbone_kwargs, seed):
  config = capf.default_model_config(backbone)
  config.backbone_kwargs = dict(backbone_kwargs)
  config.embed_dim, config.depth = 16, 1
  return steps.init_variables(capf.build_model(config), seed)


def _assert_backbone_from(got, coco_dir, headless, head_collections):
  """`got`'s backbone is the COCO directory's without its head, leaf for leaf."""
  coco, _ = capf.load_variables(str(coco_dir))
  for collection in ("params", "batch_stats"):
    want = flax.traverse_util.flatten_dict(coco[collection]["backbone"])
    head = {k for k in want if capf.is_heatmap_head(k)}
    assert bool(head) == (collection in head_collections), (collection, head)
    body = flax.traverse_util.flatten_dict(got[collection]["backbone"])
    expected = flax.traverse_util.flatten_dict(flax.core.unfreeze(headless[collection]["backbone"]))
    assert set(body) == set(expected) == set(want) - head
    for k in body:
      np.testing.assert_array_equal(body[k], want[k], err_msg="/".join(k))


def test_coco_conversion_as_backbone_init_leaves_its_head_out(small_cpn, tmp_path):
  """`--config.backbone_init=ckpt/hrnet_w32_coco` (docs/training.md): a COCO
  conversion holds the heatmap head, which CA-PF's backbone has not."""
  # CPN: head params and BatchNorm statistics (final_predict_{0,1,2}).
  headless = _headless_model_variables("cpn", SMALL_CPN, seed=1)
  got = checkpoints.load_backbone(headless, str(small_cpn[1]))
  _assert_backbone_from(got, small_cpn[1], headless, ("params", "batch_stats"))
  for g, h in zip(jax.tree_util.tree_leaves(got["params"]["lifter"]),  # lifter untouched
                  jax.tree_util.tree_leaves(headless["params"]["lifter"]), strict=True):
    np.testing.assert_array_equal(g, h)

  # HRNet: `final_layer` (params only), a COCO directory as the converter writes it.
  config = capf.default_model_config("hrnet_32")
  config.backbone_kwargs = dict(inference_fixtures.SMALL_HRNET, heatmap_head=True)
  with_head = steps.init_variables(capf.build_model(config), 0)
  coco_dir = tmp_path / "hrnet_coco"
  capf.save_variables(str(coco_dir), {c: {"backbone": t["backbone"]}
                                      for c, t in with_head.items()}, config)
  headless = _headless_model_variables("hrnet_32", inference_fixtures.SMALL_HRNET, seed=2)
  _assert_backbone_from(checkpoints.load_backbone(headless, str(coco_dir)), coco_dir, headless,
                        ("params",))

  # Any other difference is still one error naming the directory.
  wider = _headless_model_variables("hrnet_32", dict(inference_fixtures.SMALL_HRNET, width=8), 3)
  with pytest.raises(ValueError, match=r"hrnet_coco: params/backbone: .* has shape"):
    checkpoints.load_backbone(wider, str(coco_dir))
