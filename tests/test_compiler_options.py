"""The XLA options of the model's programs reach the compiled code.

On CPU the backbone's convolutions must run on XLA's own (Eigen) kernels, not
in YNNPACK fusions (compiler_options.py says why; `python -m benchmarks.speed
--rows=conv` measures it): checked on the optimized HLO of the Predictor's
programs and of the production train and predict steps.
"""
import re

import jax
import numpy as np

from configs import default as default_config

from contextpose_jax import compiler_options
from contextpose_jax import parallel
from contextpose_jax import steps
from contextpose_jax.api import Predictor
from contextpose_jax.models import capf

TINY_BACKBONE = dict(width=4, stage_modules=(1, 1, 1), num_blocks=1, stem_channels=8,
                     layer1_blocks=1)


def _model():
  cfg = capf.default_model_config("hrnet_32")
  cfg.backbone_kwargs = TINY_BACKBONE
  cfg.embed_dim, cfg.depth = 16, 1
  model = capf.build_model(cfg)
  variables = steps.init_variables(model, 0)
  return model, variables, cfg


def _inputs(batch=2):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch, 64, 64, 3)).astype(np.float32)
  kp2d = rng.uniform(-0.6, 0.6, (batch, 17, 2)).astype(np.float32)
  crop = (rng.uniform(0.05, 0.95, (batch, 17, 2)) * 63).astype(np.float32)
  return images, kp2d, crop


def _convolutions(hlo: str) -> tuple[int, int]:
  """(convolutions in YNNPACK fusions, convolutions elsewhere)."""
  ynn_computations = set(re.findall(
      r"calls=%([\w.\-]+)[^\n]*\"kind\":\"__ynn_fusion\"", hlo))
  in_ynn = outside = 0
  for name, body in re.findall(r"\n(?:ENTRY )?%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S):
    count = len(re.findall(r"\bconvolution\(", body))
    if name in ynn_computations:
      in_ynn += count
    else:
      outside += count
  return in_ynn, outside


def test_options_by_platform():
  assert compiler_options.for_platform("cpu") == compiler_options.CPU_OPTIONS
  assert compiler_options.for_platform("gpu") == {}
  assert compiler_options.for_platform("tpu") == {}
  # Full enum names: the per-program parser refuses XLA_FLAGS' +/- syntax.
  for value in compiler_options.CPU_OPTIONS.values():
    assert all(v.startswith("LIBRARY_FUSION_TYPE_") for v in value.split(","))
    assert "CONVOLUTION" not in value


def test_run_once_programs_compile_at_o0_with_the_same_values():
  """Initialisation compiles at LLVM -O0 on CPU (compile time is all it
  costs), other platforms get nothing, and the values are -O3's up to float
  rounding: checked on three truncated-normal draws, as flax's inits make."""
  assert compiler_options.for_platform("cpu", run_once=True) == {
      **compiler_options.CPU_OPTIONS, **compiler_options.RUN_ONCE_CPU_OPTIONS}
  assert compiler_options.for_platform("tpu", run_once=True) == {}

  def draws(key):
    keys = jax.random.split(key, 3)
    init = jax.nn.initializers.truncated_normal(0.02)
    return [init(k, (3, 3, 8, 8 + i)) for i, k in enumerate(keys)]

  key = jax.random.PRNGKey(0)
  once = compiler_options.jit(draws, run_once=True)
  for a, b in zip(once(key), jax.jit(draws)(key)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_predictor_convolutions_leave_ynnpack():
  model, variables, cfg = _model()
  predictor = Predictor(model, variables, cfg)
  images, kp2d, crop = _inputs()
  # The program Predictor.predict runs, compiled once: inspected, then run.
  ours = predictor._predict_fn.lower(predictor._device_variables, images, kp2d, crop).compile()
  in_ynn, outside = _convolutions(ours.as_text())
  assert in_ynn == 0 and outside > 10, (in_ynn, outside)
  # The option is what moves them: XLA's default puts them in YNNPACK fusions.
  default = jax.jit(lambda v, *a: model.apply(v, *a)).lower(
      variables, images, kp2d, crop).compile().as_text()
  assert _convolutions(default)[0] > 0
  # Same numbers either way (up to float rounding).
  np.testing.assert_allclose(ours(predictor._device_variables, images, kp2d, crop),
                             np.asarray(model.apply(variables, images, kp2d, crop)),
                             rtol=1e-4, atol=1e-4)


def test_train_and_predict_steps_carry_the_options():
  model, variables, cfg = _model()
  config = default_config.get_config()
  config.model, config.batch_size = cfg, 2
  mesh = parallel.make_mesh()
  tx = steps.make_optimizer(config)
  state = steps.create_train_state(config, model, jax.tree.map(np.asarray, variables), tx)
  images, kp2d, crop = _inputs()
  batch = {"image": images, "keypoints_2d": kp2d, "keypoints_2d_crop": crop,
           "keypoints_3d": np.zeros((2, 17, 3), np.float32)}
  train_step = steps.make_train_step(model, tx, steps.learning_rate_fn(config, 10), mesh,
                                     train_backbone=False)
  hlo = train_step.lower(state, parallel.global_batch(batch, mesh)).compile().as_text()
  assert _convolutions(hlo)[0] == 0 and _convolutions(hlo)[1] > 10
  predict_step = steps.make_predict_step(model, mesh, "h36m", flip_test=False)
  batch = {k: v for k, v in batch.items() if k != "keypoints_3d"}
  compiled = predict_step.lower(variables, parallel.global_batch(batch, mesh)).compile()
  hlo = compiled.as_text()
  assert _convolutions(hlo)[0] == 0 and _convolutions(hlo)[1] > 10
  # Same numbers as the unfolded model under XLA's default options (the
  # program inspected above, run).
  np.testing.assert_allclose(compiled(variables, parallel.global_batch(batch, mesh)),
                             np.asarray(model.apply(variables, images, kp2d, crop))[:, 0],
                             rtol=1e-4, atol=1e-4)
