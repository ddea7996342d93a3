"""The train state, the optimizer and the pure step functions of CA-PF.

Official behaviour kept (`ContextPose/train.py`): loss = MPJPE in metres on
root-relative targets; AdamW (torch defaults, weight decay 0.1 on every
trained parameter) with lr x decay after every epoch; a NaN loss skips the
update (counted); the backbone is frozen with BatchNorm in inference mode
unless `config.model.train_backbone`; the flip test averages the prediction
with the un-flipped prediction of the mirrored input.
"""
from __future__ import annotations

import functools
from typing import Any

import flax
from flax import struct
import jax
import jax.numpy as jnp
import optax

from contextpose_jax import compiler_options
from contextpose_jax import parallel
from contextpose_jax import skeleton
from contextpose_jax.models import capf
from contextpose_jax.models import folding

# Batch keys fed to the model, and their mirrored twins for the flip test.
MODEL_KEYS = ('image', 'keypoints_2d', 'keypoints_2d_crop')
FLIP_KEYS = ('image_flip', 'keypoints_2d_flip', 'keypoints_2d_crop_flip')


class TrainState(struct.PyTreeNode):
  """Everything a resumed run needs, as one pytree.

  `params` holds only the TRAINED parameters (the lifter; plus the backbone
  when it is fine-tuned), so the optimizer state has no Adam moments for a
  frozen backbone; `frozen_params` holds the rest.
  """
  step: jax.Array
  params: Any
  frozen_params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  nan_count: jax.Array

  def variables(self) -> dict:
    params = merge_params(self.params, self.frozen_params)
    out = {'params': params}
    if self.batch_stats:
      out['batch_stats'] = self.batch_stats
    return out


def split_params(params, train_backbone: bool):
  """(trained, frozen) parameter dicts."""
  params = flax.core.unfreeze(params)
  if train_backbone:
    return params, {}
  trained = {k: v for k, v in params.items() if k != 'backbone'}
  frozen = {k: v for k, v in params.items() if k == 'backbone'}
  return trained, frozen


def merge_params(trained, frozen) -> dict:
  return {**dict(frozen), **dict(trained)}


