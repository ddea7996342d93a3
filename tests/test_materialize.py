"""The XLA:CPU fusion barriers: exact identities that keep a producer out of
its consumers' fusions (materialize.py says why)."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from contextpose_jax import steps
from contextpose_jax.api import Predictor
from contextpose_jax.models import capf
from contextpose_jax.models import materialize
from contextpose_jax.models.lifter import Lifter
from contextpose_jax.models.sampler import grid_sample

TINY_BACKBONE = dict(width=4, stage_modules=(1, 1, 1), num_blocks=1, stem_channels=8,
                     layer1_blocks=1)


def _computations(hlo: str) -> dict[str, str]:
  return dict(re.findall(r"\n(?:ENTRY )?%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S))


def test_barriers_are_exact_identities():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
  x_nan = x.copy()
  x_nan[0, 0, 0, 0] = np.nan  # the loop then runs once, still the identity
  for value in (x, x_nan, x.astype(jnp.bfloat16)):
    out = jax.jit(materialize.materialized)(value)
    assert out.dtype == value.dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(value, np.float32))
  for value in (x, x.astype(jnp.bfloat16)):  # finite values (0 x NaN is NaN)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(materialize.through_identity_conv)(value), np.float32),
        np.asarray(value, np.float32))
  ints = np.arange(6, dtype=np.int32)
  assert materialize.materialized(ints) is ints  # nothing to keep apart
  weights = rng.normal(size=x.shape).astype(np.float32)
  grad = jax.jit(jax.grad(lambda v: jnp.sum(materialize.materialized(jnp.sin(v)) * weights)))(x)
  np.testing.assert_allclose(grad, np.cos(x) * weights, rtol=1e-6)


def test_materialized_keeps_the_producer_out_of_the_gathers():
  rng = np.random.default_rng(1)
  maps = rng.normal(size=(2, 9, 7, 4)).astype(np.float32)
  points = rng.uniform(-1, 1, (2, 5, 2)).astype(np.float32)

  def sample_twice(barrier):
    def fn(m, p):
      m = jnp.sin(m)  # the producer: one sine op to look for
      if barrier:
        m = materialize.materialized(m)
      return grid_sample(m, p, "border") + grid_sample(m, 0.5 * p, "border")
    return jax.jit(fn)

  def gathers_with_sine(fn):
    hlo = fn.lower(maps, points).compile().as_text()
    return sum(1 for body in _computations(hlo).values()
               if "gather(" in body and re.search(r"\bsine\(", body))

  # XLA's default: the sine is recomputed inside the gathers' fusion.
  assert gathers_with_sine(sample_twice(False)) > 0
  # With the barrier, once, on its own (the loop's trip count reads one element).
  assert gathers_with_sine(sample_twice(True)) == 0
  np.testing.assert_array_equal(sample_twice(True)(maps, points),
                                sample_twice(False)(maps, points))


def test_no_backbone_op_is_fused_into_the_lifters_gathers():
  cfg = capf.default_model_config("hrnet_32")
  cfg.backbone_kwargs = TINY_BACKBONE
  cfg.embed_dim, cfg.depth = 16, 1
  model = capf.build_model(cfg)
  predictor = Predictor(model, steps.init_variables(model, 0), cfg)
  rng = np.random.default_rng(2)
  images = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
  kp2d = rng.uniform(-0.6, 0.6, (2, 17, 2)).astype(np.float32)
  crop = (rng.uniform(0.05, 0.95, (2, 17, 2)) * 63).astype(np.float32)
  hlo = predictor._predict_fn.lower(predictor._device_variables, images, kp2d,
                                    crop).compile().as_text()
  gathering = [body for body in _computations(hlo).values() if "gather(" in body]
  assert len(gathering) >= 4 * (1 + cfg.depth)  # reference + deformable sampling
  for body in gathering:
    assert "/backbone/" not in body, body[:2000]


def _largest_fusion(hlo: str) -> int:
  return max(len(re.findall(r"%[\w.\-]+", m.group(1)))
             for m in re.finditer(r" fusion\(([^)]*)\)", hlo))


def test_the_lifters_residual_stream_is_not_recomputed_in_later_fusions():
  # Without the per-block barriers (forward and cotangent) the largest fusion
  # of this gradient program reads 159 buffers: every earlier block's outputs,
  # re-added in every later fusion. With them it stays a block's worth.
  lifter = Lifter(embed_dim=16, depth=4, num_heads=2, drop_path_rate=0.0)
  rng = np.random.default_rng(3)
  feats = [rng.normal(size=(2, 8, 6, 4)).astype(np.float32) for _ in range(4)]
  kp2d = rng.uniform(-0.5, 0.5, (2, 17, 2)).astype(np.float32)
  variables = lifter.init(jax.random.PRNGKey(0), kp2d, kp2d, feats)
  grad = jax.jit(jax.grad(lambda v: jnp.sum(lifter.apply(v, kp2d, kp2d, feats) ** 2)))
  assert _largest_fusion(grad.lower(variables).compile().as_text()) <= 32
