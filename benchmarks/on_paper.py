r"""An accelerator estimate "on paper": XLA's cost analysis of the production steps.

    python -m benchmarks.on_paper [--backbone=hrnet_32] [--train_batch=64] [--predict_batch=64]

For a session with no GPU: compiles (on the CPU) the production train step
(`steps.make_train_step`: frozen full-size backbone with folded BatchNorm +
lifter forward/backward + AdamW) and the production predict step
(`steps.make_predict_step`, flip test on, as evaluation runs it), reads
XLA's FLOP and byte counts per example from `compiled.cost_analysis()`, and
prints the throughput those imply on an H100 SXM at a stated fraction of its
peak: min(compute bound, memory bound). A paper estimate, not a measurement:
XLA:CPU's HLO after fusion is not XLA:GPU's, so the byte counts are an upper
bound of what a GPU's fused kernels move.
"""
from __future__ import annotations

import sys

from absl import flags
import jax
import numpy as np

from configs import default
from contextpose_jax import cli
from contextpose_jax import parallel
from contextpose_jax import steps
from contextpose_jax.models import BACKBONES
from contextpose_jax.models import capf

# H100 SXM5 (NVIDIA datasheet, dense): TF32 tensor core 494.7 TFLOP/s, BF16
# 989.4 TFLOP/s, FP32 (no tensor cores) 66.9 TFLOP/s; HBM3 3.35 TB/s.
H100 = {'fp32': 66.9e12, 'tf32': 494.7e12, 'bf16': 989.4e12}
H100_BANDWIDTH = 3.35e12
# Fractions of peak a well-tuned convolutional network reaches: a stated
# assumption, not a measurement.
COMPUTE_FRACTION = 0.4
BANDWIDTH_FRACTION = 0.6

_FLAGS = flags.FlagValues()
flags.DEFINE_enum('backbone', 'hrnet_32', BACKBONES, 'the frozen backbone', flag_values=_FLAGS)
flags.DEFINE_integer('train_batch', 64, 'global batch of the train step', flag_values=_FLAGS)
flags.DEFINE_integer('predict_batch', 64, 'batch of the predict step', flag_values=_FLAGS)


def _config(backbone: str, batch: int, **model_overrides):
  config = default.get_config()
  config.model = capf.default_model_config(backbone)
  config.model.update(model_overrides)
  config.batch_size = batch
  return config


def _batch(batch: int) -> dict:
  images, kp2d, crop = (np.zeros(x.shape, np.float32) for x in capf.dummy_inputs(batch))
  return {'image': images, 'keypoints_2d': kp2d, 'keypoints_2d_crop': crop,
          'keypoints_3d': np.zeros((batch, 17, 3), np.float32),
          'image_flip': images, 'keypoints_2d_flip': kp2d, 'keypoints_2d_crop_flip': crop}


def cost(compiled) -> tuple[float, float]:
  """(flops, bytes accessed) of a compiled program, from XLA's cost analysis."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # one entry per program in some versions
    analysis = analysis[0]
  return float(analysis['flops']), float(analysis['bytes accessed'])


def step_costs(backbone: str, train_batch: int, predict_batch: int, **model_overrides) -> dict:
  """{'train step': (flops, bytes) per example, 'predict (flip test)': ...}."""
  mesh = parallel.make_mesh()
  config = _config(backbone, train_batch, **model_overrides)
  model = capf.build_model(config.model)
  tx = steps.make_optimizer(config)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *capf.dummy_inputs(1)))
  state = jax.eval_shape(lambda v: steps.create_train_state(config, model, v, tx), variables)
  train = steps.make_train_step(model, tx, steps.learning_rate_fn(config, 1000), mesh,
                                train_backbone=False)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(train_batch))
  out = {}
  flops, nbytes = cost(train.lower(state, batch).compile())
  out['train step'] = (flops / train_batch, nbytes / train_batch)
  predict = steps.make_predict_step(model, mesh, config.model.dataset, flip_test=True)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(predict_batch))
  flops, nbytes = cost(predict.lower(variables, batch).compile())
  out['predict (flip test)'] = (flops / predict_batch, nbytes / predict_batch)
  return out


def implied_throughput(flops: float, nbytes: float, peak_flops: float) -> float:
  """Examples/s at COMPUTE_FRACTION of `peak_flops` and BANDWIDTH_FRACTION of
  the H100's memory bandwidth, whichever binds."""
  return min(COMPUTE_FRACTION * peak_flops / flops, BANDWIDTH_FRACTION * H100_BANDWIDTH / nbytes)


def table(costs: dict) -> str:
  lines = ['| work | GFLOP / example | MB accessed / example | H100 fp32 | H100 TF32 | H100 bf16 |',
           '|---|---:|---:|---:|---:|---:|']
  for name, (flops, nbytes) in costs.items():
    rates = [implied_throughput(flops, nbytes, H100[k]) for k in ('fp32', 'tf32', 'bf16')]
    lines.append(f'| {name} | {flops / 1e9:.1f} | {nbytes / 1e6:.1f} | '
                 + ' | '.join(f'{r:,.0f} ex/s' for r in rates) + ' |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  try:
    cli.parse(_FLAGS, argv, __doc__)
  except cli.Exit as e:
    return e.code
  costs = step_costs(_FLAGS.backbone, _FLAGS.train_batch, _FLAGS.predict_batch)
  print(f'backbone {_FLAGS.backbone}, train batch {_FLAGS.train_batch}, predict batch '
        f'{_FLAGS.predict_batch}; H100 at {COMPUTE_FRACTION:.0%} of peak FLOP/s and '
        f'{BANDWIDTH_FRACTION:.0%} of {H100_BANDWIDTH / 1e12:.2f} TB/s\n')
  print(table(costs))
  return 0


if __name__ == '__main__':
  sys.exit(main())