def learning_rate_fn(config, steps_per_epoch: int) -> optax.Schedule:
  """lr x decay after every epoch (the official per-epoch exponential decay)."""
  return optax.exponential_decay(config.learning_rate, transition_steps=steps_per_epoch,
                                 decay_rate=config.lr_decay, staircase=True)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW direction without the lr; the step multiplies by -lr(step).

  torch AdamW: p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p), which is
  scale_by_adam -> add_decayed_weights -> scale(-lr). The lr is applied in the
  step from the GLOBAL step so a skipped (NaN) step still advances the epoch
  schedule, while Adam's own count (bias correction) does not advance, as in
  torch where a skipped `optimizer.step()` leaves `state['step']` alone.
  """
  chain = []
  if config.grad_clip_norm > 0:
    # The official option clips at `grad_clip / lr`; off (0) by default.
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  chain.append(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps))
  if config.weight_decay > 0:
    chain.append(optax.add_decayed_weights(config.weight_decay))
  return optax.chain(*chain)


def _init_key(seed: int):
  # XLA:CPU compiles one threefry hash per initialiser, several times slower
  # to compile than the RngBitGenerator ('rbg') for CA-PF's init. Init
  # runs unsharded and identically on every host, so rbg's dependence on the
  # partitioning does not matter here; the train step's dropout keeps threefry.
  return jax.random.key(seed, impl='rbg')


def init_variables(model, seed: int):
  """Initial model variables (host side, replicated later)."""
  params_rng, dropout_rng = jax.random.split(_init_key(seed))
  return compiler_options.jit(model.init, run_once=True)(
      {'params': params_rng, 'dropout': dropout_rng}, *capf.dummy_inputs(1))


def he_init_backbone(variables, seed: int):
  """Re-draws every backbone conv kernel with He (fan-in) init.

  Used for a backbone trained from scratch (`config.backbone_scratch_init`):
  the official HRNet init (normal, std 0.001) only precedes loading COCO
  weights; from scratch it makes activations ~1e-3, so the batch variances
  vanish under BatchNorm's eps and the running averages (starting at 1) need
  hundreds of steps before inference-mode BatchNorm matches training mode.
  """
  init = jax.nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
  params = dict(flax.core.unfreeze(variables['params']))

  # One compiled program (eager, each kernel shape would compile its own).
  @functools.partial(compiler_options.jit, run_once=True)
  def redraw(backbone):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(backbone)
    keys = jax.random.split(_init_key(seed), len(leaves))
    new = [init(k, x.shape, x.dtype) if (x.ndim == 4 and path[-1].key == 'kernel') else x
           for k, (path, x) in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, new)

  params['backbone'] = redraw(params['backbone'])
  return {**variables, 'params': params}


def create_train_state(config, model, variables, tx) -> TrainState:
  params, frozen = split_params(variables['params'], config.model.train_backbone)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      frozen_params=frozen,
      batch_stats=flax.core.unfreeze(variables.get('batch_stats', {})),
      opt_state=tx.init(params),
      rng=jax.random.PRNGKey(config.seed + 1),
      nan_count=jnp.zeros((), jnp.int32))


def mpjpe_loss(pred, target, mask=None):
  """Official `MPJPE` criterion: mean joint distance (metres), over the
  examples where `mask` (B,) is nonzero (all without one).

  With a mask this is the criterion of the real rows alone (the official
  partial last batch); padding rows count in neither sum, and their targets
  are replaced by a finite stand-in, so whatever they hold (even NaN) gives
  them a zero gradient.
  """
  if mask is None:
    return jnp.mean(jnp.linalg.norm(pred - target, axis=-1))
  real = mask > 0
  target = jnp.where(real[:, None, None], target, jax.lax.stop_gradient(pred) + 1)
  per_example = jnp.mean(jnp.linalg.norm(pred - target, axis=-1), axis=-1)
  return (jnp.sum(jnp.where(real, per_example, 0.0))
          / jnp.maximum(jnp.sum(real), 1).astype(per_example.dtype))


def _folded(model, variables, fold_pairs):
  """``(variables, apply)``: the `fold_pairs` BatchNorms folded into their
  convs and the matching apply (unchanged when there are none).

  The steps fold inside the compiled program (one multiply per frozen
  weight), so the train state and the checkpoints keep the official,
  unfolded variables.
  """
  if not fold_pairs:
    return variables, model.apply
  return (folding.fold_batch_norm(variables, fold_pairs),
          functools.partial(folding.apply_folded, model, pairs=fold_pairs))


def train_step(state: TrainState, batch, *, model, tx, lr_fn, train_backbone: bool,
               fold_pairs=()):
  """One AdamW step on the global batch; a non-finite loss skips the update.

  `batch['mask']` (B,), where present, marks the real rows: the padding of an
  epoch's partial last batch is out of the loss, hence of the gradient's
  mean, the NaN check and the metrics, so the step is the official step on
  the real rows alone. With `train_backbone`, BatchNorm's batch statistics
  are the one exception: they are taken over all B rows (padding = copies of
  real records; one step per epoch).
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  mask = batch.get('mask')
  frozen = {'params': state.frozen_params}
  if state.batch_stats:
    frozen['batch_stats'] = state.batch_stats
  # Folded outside the differentiated function: the frozen backbone is a
  # constant of the loss.
  frozen, model_apply = _folded(model, frozen, fold_pairs)

  def loss_fn(params):
    variables = {**frozen, 'params': merge_params(params, frozen['params'])}
    inputs = [batch[k] for k in MODEL_KEYS]
    if train_backbone and state.batch_stats:
      pred, updates = model.apply(variables, *inputs, train=True,
                                  rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
      new_stats = updates['batch_stats']
    else:
      pred = model_apply(variables, *inputs, train=True, rngs={'dropout': dropout_rng})
      new_stats = state.batch_stats
    loss = mpjpe_loss(pred[:, 0], batch['keypoints_3d'], mask)
    return loss, new_stats

  (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  lr = lr_fn(state.step)
  new_params = optax.apply_updates(state.params, jax.tree.map(lambda u: -lr * u, updates))

  # The official loop skips backward + step when the loss is NaN; we also skip
  # +-inf, which would otherwise destroy the weights.
  ok = jnp.isfinite(loss)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt_state, state.opt_state),
      batch_stats=keep(new_stats, state.batch_stats),
      nan_count=state.nan_count + (~ok).astype(jnp.int32))
  examples = (jnp.sum(mask > 0) if mask is not None
              else batch['keypoints_3d'].shape[0])
  metrics = {'loss': loss, 'learning_rate': lr, 'skipped': (~ok).astype(jnp.int32),
             'grad_norm': optax.tree.norm(grads),
             'examples': jnp.asarray(examples, jnp.int32)}
  return new_state, metrics


def predict_step(variables, batch, *, model, dataset: str, flip_test: bool, fold_pairs=()):
  """(B, 17, 3) predictions; with the flip test, the mean of the prediction and
  the un-flipped prediction on the mirrored input (as the official loop)."""
  variables, model_apply = _folded(model, variables, fold_pairs)
  pred = model_apply(variables, *[batch[k] for k in MODEL_KEYS], train=False)[:, 0]
  if flip_test:
    pred_flip = model_apply(variables, *[batch[k] for k in FLIP_KEYS], train=False)[:, 0]
    pred = (pred + skeleton.flip_pose_3d(pred_flip, dataset)) / 2
  return pred


# The steps are compiled for their mesh's devices: their platform decides the
# platform code (compiler_options.py). `platform` overrides it only to LOWER
# for another platform than the mesh's (`aot`: CUDA without a CUDA plugin).


def make_train_step(model, tx, lr_fn, mesh, train_backbone: bool, fold_batch_norm: bool = True,
                    platform: str | None = None):
  pairs = capf.backbone_batch_norm_pairs(model) if fold_batch_norm and not train_backbone else ()
  step = functools.partial(train_step, model=model, tx=tx, lr_fn=lr_fn,
                           train_backbone=train_backbone, fold_pairs=pairs)
  return compiler_options.jit(
      step, platform=platform or parallel.platform(mesh), donate_argnums=(0,),
      out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)))


def make_predict_step(model, mesh, dataset: str, flip_test: bool, fold_batch_norm: bool = True,
                      platform: str | None = None):
  """The jitted predict step; build it once per run (each call compiles anew)."""
  pairs = capf.backbone_batch_norm_pairs(model) if fold_batch_norm else ()
  step = functools.partial(predict_step, model=model, dataset=dataset, flip_test=flip_test,
                           fold_pairs=pairs)
  return compiler_options.jit(step, platform=platform or parallel.platform(mesh),
                              out_shardings=parallel.batch_sharding(mesh))
