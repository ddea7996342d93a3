"""The precision policy: config fields that really change the computation.

``matmul_precision`` must reach every dot of the lifter (sampler and resize
included), ``lifter_dtype='bfloat16'`` must compute in bf16 with float32
parameters, and what bf16 costs in accuracy is measured against float32 on a
converted random-weight model.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contextpose_jax.models import capf
from contextpose_jax.models import resize

# A small HRNet that works on 64x64 images (as in tests/test_train.py).
TINY_BACKBONE = dict(width=4, stage_modules=(1, 1, 1), num_blocks=1, stem_channels=8,
                     layer1_blocks=1)
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3). A random-weight
# lifter amplifies rounding chaotically: at float32 it is already 6e-4 off the
# float64 answer (scale 3.6), and merely rounding its weights to bf16 moves
# the output by 1.3. Measured for bf16 compute: max |delta| 0.67 (0.19 of the
# scale), median 0.08 (0.02). Loose bounds, relative to the output's scale:
BF16_MAX_BOUND = 0.3
BF16_MEDIAN_BOUND = 0.05


def _tiny_config(**over):
  cfg = capf.default_model_config("hrnet_32")
  cfg.backbone_kwargs = TINY_BACKBONE
  cfg.embed_dim = 16
  cfg.depth = 1
  for key, value in over.items():
    cfg[key] = value
  return cfg


def _inputs(batch=2, hw=(64, 64), seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, *hw, 3)).astype(np.float32)
  kp2d = rng.uniform(-0.6, 0.6, (batch, 17, 2)).astype(np.float32)
  crop = (rng.uniform(0.05, 0.95, (batch, 17, 2)) * [hw[1] - 1, hw[0] - 1]).astype(np.float32)
  return images, kp2d, crop


def _lowered_text(cfg):
  model = capf.build_model(cfg)
  args = tuple(jnp.asarray(a) for a in _inputs())
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))
  return jax.jit(model.apply).lower(shapes, *args).as_text()


def _dot_precisions(stablehlo: str):
  return re.findall(r"stablehlo\.dot_general.*?precision = \[(\w+), (\w+)\]", stablehlo)


def test_default_precision_leaves_no_highest_dots():
  text = _lowered_text(_tiny_config(matmul_precision="default"))
  dots = _dot_precisions(text)
  assert len(dots) > 10  # the lifter's Linears, attention and context sum
  assert "HIGHEST" not in text
  assert all(p == ("DEFAULT", "DEFAULT") for p in dots)


@pytest.mark.parametrize("name,attribute", [("default", "DEFAULT"), ("highest", "HIGHEST")])
def test_precision_reaches_the_cpn_resizes(name, attribute):
  """CPN's align-corners resizes (matmuls) follow the model's policy too."""
  cfg = _tiny_config(backbone="cpn", matmul_precision=name)
  cfg.backbone_kwargs = dict(resnet_layers=(1, 1, 1, 1), width=8, lateral_channels=16)
  model = capf.build_model(cfg)
  images = jnp.zeros((1, 64, 64, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, method="features"))
  text = jax.jit(lambda v, x: model.apply(v, x, method="features")).lower(shapes, images).as_text()
  dots = _dot_precisions(text)
  assert len(dots) >= 2 * 7  # 3 GlobalNet upsamples + 4 RefineNet resizes, 2 matmuls each
  assert all(p == (attribute, attribute) for p in dots), set(dots)


@pytest.mark.parametrize("name,attribute", [("highest", "HIGHEST"), ("high", "HIGH")])
def test_precision_reaches_every_dot(name, attribute):
  text = _lowered_text(_tiny_config(matmul_precision=name))
  dots = _dot_precisions(text)
  assert len(dots) > 10
  assert all(p == (attribute, attribute) for p in dots), set(dots)


def test_configs_without_precision_fields_load_as_parity_setting():
  cfg = _tiny_config().to_dict()
  del cfg["lifter_dtype"], cfg["matmul_precision"]  # an older model_config.json
  lifter = capf.build_model(cfg).lifter
  assert (lifter.dtype, lifter.matmul_precision) == ("float32", "highest")
  with pytest.raises(ValueError, match="matmul_precision"):
    capf.build_model(_tiny_config(matmul_precision="fast")).init(
        jax.random.PRNGKey(0), *_inputs())


def test_resize_precision_is_applied():
  x = jnp.zeros((1, 4, 3, 2))
  text = jax.jit(lambda v: resize.resize_bilinear_align_corners(v, (8, 6), precision=None)
                 ).lower(x).as_text()
  assert "HIGHEST" not in text and "dot_general" in text
  text = jax.jit(lambda v: resize.resize_bilinear_align_corners(v, (8, 6))).lower(x).as_text()
  assert _dot_precisions(text) == [("HIGHEST", "HIGHEST")] * 2


def test_bf16_lifter_computes_in_bf16_with_float32_params():
  cfg = _tiny_config(lifter_dtype="bfloat16", matmul_precision="default")
  model = capf.build_model(cfg)
  args = tuple(jnp.asarray(a) for a in _inputs())
  variables = model.init(jax.random.PRNGKey(0), *args)
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(variables["params"])}
  assert dtypes == {jnp.dtype(jnp.float32)}

  jaxpr = jax.make_jaxpr(model.apply)(variables, *args)
  dots = [eqn for eqn in _all_eqns(jaxpr.jaxpr) if eqn.primitive.name == "dot_general"]
  operand_dtypes = [tuple(v.aval.dtype for v in eqn.invars) for eqn in dots]
  bf16 = sum(d == (jnp.bfloat16, jnp.bfloat16) for d in operand_dtypes)
  # Every lifter matmul in bf16 except the deformable sampling offsets (one
  # per deformable block, kept float32 for the sampling positions).
  assert bf16 == len(dots) - cfg.depth, operand_dtypes
  out = model.apply(variables, *args)
  assert out.dtype == jnp.float32 and out.shape == (2, 1, 17, 3)


def _all_eqns(jaxpr):
  # Into nested jaxprs too (pjit, custom_vjp_call, scan bodies).
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", None)
      if inner is not None and hasattr(inner, "eqns"):
        yield from _all_eqns(inner)
      elif hasattr(param, "eqns"):
        yield from _all_eqns(param)


def test_bf16_accuracy_against_float32():
  """max |delta| of the 3D output, bf16 vs fp32, same converted weights.

  A random-weight official-layout torch CA-PF (full-size lifter: C = 128,
  depth 4; small HRNet backbone), converted; inputs at the official 256x192.
  """
  from benchmarks.speed import build_models  # pylint: disable=g-import-not-at-top
  _, variables, config = build_models("hrnet_32", backbone_kwargs=TINY_BACKBONE)
  images, kp2d, crop = _inputs(batch=4, hw=(256, 192), seed=3)

  def predict(**over):
    cfg = config.copy_and_resolve_references()
    for key, value in over.items():
      cfg[key] = value
    return np.asarray(jax.jit(capf.build_model(cfg).apply)(variables, images, kp2d, crop))

  fp32 = predict()
  scale = np.abs(fp32).max()
  delta = np.abs(predict(lifter_dtype="bfloat16", matmul_precision="default") - fp32)
  print(f"bf16 lifter: max |delta| {delta.max():.2e}, median {np.median(delta):.2e} "
        f"(output scale {scale:.2f})")
  assert delta.max() < BF16_MAX_BOUND * scale
  assert np.median(delta) < BF16_MEDIAN_BOUND * scale
  # 'default' float32 matmuls are exact on CPU (no TF32): nothing changes.
  np.testing.assert_allclose(predict(matmul_precision="default"), fp32, rtol=0, atol=1e-6)
